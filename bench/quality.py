"""Does TKI generalise to unseen tasks better than what a user would run instead? The paper's protocol, in small.

Train the embedded model on a subset of the SNI train tasks of ``shared/data/sni`` (Tk-Instruct's definition and
positive examples, fitted into MAX_LENGTH tokens with the definition kept) for EPOCHS epochs; choose each method's
learning rate on validation tasks cut from the train list; test greedy answers on the SNI test tasks (unseen tasks
of SNI's default split, the paper's Table 1 left half), on the P3 held-out clusters and on BIG-bench tasks (out of
domain, as the paper uses FLAN).

Rows: the base model and SNI's copy-demo heuristic (no training); LoRA SFT, SFT + NEFTune, SFT + DFT and a LoRA
with as many trainable parameters as TKI uses per example, all trained by `trl.SFTTrainer` itself; TKI, TKI
without LTA (KR only), without KR (LTA only), without PCGrad, and with random routing (the same bank, each row
routed by a random query instead of its own); those KR rows read the paper's eqs. 5 and 6 without their minus
signs ("harder"), and TKI and KR only are also trained with both equations as written ("eqs. 5-6 as written":
stage 1 pushed away from the prompt, each example trained through its easier input). Every trained row runs the
same learning-rate search at seed 0, then seeds 1 and 2 at its chosen rate; the report pairs every difference by
seed and by example. KR stage 1 runs once per reading of its settings (STAGE1_READINGS); the report tabulates, per
epoch, what each reading does in training. The rows eqs. 5-6 are compared with are also scored on a larger SNI set
(SNI_LARGE_PROMPTS greedy answers) and by the likelihood of the reference answer on every SNI test row and on
P3_NLL_ROWS P3 held-out rows (one forward per row: a measure with far less variance than greedy answers).

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python bench/quality.py [--methods sft tki ...]

Every finished piece (a training run, an evaluation) is saved at once under ``bench/results/quality/``, so the
command resumes where an interrupted run stopped; ``--report`` only rebuilds the tables and plots;
``--reproduce <run>`` retrains one finished run from nothing and the report compares the two. Adapters (one per
epoch), stage-1 stores and predictions live under ``--work_dir``. On a machine with CUDA the same command trains
and generates there (float32 on both, so only the times differ).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import PeftModel
from torch import nn
from trl import SFTConfig, SFTTrainer

from common import (
    P3,
    RESULTS,
    SNI,
    STAGE1,
    as_json,
    evaluate,
    likelihood,
    mean_sd,
    read_record,
    saved_figure,
    scored,
    training_arguments,
    write_record,
    write_results,
)
from tki_trainer import TKIConfig, TKITrainer, compute_prior_inputs, embedded_lora_config, load_embedded_model
from tki_trainer.config import prior_input_arguments
from tki_trainer.data import (
    add_query_embeddings,
    balanced_subset,
    fitted_subset,
    group_references,
    load_bigbench,
    load_p3,
    load_sni,
    sni_splits,
)
from tki_trainer.embedded import load_embedded_encoder
from tki_trainer.evaluation.comparison import paired_bootstrap
from tki_trainer.evaluation.heuristics import heuristic_predictions
from tki_trainer.presets import shared_lora_config
from tki_trainer.reinstatement import PriorInputConfig


RUNS = RESULTS / "quality"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MAX_LENGTH = 256
TRAIN_ROWS = 128
VALIDATION_TASKS = 6
VALIDATION_PROMPTS = 48
SNI_TEST_PROMPTS = 96
SNI_LARGE_PROMPTS = 288
"""Up to 24 per category of the 12 SNI test categories."""
P3_PROMPTS = 60
P3_NLL_ROWS = 480
"""P3 held-out rows scored by likelihood: every row (about 6,200) would take over an hour per model on 2 CPU cores."""
BIGBENCH_TASKS = (
    "tense",
    "object_counting",
    "word_unscrambling",
    "sports_understanding",
    "date_understanding",
    "similarities_abstraction",
)
BIGBENCH_PER_TASK = 10
BATCH = 4
EPOCHS = 3
LEARNING_RATES = (1e-4, 3e-4)
SEEDS = (0, 1, 2)
NEFTUNE_ALPHA = 5.0
"""The value TRL's documentation shows for ``neftune_noise_alpha``."""
TEST_SETS = {"sni": "category", "p3": "cluster", "bigbench": "task"}
"""Test set -> the column results are reported (and generation batched) by."""
CURVE_SETS = {"validation": "task", "sni": "category"}
LARGE_SETS = {"sni_large": "category"}
"""Greedy answers on more SNI test prompts, for the rows eqs. 5-6 as written are compared with."""
NLL_SETS = {"nll_sni": "category", "nll_p3": "cluster"}
"""Mean token NLL of the reference answer: every SNI test row that fits MAX_LENGTH, and P3_NLL_ROWS P3 rows."""
STAGE1_READINGS = {
    "embedded": replace(STAGE1, wasserstein_weight=1.0),
    "paper": replace(PriorInputConfig.paper(), wasserstein_weight=1.0),
    "away": STAGE1,
}
"""KR stage 1 with the Wasserstein term keeping q near the prompt, at the embedded preset's steps and rate (the
earlier default) and at the paper's (3 steps at lr 5e-6, which barely moves q); and as eq. 5 is written, pushing q
away from the prompt (the embedded preset's setting now), so that q is another input that still yields the
target."""
TRAINING_LOGS = (
    "loss_sft",
    "loss_reinst",
    "reinst_gap",
    "reinst_q_win_rate",
    "pcgrad_conflict_rate",
    "pcgrad_cosine",
    "latent_usage_entropy",
)


@dataclass(frozen=True)
class Method:
    """One row of the table: what trains it (`trl.SFTTrainer`, `TKITrainer` or nothing) and how."""

    label: str
    trainer: str | None = None
    switches: dict = field(default_factory=dict)
    sft_args: dict = field(default_factory=dict)
    matched_rank: bool = False
    random_routing: bool = False
    stage1: str = "embedded"
    """The `STAGE1_READINGS` entry its prior inputs come from (KR rows)."""


HARDER = "harder"
"""The reading the first KR rows were trained under: eq. 6 without its minus sign."""
ALL_ON = dict(lta=True, kr=True, pcgrad=True, reinstatement_target=HARDER)
AS_WRITTEN = dict(reinstatement_target="easier")
METHODS = {
    "base": Method("base model"),
    "copy_demo": Method("copy demo (SNI heuristic)"),
    "sft": Method("LoRA SFT", "sft"),
    "tki": Method("TKI", "tki", ALL_ON),
    "sft_neftune": Method(
        f"SFT + NEFTune (alpha {NEFTUNE_ALPHA:g})", "sft", sft_args={"neftune_noise_alpha": NEFTUNE_ALPHA}
    ),
    "tki_no_kr": Method("LTA only (TKI without KR)", "tki", dict(lta=True, kr=False, pcgrad=False)),
    "tki_no_lta": Method(
        "KR only (TKI without LTA)", "tki", dict(lta=False, kr=True, pcgrad=True, reinstatement_target=HARDER)
    ),
    "tki_random_routing": Method("TKI, random routing", "tki", ALL_ON, random_routing=True),
    "sft_matched": Method("LoRA SFT, TKI's parameters per example", "sft", matched_rank=True),
    "sft_dft": Method("SFT + DFT (loss_type='dft')", "sft", sft_args={"loss_type": "dft"}),
    "tki_no_pcgrad": Method(
        "TKI without PCGrad", "tki", dict(lta=True, kr=True, pcgrad=False, reinstatement_target=HARDER)
    ),
    "tki_literal": Method("TKI, eqs. 5-6 as written", "tki", {**ALL_ON, **AS_WRITTEN}, stage1="away"),
    "kr_literal": Method(
        "KR only, eqs. 5-6 as written", "tki", dict(lta=False, kr=True, pcgrad=True, **AS_WRITTEN), stage1="away"
    ),
}
"""In the order the table is filled when time runs short (the issue's order)."""
TRAINED = tuple(name for name, method in METHODS.items() if method.trainer)
CURVE_METHODS = ("sft", "tki")
"""Methods whose SNI test score is measured after every epoch (the learning curves)."""
LARGE_METHODS = ("base", "sft", "sft_neftune", "tki", "tki_no_lta", "tki_literal", "kr_literal")
"""Rows also scored on `LARGE_SETS` and `NLL_SETS`: eqs. 5-6 as written and what they are compared with."""
LITERAL_PAIRS = (
    ("tki_literal", "sft"),
    ("tki_literal", "sft_neftune"),
    ("tki_literal", "tki"),
    ("kr_literal", "sft"),
    ("kr_literal", "tki_no_lta"),
    ("tki_literal", "kr_literal"),
)
"""The differences the page reports for eqs. 5-6 as written, on every larger set."""
SETTINGS = {
    "max_length": MAX_LENGTH,
    "train_rows": TRAIN_ROWS,
    "validation_tasks": VALIDATION_TASKS,
    "validation_prompts": VALIDATION_PROMPTS,
    "sni_test_prompts": SNI_TEST_PROMPTS,
    "p3_prompts": P3_PROMPTS,
    "bigbench_tasks": BIGBENCH_TASKS,
    "bigbench_per_task": BIGBENCH_PER_TASK,
    "batch": BATCH,
    "epochs": EPOCHS,
    "neftune_noise_alpha": NEFTUNE_ALPHA,
}
"""What a saved run was made with besides its own configuration: a run saved under other settings is redone."""


class Data:
    """The fixed splits, fitted into MAX_LENGTH tokens, with query embeddings; ``fits`` says how prompts were cut."""

    def __init__(self, tokenizer, work_dir: Path, bigbench: Path | None) -> None:
        splits = sni_splits(SNI, VALIDATION_TASKS, seed=0)
        self.fits: dict[str, dict] = {}

        def fitted(name: str, rows: Dataset, column: str | None = None, total: int | None = None) -> Dataset:
            rows, report = fitted_subset(rows, tokenizer, MAX_LENGTH, column=column, total=total, seed=0)
            self.fits[name] = asdict(report)
            return rows

        def sni(split: str, column: str, total: int | None) -> Dataset:
            return fitted(split, load_sni(SNI, splits[split]), column, total)

        p3 = fitted("p3", group_references(load_p3(P3 / "heldout.jsonl.gz", seed=0)))
        sets = {
            "train": sni("train", "task", TRAIN_ROWS),
            "validation": sni("validation", "task", VALIDATION_PROMPTS),
            "sni": sni("test", "category", SNI_TEST_PROMPTS),
            "p3": balanced_subset(p3, "cluster", P3_PROMPTS, seed=0),
            "sni_large": sni("test", "category", SNI_LARGE_PROMPTS),
            "nll_sni": sni("test", "category", None),
            "nll_p3": balanced_subset(p3, "cluster", P3_NLL_ROWS, seed=0),
        }
        if bigbench is not None:
            rows = load_bigbench(bigbench, BIGBENCH_TASKS, max_examples=BIGBENCH_PER_TASK)
            sets["bigbench"] = fitted("bigbench", rows)
        encoder = load_embedded_encoder()
        sets = {
            name: add_query_embeddings(rows, encoder, cache_dir=work_dir / "queries") for name, rows in sets.items()
        }
        self.train = sets.pop("train")
        self.eval = sets


def random_queries(dataset: Dataset, seed: int) -> Dataset:
    """The rows with each query embedding replaced by a seeded random unit vector: retrieval then ignores what the
    prompt says, and the bank, its training and its blending stay as they are."""
    width = len(dataset[0]["query_embedding"])
    queries = F.normalize(torch.randn(len(dataset), width, generator=torch.Generator().manual_seed(seed)), dim=1)
    return dataset.remove_columns("query_embedding").add_column("query_embedding", queries.tolist())


def linear_widths(model: nn.Module) -> dict[str, int]:
    """``in + out`` features of every linear layer but the output head (PEFT's "all-linear"): a rank-r LoRA on
    a layer holds r times that many parameters."""
    head = model.get_output_embeddings()
    return {
        name: module.in_features + module.out_features
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head
    }


def parameters_per_example(model: nn.Module) -> dict[str, int]:
    """Trainable parameters one example's forward uses: the r=8 shared LoRA alone (SFT), that plus its top-k latent
    LoRAs (TKI), and the rank of a plain all-linear LoRA that comes closest to TKI's count."""
    widths = linear_widths(model)
    tki = embedded_lora_config()
    shared = tki.r * sum(widths.values())
    latent = tki.latent_r * sum(
        w for name, w in widths.items() if name.rsplit(".", 1)[-1] in tki.latent_target_modules
    )
    per_example = shared + tki.top_k * latent
    rank = round(per_example / sum(widths.values()))
    return {"sft": shared, "tki": per_example, "matched_rank": rank, "matched": rank * sum(widths.values())}


def every_epoch(test: str) -> tuple[str, ...]:
    """The evaluation pieces of ``test`` after each epoch: ``test@1``, ... and ``test`` itself (the final model)."""
    return (*(f"{test}@{epoch}" for epoch in range(1, EPOCHS)), test)


def run_name(method: str, lr: float, seed: int, reading: str | None = None) -> str:
    """``reading``: a stage-1 reading other than the method's own, which the name then carries."""
    suffix = "" if reading in (None, METHODS[method].stage1) else f"-{reading}"
    return f"{method}-lr{lr:g}-s{seed}{suffix}"


def saved(name: str, runs: Path = RUNS) -> dict:
    return read_record(runs / f"{name}.json")


def save_record(name: str, record: dict, runs: Path = RUNS) -> None:
    write_record(runs / f"{name}.json", record)


class Bench:
    """The data, the stage-1 stores (made when a run first needs one) and the work folder of one invocation."""

    def __init__(self, work_dir: Path, bigbench: str | None, runs: Path = RUNS, with_bigbench: bool = True) -> None:
        self.work_dir, self.runs = work_dir, runs
        work_dir.mkdir(parents=True, exist_ok=True)
        runs.mkdir(parents=True, exist_ok=True)
        model, tokenizer = load_embedded_model()
        self.parameters = parameters_per_example(model)
        self.data = Data(tokenizer, work_dir, bigbench_source(work_dir, bigbench) if with_bigbench else None)
        self.stores: dict[str, Path] = {}

    def store(self, reading: str) -> Path:
        """The prior-input store of one stage-1 reading, computed once (resumable) with its summary saved."""
        if reading not in self.stores:
            model, tokenizer = load_embedded_model()
            started = time.time()
            store = compute_prior_inputs(
                model.to(DEVICE),
                tokenizer,
                self.data.train,
                self.work_dir / f"prior_inputs-{reading}",
                config=STAGE1_READINGS[reading],
                max_length=MAX_LENGTH,
            )
            summary_file = self.runs / f"stage1-{reading}.json"
            if not summary_file.is_file():
                summary = {**store.summary(), "seconds": time.time() - started, **STAGE1_READINGS[reading].to_dict()}
                summary_file.write_text(json.dumps(summary, indent=1) + "\n")
            self.stores[reading] = store.path
        return self.stores[reading]

    def train(self, name: str, method: str, lr: float, seed: int, reading: str) -> dict:
        """Train one configuration, saving its adapter after every epoch; return what training logged."""
        spec = METHODS[method]
        output_dir = self.work_dir / "runs" / name
        shutil.rmtree(output_dir, ignore_errors=True)
        model, tokenizer = load_embedded_model()
        args = training_arguments(
            output_dir,
            learning_rate=lr,
            seed=seed,
            per_device_train_batch_size=BATCH,
            num_train_epochs=EPOCHS,
            max_length=MAX_LENGTH,
            save_strategy="epoch",
            save_only_model=True,
            **spec.sft_args,
        )
        if spec.trainer == "sft":
            peft_config = shared_lora_config("embedded")
            if spec.matched_rank:
                rank = self.parameters["matched_rank"]
                peft_config = shared_lora_config(
                    "embedded", r=rank, lora_alpha=peft_config.lora_alpha * rank // peft_config.r
                )
            trainer = SFTTrainer(
                model,
                args=SFTConfig(**args),
                train_dataset=self.data.train.select_columns(["prompt", "completion"]),
                processing_class=tokenizer,
                peft_config=peft_config,
            )
        else:
            kr = spec.switches["kr"]
            config = TKIConfig(
                **args,
                **spec.switches,
                prior_inputs_dir=str(self.store(reading)) if kr else None,
                **prior_input_arguments(STAGE1_READINGS[reading]),
            )
            rows = random_queries(self.data.train, seed) if spec.random_routing else self.data.train
            peft_config = embedded_lora_config() if spec.switches["lta"] else shared_lora_config("embedded")
            trainer = TKITrainer(
                model, args=config, train_dataset=rows, processing_class=tokenizer, peft_config=peft_config
            )
        started = time.time()
        trainer.train()
        return {
            "seconds": time.time() - started,
            "steps": trainer.state.global_step,
            "steps_per_epoch": trainer.state.global_step // EPOCHS,
            "trainable_parameters": trainer.model.get_nb_trainable_parameters()[0],
            "log_history": trainer.state.log_history,
        }

    def checkpoint(self, name: str, epoch: int) -> Path:
        checkpoints = sorted(
            (self.work_dir / "runs" / name).glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1])
        )
        return checkpoints[epoch - 1] if len(checkpoints) == EPOCHS else Path("missing")

    def ensure(self, method: str, lr: float, seed: int, pieces: tuple[str, ...], reading: str | None = None) -> dict:
        """Run whatever of training and the evaluation ``pieces`` (``"sni"``: the final model on the SNI test set,
        ``"sni@1"``: the model after epoch 1) this configuration lacks, saving each as it ends."""
        reading = reading or METHODS[method].stage1
        name = run_name(method, lr, seed, reading)
        config = as_json(
            {"method": method, "learning_rate": lr, "seed": seed, "stage1": reading, "settings": SETTINGS}
        )
        record = saved(name, self.runs)
        if record.get("config") != config or "same_as" in record:
            record = {"config": config}
        missing = [piece for piece in pieces if piece not in record.get("eval", {})]
        if not missing:
            return record
        trained = METHODS[method].trainer is not None
        if trained and ("train" not in record or not self.checkpoint(name, EPOCHS).is_dir()):
            print(f"== training {name}", flush=True)
            record["train"] = self.train(name, method, lr, seed, reading)
            # Every piece is redone on the retrained model, except those whose test set this invocation did not load
            # (BIG-bench under --no_bigbench): they keep their result, training being reproducible (--reproduce).
            earlier = record.get("eval", {})
            missing = sorted({*(piece for piece in earlier if self.loaded(piece)), *pieces})
            record["eval"] = {piece: result for piece, result in earlier.items() if not self.loaded(piece)}
            save_record(name, record, self.runs)
        by_epoch = defaultdict(list)
        for piece in missing:
            test, _, epoch = piece.partition("@")
            by_epoch[int(epoch or EPOCHS)].append((piece, test))
        for epoch, wanted in sorted(by_epoch.items()):
            model, tokenizer = load_embedded_model()
            if trained:
                model = PeftModel.from_pretrained(model, str(self.checkpoint(name, epoch)))
            model.to(DEVICE).eval()
            for piece, test in wanted:
                print(f"== evaluating {name} on {piece}", flush=True)
                rows = self.data.eval[test]
                if METHODS[method].random_routing:
                    rows = random_queries(rows, 1000 + seed)
                started = time.time()
                if test in NLL_SETS:
                    result = likelihood(model, tokenizer, rows, NLL_SETS[test], MAX_LENGTH)
                else:
                    result = evaluate(model, tokenizer, rows, {**TEST_SETS, **CURVE_SETS, **LARGE_SETS}[test])
                record.setdefault("eval", {})[piece] = {**result, "seconds": time.time() - started}
                save_record(name, record, self.runs)
        return record

    def loaded(self, piece: str) -> bool:
        """Whether this invocation holds the test set of an evaluation piece (``"sni@1"``: the SNI test set)."""
        return piece.partition("@")[0] in self.data.eval

    def copy_demo(self) -> None:
        """SNI's copy-demo heuristic on the SNI test prompts, scored like a model (the other sets have no demo)."""
        if saved("copy_demo", self.runs):
            return
        rows = self.data.eval["sni"]
        answers = heuristic_predictions(rows, "copy_demo")
        config = {"method": "copy_demo", "learning_rate": 0.0, "seed": 0, "stage1": "embedded", "settings": SETTINGS}
        record = {"config": as_json(config), "eval": {"sni": scored(answers, rows, "category")}}
        save_record("copy_demo", record, self.runs)


def bigbench_source(work_dir: Path, given: str | None) -> Path:
    """The bigbench==1.0.0 sdist, read in place (downloaded from PyPI when not given)."""
    if given:
        return Path(given)
    found = sorted(work_dir.glob("bigbench-1.0.0.tar.gz"))
    if not found:
        download = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "bigbench==1.0.0"]
        subprocess.run([*download, "-d", str(work_dir)], check=True)
        found = sorted(work_dir.glob("bigbench-1.0.0.tar.gz"))
    return found[0]


def chosen_rate(runs: dict[str, dict], method: str) -> float | None:
    """The learning rate with the best validation ROUGE-L after the last epoch at seed 0 (0 for a row without
    training; None until the search has finished)."""
    if METHODS[method].trainer is None:
        return 0.0
    scores = {}
    for lr in LEARNING_RATES:
        record = resolved(runs, run_name(method, lr, 0))
        if "validation" in record.get("eval", {}):
            scores[lr] = record["eval"]["validation"]["all"]["rougeL"]
    return max(scores, key=scores.get) if len(scores) == len(LEARNING_RATES) else None


def stand_in(method: str, lr: float, seed: int, runs: Path = RUNS) -> str | None:
    """TKI's run at the same rate and seed, when ``method`` is TKI without PCGrad and PCGrad found no conflict in that
    run (the logged rate averages every step of its window, so a maximum of 0 covers every step): it then never
    changed a gradient, and the two runs take the same updates up to float rounding (one summed backward against
    two gradients summed)."""
    if method != "tki_no_pcgrad":
        return None
    name = run_name("tki", lr, seed)
    logs = saved(name, runs).get("train", {}).get("log_history", [])
    rates = [entry["pcgrad_conflict_rate"] for entry in logs if "pcgrad_conflict_rate" in entry]
    return name if rates and max(rates) == 0 else None


def ensure_or_stand_in(bench: Bench, method: str, lr: float, seed: int, pieces: tuple[str, ...]) -> None:
    same = stand_in(method, lr, seed, bench.runs)
    if same is None:
        bench.ensure(method, lr, seed, pieces)
    else:
        reading = METHODS[method].stage1
        config = as_json(
            {"method": method, "learning_rate": lr, "seed": seed, "stage1": reading, "settings": SETTINGS}
        )
        save_record(run_name(method, lr, seed), {"config": config, "same_as": same}, bench.runs)


def run(bench: Bench, methods: list[str], seeds: list[int], readings: bool) -> None:
    # A set this invocation did not load (BIG-bench under --no_bigbench) keeps what an earlier one recorded.
    earlier = read_record(bench.runs / "data.json")
    sizes = {name: len(rows) for name, rows in bench.data.eval.items()} | {"train": len(bench.data.train)}
    data = {
        "fits": earlier.get("fits", {}) | bench.data.fits,
        "sizes": earlier.get("sizes", {}) | sizes,
        "parameters_per_example": bench.parameters,
    }
    write_record(bench.runs / "data.json", data)
    tests = tuple(test for test in TEST_SETS if test in bench.data.eval)
    larger = (*LARGE_SETS, *NLL_SETS)
    bench.ensure("base", 0.0, 0, (*tests, "validation", *larger))
    bench.copy_demo()
    for method in methods:
        for lr in LEARNING_RATES:
            ensure_or_stand_in(bench, method, lr, 0, every_epoch("validation"))
        rate = chosen_rate(finished_runs(bench.runs), method)
        pieces = (*tests, *every_epoch("sni")) if method in CURVE_METHODS else tests
        pieces = (*pieces, *larger) if method in LARGE_METHODS else pieces
        for seed in seeds:
            ensure_or_stand_in(bench, method, rate, seed, tuple(dict.fromkeys(pieces)))
    if readings and "tki" in methods:
        rate = chosen_rate(finished_runs(bench.runs), "tki")
        for reading in STAGE1_READINGS:
            bench.ensure("tki", rate, 0, every_epoch("validation"), reading)


def reproduce(name: str, work_dir: Path, bigbench: str | None) -> None:
    """Retrain one saved configuration from nothing, in its own work dir (stage 1 included when it uses KR), into
    ``quality/reproduced/``; the report compares the two on the SNI test set."""
    config = saved(name).get("config")
    if config is None or "sni" not in saved(name).get("eval", {}):
        raise SystemExit(f"quality.py: no finished run {name!r} in {RUNS} to reproduce.")
    bench = Bench(work_dir / "reproduce", str(bigbench_source(work_dir, bigbench)), RUNS / "reproduced")
    bench.ensure(config["method"], config["learning_rate"], config["seed"], ("sni",), config["stage1"])


# Report ------------------------------------------------------------------------------------------------------------


def finished_runs(runs: Path = RUNS) -> dict[str, dict]:
    return {
        path.stem: json.loads(path.read_text())
        for path in sorted(runs.glob("*.json"))
        if not path.stem.startswith(("data", "stage1"))
    }


def resolved(runs: dict[str, dict], name: str) -> dict:
    """A run of ``runs``, or the run it stands for (see `stand_in`)."""
    record = runs.get(name, {})
    return runs.get(record.get("same_as"), record)


def rows_of(runs: dict[str, dict], method: str, test: str, trained_only: bool = False) -> dict[int, dict]:
    """Seed -> the result on ``test`` of ``method`` at its chosen rate with the default stage 1 (a run that stands
    for another gives that run's result, unless ``trained_only``)."""
    rate = chosen_rate(runs, method)
    found = {}
    for name, record in runs.items():
        config = record["config"]
        if (config["method"], config["learning_rate"], config["stage1"]) != (method, rate, METHODS[method].stage1):
            continue
        if trained_only and "same_as" in record:
            continue
        result = resolved(runs, name).get("eval", {}).get(test)
        if result is not None:
            found[config["seed"]] = result
    return dict(sorted(found.items()))


def per_example(results: dict[int, dict], metric: str = "rougeL") -> np.ndarray:
    return np.array([result["per_example"][metric] for result in results.values()])


def common_seeds(runs: dict[str, dict], a: str, b: str, test: str) -> tuple[dict[int, dict], dict[int, dict]]:
    """The results of ``a`` and ``b`` on ``test`` at the seeds both were trained at (a seed where one row stands in
    for the other would pair a model with itself), checked to score the same prompts."""
    first, second = rows_of(runs, a, test, trained_only=True), rows_of(runs, b, test, trained_only=True)
    common = sorted(set(first) & set(second))
    first, second = {s: first[s] for s in common}, {s: second[s] for s in common}
    check_same_prompts(first, second, a, b, test)
    return first, second


def check_same_prompts(first: dict[int, dict], second: dict[int, dict], a: str, b: str, test: str) -> None:
    if first and second and next(iter(first.values()))["ids"] != next(iter(second.values()))["ids"]:
        raise ValueError(f"{a} and {b} were scored on different {test} prompts: rerun them under the same settings.")


def compare(runs: dict[str, dict], a: str, b: str, test: str, metric: str = "rougeL") -> dict | None:
    """``a`` − ``b`` on ``test`` in ``metric``, paired by example and, when both are trained, by their common seeds (a
    row without training has one result, against which ``a``'s seeds are resampled)."""
    paired = bool(METHODS[a].trainer and METHODS[b].trainer)
    if paired:
        first, second = common_seeds(runs, a, b, test)
    else:
        first, second = rows_of(runs, a, test), rows_of(runs, b, test)
        check_same_prompts(first, second, a, b, test)
    if not first or not second:
        return None
    result = paired_bootstrap(per_example(first, metric), per_example(second, metric), paired_seeds=paired).to_dict()
    return {**result, "a": a, "b": b, "test": test, "metric": metric, "seeds": sorted(first) if paired else None}


def same_answers(runs: dict[str, dict], a: str, b: str, test: str) -> dict | None:
    """How many of ``test``'s prompts ``a`` and ``b`` answer identically at the same seed, over the seeds both were
    trained at: two rows that score alike may be the same model (e.g. when one loss only rescales the other's
    gradient)."""
    first, second = common_seeds(runs, a, b, test)
    if not first:
        return None
    same = sum(x == y for s in first for x, y in zip(first[s]["answers"], second[s]["answers"], strict=True))
    return {"same": same, "of": sum(len(first[s]["answers"]) for s in first), "seeds": sorted(first)}


def literal_reading(runs: dict[str, dict]) -> dict:
    """Eqs. 5-6 as written against the rows they are compared with, on the larger sets: each row's mean per seed,
    the paired differences (ROUGE-L on the larger SNI set; the reference answer's NLL, lower is better) and how
    many greedy answers each row shares with LoRA SFT."""
    tests = {**{test: "rougeL" for test in LARGE_SETS}, **{test: "nll" for test in NLL_SETS}}
    means = {
        method: {
            test: [r["all"][metric] for r in rows_of(runs, method, test).values()] for test, metric in tests.items()
        }
        for method in LARGE_METHODS
    }
    comparisons = {
        f"{a}_minus_{b}_{test}": found
        for a, b in LITERAL_PAIRS
        for test, metric in tests.items()
        if (found := compare(runs, a, b, test, metric)) is not None
    }
    agreement = {
        f"{a}_{b}": found
        for a, b in (*((m, "sft") for m in LARGE_METHODS if m not in ("base", "sft")), ("tki_literal", "tki"))
        for test in LARGE_SETS
        if (found := same_answers(runs, a, b, test)) is not None
    }
    return {"means": means, "comparisons": comparisons, "same_answers": agreement}


def literal_markdown(literal: dict, sizes: dict) -> list[str]:
    """The page's section on eqs. 5-6 as written."""
    means = {method: values for method, values in literal["means"].items() if any(values.values())}
    if not means:
        return []
    lines = [
        "",
        "## Eqs. 5-6 as written",
        "",
        "TKI and KR only with both equations read as written (stage 1 pushes q away from the prompt, Wasserstein "
        "weight -1; each example trains through whichever of its prompt and prior input already gives the target "
        "more easily), beside the rows they are compared with. SNI large = greedy answers on "
        f"{sizes.get('sni_large', SNI_LARGE_PROMPTS)} SNI test prompts (ROUGE-L); NLL = mean token negative "
        "log-likelihood of the reference answer (lower is better) on every SNI test row that fits "
        f"({sizes.get('nll_sni', '')}) and on {sizes.get('nll_p3', P3_NLL_ROWS)} P3 held-out rows, one forward per row.",
        "",
        "| method | seeds | SNI large R-L | SNI NLL | P3 NLL |",
        "|---|---|---|---|---|",
    ]
    for method, values in means.items():
        seeds = max(len(v) for v in values.values())
        cells = [mean_sd(values["sni_large"])] + [
            f"{np.mean(values[t]):.3f}" + (f" ± {np.std(values[t], ddof=1):.3f}" if len(values[t]) > 1 else "")
            if values[t]
            else "–"
            for t in NLL_SETS
        ]
        counts = [len(values["sni_large"]), *(len(values[t]) for t in NLL_SETS)]
        cells = [f"{cell} ({n} of {seeds} seeds)" if 0 < n < seeds else cell for cell, n in zip(cells, counts)]
        lines.append(f"| {METHODS[method].label} | {seeds} | " + " | ".join(cells) + " |")
    if literal["comparisons"]:
        lines += [
            "",
            "Paired differences (a − b; by example and by the seeds both rows were trained at; for NLL a negative "
            "difference means a gives the reference answer a higher likelihood). A verdict needs the 95% interval to "
            "exclude 0; at one seed it speaks for that seed alone.",
            "",
            "| a − b | measure | difference | 95% interval | seeds | verdict |",
            "|---|---|---|---|---|---|",
        ]
        for c in literal["comparisons"].values():
            better = c["low"] > 0 if c["metric"] == "rougeL" else c["high"] < 0
            worse = c["high"] < 0 if c["metric"] == "rougeL" else c["low"] > 0
            winner = c["a"] if better else c["b"] if worse else None
            verdict = f"{METHODS[winner].label} better" if winner else "unresolved"
            measure = (
                "SNI large R-L" if c["metric"] == "rougeL" else {"nll_sni": "SNI NLL", "nll_p3": "P3 NLL"}[c["test"]]
            )
            digits = 2 if c["metric"] == "rougeL" else 4
            lines.append(
                f"| {METHODS[c['a']].label} − {METHODS[c['b']].label} | {measure} | {c['difference']:+.{digits}f} | "
                f"[{c['low']:+.{digits}f}, {c['high']:+.{digits}f}] | {', '.join(map(str, c['seeds'] or []))} | "
                f"{verdict} |"
            )
    if literal["same_answers"]:
        lines += ["", "Identical greedy answers on SNI large at the same seed:", ""]
        lines += ["| a | b | identical |", "|---|---|---|"]
        for key, found in literal["same_answers"].items():
            a, b = next((a, b) for a in METHODS for b in METHODS if f"{a}_{b}" == key)
            lines.append(f"| {METHODS[a].label} | {METHODS[b].label} | {found['same']} of {found['of']} |")
    return lines


def by_epoch(record: dict) -> dict[int, dict[str, float]]:
    """Each logged training quantity averaged over the steps of each epoch."""
    logged: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for entry in record["train"]["log_history"]:
        if "epoch" in entry and any(key in entry for key in TRAINING_LOGS):
            epoch = min(EPOCHS, max(1, int(np.ceil(entry["epoch"] - 1e-6))))
            for key in TRAINING_LOGS:
                if key in entry:
                    logged[epoch][key].append(entry[key])
    return {epoch: {key: float(np.mean(v)) for key, v in values.items()} for epoch, values in sorted(logged.items())}


def curve(record: dict, test: str) -> list[float | None]:
    """ROUGE-L on ``test`` after each epoch (None where that piece was not evaluated)."""
    return [record.get("eval", {}).get(piece, {}).get("all", {}).get("rougeL") for piece in every_epoch(test)]


def report() -> None:
    runs = finished_runs(RUNS)
    data = json.loads((RUNS / "data.json").read_text()) if (RUNS / "data.json").is_file() else {}
    present = [method for method in METHODS if any(rows_of(runs, method, test) for test in TEST_SETS)]
    table_rows = []
    for method in present:
        seeds = sorted({s for test in TEST_SETS for s in rows_of(runs, method, test)})
        rate = chosen_rate(runs, method)
        stood_in = [
            r["config"]["seed"]
            for r in runs.values()
            if "same_as" in r and (r["config"]["method"], r["config"]["learning_rate"]) == (method, rate)
        ]
        row = {"method": method, "label": METHODS[method].label, "seeds": seeds, "stood_in": sorted(stood_in)}
        for test in TEST_SETS:
            results = rows_of(runs, method, test)
            row[test] = [r["all"]["rougeL"] for r in results.values()]
            row[f"{test}_exact_match"] = [r["all"]["exact_match"] for r in results.values()]
        tested = [r for r in runs.values() if r["config"]["method"] == method and "train" in r and "sni" in r["eval"]]
        minutes = [(r["train"]["seconds"] + sum(e["seconds"] for e in r["eval"].values())) / 60 for r in tested]
        row["minutes"] = float(np.mean(minutes)) if minutes else None
        table_rows.append(row)
    trained = [method for method in present if METHODS[method].trainer]
    pairs = [("tki", other) for other in present if other != "tki"]
    pairs += [(method, "sft") for method in trained if method not in ("sft", "tki")]
    comparisons = {
        f"{a}_minus_{b}_{test}": found
        for a, b in pairs
        for test in TEST_SETS
        if (found := compare(runs, a, b, test)) is not None
    }
    agreement = [
        {"a": a, "b": b, "tests": tests}
        for b in ("sft", "tki")
        for a in trained
        if a not in ("sft", b)
        and (tests := {t: found for t in TEST_SETS if (found := same_answers(runs, a, b, t)) is not None})
    ]
    mechanisms = {
        name: {"by_epoch": by_epoch(record), "validation": curve(record, "validation")}
        for name, record in runs.items()
        if record["config"]["method"] in ("tki", "tki_random_routing", "tki_no_lta", "tki_literal", "kr_literal")
        and record["config"]["seed"] == 0
        and "train" in record
    }
    curves = {
        name: {"sni": curve(record, "sni"), "validation": curve(record, "validation"), **record["config"]}
        for name, record in runs.items()
        if "train" in record
    }
    stage1 = {
        path.stem.removeprefix("stage1-"): json.loads(path.read_text()) for path in sorted(RUNS.glob("stage1-*.json"))
    }
    reproduced = reproductions(runs)
    literal = literal_reading(runs)
    table = markdown(table_rows, comparisons, agreement, mechanisms, stage1, curves, reproduced, data)
    table += "\n".join(["", *literal_markdown(literal, data.get("sizes", {}))])
    payload = {
        "rows": table_rows,
        "comparisons": comparisons,
        "same_answers": agreement,
        "mechanisms": mechanisms,
        "curves": curves,
        "stage1": stage1,
        "reproductions": reproduced,
        "literal_reading": literal,
        "data": data,
        "runs": {
            name: {
                "config": r["config"],
                "same_as": r.get("same_as"),
                "train_seconds": r.get("train", {}).get("seconds"),
                "eval": {
                    k: {"all": v["all"], "by_group": v["by_group"], "seconds": v.get("seconds")}
                    for k, v in r.get("eval", {}).items()
                },
            }
            for name, r in runs.items()
        },
        "settings": {
            **SETTINGS,
            "learning_rates": LEARNING_RATES,
            "seeds": SEEDS,
            "stage1_readings": {name: config.to_dict() for name, config in STAGE1_READINGS.items()},
            "tki": embedded_lora_config().to_dict(),
            "device": DEVICE,
        },
    }
    write_results("quality", payload, table)
    plot_curves(curves)
    print(table)


def markdown(rows, comparisons, agreement, mechanisms, stage1, curves, reproduced, data) -> str:
    sizes = data.get("sizes", {})
    lines = [
        f"Unseen tasks, embedded SmolLM2-135M, greedy answers, ROUGE-L x100 (mean ± sd over seeds). Trained {EPOCHS} "
        f"epochs on {sizes.get('train', TRAIN_ROWS)} rows of the SNI train tasks; learning rate per method chosen on "
        f"{sizes.get('validation', VALIDATION_PROMPTS)} prompts of {VALIDATION_TASKS} validation tasks (seed 0). Test "
        f"sets: SNI = {sizes.get('sni', SNI_TEST_PROMPTS)} prompts of the SNI test tasks (unseen tasks, 12 categories); "
        f"P3 = {sizes.get('p3', P3_PROMPTS)} prompts of the P3 held-out clusters; BIG-bench = "
        f"{sizes.get('bigbench', '')} prompts of {len(BIGBENCH_TASKS)} tasks (out of domain). Produced by "
        "`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python bench/quality.py` (resumable; `--report` "
        "rebuilds this page).",
        "",
        "| method | seeds | SNI R-L | SNI EM | P3 R-L | BIG-bench R-L | minutes per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        minutes = f"{row['minutes']:.0f}" if row["minutes"] else "–"
        cells = [mean_sd(row["sni"]), mean_sd(row["sni_exact_match"]), mean_sd(row["p3"]), mean_sd(row["bigbench"])]
        lines.append(f"| {row['label']} | {len(row['seeds'])} | " + " | ".join(cells) + f" | {minutes} |")
    for row in rows:
        if row["stood_in"]:
            lines += [
                "",
                f"{row['label']} (seeds {', '.join(map(str, row['stood_in']))}): PCGrad found no conflict at any step "
                "of TKI's run at the same rate and seed, so it never changed a gradient and the two take the same "
                "updates up to float rounding; that run stands for this row, which was not trained again.",
            ]
    parameters = data.get("parameters_per_example")
    if parameters:
        lines += [
            "",
            f"Trainable parameters per example: LoRA SFT {parameters['sft']:,}; TKI {parameters['tki']:,} (shared LoRA "
            f"plus its top-k latent LoRAs); the matched LoRA has rank {parameters['matched_rank']} "
            f"({parameters['matched']:,}).",
        ]
    if comparisons:
        lines += [
            "",
            "Differences in ROUGE-L, bootstrap over examples and seeds (paired by seed where both rows are trained; a "
            "row without training is compared with TKI's seeds resampled): TKI minus each row, then each trained row "
            "minus LoRA SFT. A verdict other than 'unresolved' needs the 95% interval to exclude 0; with one seed the "
            "interval holds only the examples' variance, not the training seed's, so such a verdict speaks for that "
            "seed alone. The intervals are not corrected for how many comparisons the page makes: at this many, one "
            "or two of them excluding 0 by a small margin is what chance alone gives.",
        ]
        for tki_first in (True, False):
            chosen = [c for c in comparisons.values() if (c["a"] == "tki") == tki_first]
            if not chosen:
                continue
            lines += ["", "| a − b | test set | difference | 95% interval | seeds paired | verdict |"]
            lines += ["|---|---|---|---|---|---|"]
            for c in chosen:
                winner = {"a better": c["a"], "b better": c["b"]}.get(c["verdict"])
                verdict = f"{METHODS[winner].label} better" if winner else "unresolved"
                if c["seeds"] and len(c["seeds"]) == 1:
                    verdict += " at this seed"
                paired = ", ".join(map(str, c["seeds"])) if c["seeds"] else "no"
                lines.append(
                    f"| {METHODS[c['a']].label} − {METHODS[c['b']].label} | {c['test']} | {c['difference']:+.2f} | "
                    f"[{c['low']:+.2f}, {c['high']:+.2f}] | {paired} | {verdict} |"
                )
        baselines = [r for r in rows if METHODS[r["method"]].trainer != "tki" and r["sni"]]
        if baselines and any(r["method"] == "tki" for r in rows):
            best = max(baselines, key=lambda r: np.mean(r["sni"]))
            c = comparisons.get(f"tki_minus_{best['method']}_sni")
            if c:
                met = c["difference"] >= 1.0 and c["low"] > 0
                lines += [
                    "",
                    f"Goal: TKI ahead of the best baseline on the SNI test tasks ({best['label']}) by >= 1.0 ROUGE-L with "
                    f"the interval above 0: **{'met' if met else 'not met'}** ({c['difference']:+.2f}, "
                    f"[{c['low']:+.2f}, {c['high']:+.2f}]).",
                ]
    if agreement:
        lines += [
            "",
            "Identical greedy answers at the same seed (prompt-seed pairs, over the seeds both rows were trained at):",
            "",
            "| a | b | " + " | ".join(TEST_SETS) + " |",
            "|---" * (len(TEST_SETS) + 2) + "|",
        ]
        for pair in agreement:
            tests = pair["tests"]
            cells = [f"{tests[t]['same']} of {tests[t]['of']}" if t in tests else "–" for t in TEST_SETS]
            lines.append(f"| {METHODS[pair['a']].label} | {METHODS[pair['b']].label} | " + " | ".join(cells) + " |")
    if stage1:
        lines += [
            "",
            "KR stage 1 per reading (mean completion CE with the prompt e and with q; |q − e| / |e|; |lam grad W| / "
            "|grad CE| at the last step, where it was recorded: whether the Wasserstein term did anything):",
            "",
        ]
        lines += [
            "| reading | steps | lr | Wasserstein weight | CE(e) | CE(q) | change | W / CE gradient | minutes |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, s in stage1.items():
            ratio = s.get("wasserstein_gradient_ratio")
            lines.append(
                f"| {name} | {s['steps']} | {s['learning_rate']:g} | {s['wasserstein_weight']:g} | {s['ce_initial']:.3f} | "
                f"{s['ce_final']:.3f} | {s['relative_change']:.1e} | {'–' if ratio is None else f'{ratio:.2e}'} | "
                f"{s['seconds'] / 60:.1f} |"
            )
    if mechanisms:
        lines += [
            "",
            "What KR, PCGrad and routing do in training, per epoch (every KR row at seed 0, per stage-1 reading and "
            "learning rate, and TKI with random routing): gap = loss_reinst − loss_sft; via q = share of rows whose "
            "reinstatement term goes through the prior input (the harder input under the first reading, where "
            "otherwise L_reinst repeats the prompt's loss; the easier under eqs. 5-6 as written); conflicts = share "
            "of steps where PCGrad projected; cosine between the two objectives' gradients; usage entropy of the "
            "blend weights per batch (nats); validation ROUGE-L after the epoch.",
            "",
            "| run | epoch | loss_sft | loss_reinst | gap | via q | conflicts | cosine | usage entropy | validation R-L |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, m in mechanisms.items():
            for epoch, values in m["by_epoch"].items():
                cells = [f"{values[k]:.3f}" if k in values else "–" for k in TRAINING_LOGS]
                after = m["validation"][epoch - 1]
                cells.append("–" if after is None else f"{after:.1f}")
                lines.append(f"| {name} | {epoch} | " + " | ".join(cells) + " |")
    searched = {
        name: c for name, c in curves.items() if c["seed"] == 0 and any(v is not None for v in c["validation"])
    }
    if searched:
        lines += ["", "Validation ROUGE-L after each epoch (learning-rate search, seed 0):", ""]
        lines += [
            "| run | " + " | ".join(f"epoch {e}" for e in range(1, EPOCHS + 1)) + " |",
            "|---" * (EPOCHS + 1) + "|",
        ]
        for name, c in searched.items():
            lines.append(f"| {name} | " + " | ".join("–" if v is None else f"{v:.1f}" for v in c["validation"]) + " |")
    for name, r in reproduced.items():
        lines += [
            "",
            f"Rerun of {name} from nothing (`--reproduce {name}`): SNI ROUGE-L {r['rougeL']:.2f} then "
            f"{r['rougeL_reproduced']:.2f}; {r['identical_examples']} of {r['examples']} examples answered identically.",
        ]
    return "\n".join(lines)


def reproductions(runs: dict[str, dict]) -> dict:
    """Each reproduced run against its saved original on the SNI test set."""
    found = {}
    for path in sorted((RUNS / "reproduced").glob("*.json")):
        if path.stem not in runs:
            continue
        again, original = json.loads(path.read_text()), runs[path.stem]
        first, second = original["eval"]["sni"], again["eval"]["sni"]
        found[path.stem] = {
            "rougeL": first["all"]["rougeL"],
            "rougeL_reproduced": second["all"]["rougeL"],
            "identical_examples": sum(a == b for a, b in zip(first["answers"], second["answers"])),
            "examples": len(first["answers"]),
        }
    return found


def plot_curves(curves: dict[str, dict]) -> None:
    """SNI test ROUGE-L after each epoch for the curve methods (line: mean over seeds, dots: seeds), and validation
    ROUGE-L after each epoch for every seed-0 run of the learning-rate search."""
    epochs = np.arange(1, EPOCHS + 1)
    with saved_figure("quality_curves.png", ncols=2, figsize=(12, 4.5)) as (test_axis, validation_axis):
        for method in CURVE_METHODS:
            points = [
                c["sni"]
                for c in curves.values()
                if c["method"] == method
                and c.get("stage1") == METHODS[method].stage1
                and all(v is not None for v in c["sni"])
            ]
            if points:
                values = np.array(points)
                (line,) = test_axis.plot(
                    epochs,
                    values.mean(axis=0),
                    marker="o",
                    label=f"{METHODS[method].label} ({len(values)} seed{'s' if len(values) > 1 else ''})",
                )
                for seed_values in values:
                    test_axis.plot(epochs, seed_values, ".", color=line.get_color(), alpha=0.5)
        test_axis.set(
            xlabel="epoch", ylabel="ROUGE-L", title="SNI test tasks (unseen) after each epoch", xticks=epochs
        )
        test_axis.legend(fontsize=8)
        for name, c in curves.items():
            if c["seed"] == 0 and all(v is not None for v in c["validation"]):
                validation_axis.plot(epochs, c["validation"], marker=".", label=name)
        validation_axis.set(
            xlabel="epoch", ylabel="ROUGE-L", title="Validation tasks after each epoch (seed 0)", xticks=epochs
        )
        validation_axis.legend(fontsize=7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--work_dir", default="outputs/bench-quality", help="Adapters, stage-1 stores, BIG-bench sdist."
    )
    parser.add_argument("--bigbench", help="Path of bigbench-1.0.0.tar.gz (downloaded into work_dir when omitted).")
    parser.add_argument("--methods", nargs="+", choices=TRAINED, default=list(TRAINED), help="Trained rows, in order.")
    parser.add_argument("--seeds", nargs="+", type=int, choices=SEEDS, default=list(SEEDS), help="Seeds to run.")
    parser.add_argument("--no_readings", action="store_true", help="Skip TKI under the other stage-1 readings.")
    parser.add_argument(
        "--no_bigbench", action="store_true", help="Leave BIG-bench out (where its sdist cannot be had); resumable."
    )
    parser.add_argument("--report", action="store_true", help="Only rebuild the table and plots from saved results.")
    parser.add_argument("--reproduce", metavar="RUN", help="Retrain one saved run (e.g. tki-lr0.0001-s0) and compare.")
    args = parser.parse_args()
    if args.reproduce:
        reproduce(args.reproduce, Path(args.work_dir), args.bigbench)
    elif not args.report:
        for path in (SNI / "splits", P3 / "heldout.jsonl.gz"):
            if not path.exists():
                raise SystemExit(f"quality.py: no {path}: the shared data folder must sit beside the repository.")
        bench = Bench(Path(args.work_dir), args.bigbench, with_bigbench=not args.no_bigbench)
        run(bench, args.methods, args.seeds, not args.no_readings)
    report()


if __name__ == "__main__":
    main()
