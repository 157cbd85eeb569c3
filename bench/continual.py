"""Does Joint Flashback Adaptation keep what earlier stages taught while the model learns new tasks?

Three stages, each a P3 train cluster (STAGES), learned one after the other by the embedded model: each stage trains
TRAIN_ROWS rows for EPOCHS epochs starting from the previous stage's adapter. Before the first stage and after each,
every method is scored (greedy answers, ROUGE-L) on the held-out rows of every stage and on P3's held-out clusters
(unseen tasks), which fills the accuracy matrix R[i, j] = score on stage j after training stage i.

Rows:

- sequential LoRA SFT (`trl.SFTTrainer`, the adapter carried from stage to stage);
- SFT with replay: the old stages' flashback rows *with* their targets mixed into each later stage's training rows
  (the upper reference JFA claims to approach, with data JFA does not have);
- sequential LTA: TKI's latent bank without flashbacks (the model JFA is built on; it separates what the bank does
  from what the flashbacks do);
- JFA: LTA plus flashbacks (FLASHBACKS_PER_STAGE prompts of each old stage, the divergence to the model as it was
  before the stage, routed through the bank with the new rows), PCGrad over SFT and flashbacks;
- JFA without joint latent learning: the flashbacks bypass the bank.

Stage 1 has no old stage, so SFT and replay share one stage-1 run, and LTA and both JFA rows another. Every row runs
at the same 3 seeds; the report pairs differences by seed and by example (`paired_bootstrap`). The learning rate is
the one the quality benchmark's search chose for both SFT and TKI (3e-4).

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python bench/continual.py [--methods sft jfa ...]

Each finished piece (a stage's training, its evaluation) is saved at once under ``bench/results/continual/``, so the
command resumes where it stopped; ``--report`` only rebuilds the tables and the plot. Adapters live under
``--work_dir``.
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets
from peft import PeftModel
from trl import SFTConfig, SFTTrainer

from common import (
    P3,
    RESULTS,
    as_json,
    evaluate,
    mean_sd,
    read_record,
    saved_figure,
    write_record,
    write_results,
)
from tki_trainer import TKIConfig, TKITrainer, embedded_lora_config, load_embedded_model
from tki_trainer._io import staged_directory
from tki_trainer.data import add_query_embeddings, balanced_subset, fit_prompts, group_references, load_p3
from tki_trainer.embedded import load_embedded_encoder
from tki_trainer.evaluation.comparison import paired_bootstrap
from tki_trainer.presets import shared_lora_config


RUNS = RESULTS / "continual"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STAGES = ("sentiment", "multiple_choice_qa", "closed_book_qa")
"""P3 train clusters, in the order they are learned."""
MAX_LENGTH = 192
TRAIN_ROWS = 64
EVAL_ROWS = 32
"""Held-out prompts per stage, and of P3's held-out clusters."""
FLASHBACKS_PER_STAGE = 16
"""Old-stage prompts JFA keeps (and rows, with targets, replay keeps) of each earlier stage."""
FLASHBACKS_PER_STEP = 2
ANSWER_TOKENS = 24
"""Generation budget per answer (at most): long references (reviews, wiki answers, bios) are scored on their start."""
PER_TEMPLATE = 8
"""Rows read per prompt template before the subsets are drawn (every template stays represented)."""
BATCH = 4
EPOCHS = 2
LEARNING_RATE = 3e-4
SEEDS = (0, 1, 2)
TESTS = (*(f"stage{stage}" for stage in range(1, len(STAGES) + 1)), "unseen")
SETTINGS = {
    "stages": STAGES,
    "max_length": MAX_LENGTH,
    "train_rows": TRAIN_ROWS,
    "eval_rows": EVAL_ROWS,
    "flashbacks_per_stage": FLASHBACKS_PER_STAGE,
    "flashbacks_per_step": FLASHBACKS_PER_STEP,
    "answer_tokens": ANSWER_TOKENS,
    "per_template": PER_TEMPLATE,
    "batch": BATCH,
    "epochs": EPOCHS,
    "learning_rate": LEARNING_RATE,
}
"""What a saved piece was made with: a piece saved under other settings is redone."""


@dataclass(frozen=True)
class Method:
    """One row: its trainer, what it keeps of the old stages (nothing, their rows, their prompts as flashbacks) and
    whether flashbacks are routed through the bank."""

    label: str
    trainer: str
    old_rows: str | None = None
    routing: bool = True


METHODS = {
    "sft": Method("sequential LoRA SFT", "sft"),
    "jfa": Method("JFA", "tki", "flashbacks"),
    "replay": Method("SFT + replay (old rows with targets)", "sft", "replay"),
    "jfa_no_jtl": Method("JFA without joint latent learning", "tki", "flashbacks", routing=False),
    "lta": Method("sequential LTA (no flashbacks)", "tki"),
}
"""In the order they run."""


def trained_as(method: str, stage: int) -> str:
    """The run that holds ``method``'s model after ``stage``: at stage 1 nothing old exists, so every method of the
    same trainer is one model (SFT's, or LTA's)."""
    if stage > 1:
        return method
    return {"sft": "sft", "tki": "lta"}[METHODS[method].trainer]


def piece_name(run: str, seed: int, stage: int) -> str:
    return "base" if stage == 0 else f"{run}-s{seed}-stage{stage}"


class Data:
    """Per stage: training rows, held-out rows and the flashback rows (a subset of the training rows); the unseen
    clusters' rows; all fitted into MAX_LENGTH tokens, with query embeddings."""

    def __init__(self, tokenizer, work_dir: Path) -> None:
        encoder = load_embedded_encoder()

        def embedded(rows: Dataset) -> Dataset:
            return add_query_embeddings(rows, encoder, cache_dir=work_dir / "queries")

        self.train: dict[int, Dataset] = {}
        self.flashbacks: dict[int, Dataset] = {}
        self.tests: dict[str, Dataset] = {}
        self.fits: dict[str, dict] = {}
        for stage, cluster in enumerate(STAGES, 1):
            rows = load_p3(P3 / "train.jsonl.gz", clusters=[cluster], per_template=PER_TEMPLATE, conversational=True)
            rows, report = fit_prompts(rows, tokenizer, MAX_LENGTH)
            self.fits[cluster] = asdict(report)
            train = balanced_subset(rows, "dataset", TRAIN_ROWS, seed=0)
            rest = without_prompts(rows, train)
            self.train[stage] = embedded(train)
            self.flashbacks[stage] = balanced_subset(self.train[stage], "dataset", FLASHBACKS_PER_STAGE, seed=1)
            self.tests[f"stage{stage}"] = embedded(
                group_references(balanced_subset(rest, "dataset", EVAL_ROWS, seed=0))
            )
        unseen = group_references(load_p3(P3 / "heldout.jsonl.gz", per_template=PER_TEMPLATE, conversational=True))
        unseen, report = fit_prompts(unseen, tokenizer, MAX_LENGTH)
        self.fits["unseen"] = asdict(report)
        self.tests["unseen"] = embedded(balanced_subset(unseen, "cluster", EVAL_ROWS, seed=0))

    def old(self, stage: int) -> Dataset | None:
        """The flashback rows of every stage before ``stage``."""
        return concatenate_datasets([self.flashbacks[s] for s in range(1, stage)]) if stage > 1 else None


def without_prompts(rows: Dataset, taken: Dataset) -> Dataset:
    """The rows whose prompt ``taken`` does not hold (held-out rows never repeat a training prompt)."""
    seen = {repr(prompt) for prompt in taken["prompt"]}
    return rows.filter(lambda prompt: repr(prompt) not in seen, input_columns="prompt")


class Bench:
    def __init__(self, work_dir: Path, runs: Path = RUNS) -> None:
        self.work_dir, self.runs = work_dir, runs
        runs.mkdir(parents=True, exist_ok=True)
        _, tokenizer = load_embedded_model()
        self.data = Data(tokenizer, work_dir)

    def adapter(self, run: str, seed: int, stage: int) -> Path:
        return self.work_dir / "adapters" / piece_name(run, seed, stage)

    def train(self, run: str, seed: int, stage: int) -> dict:
        """Train ``run``'s ``stage`` from its previous stage's adapter; the adapter lands whole or not at all."""
        spec = METHODS[run]
        model, tokenizer = load_embedded_model()
        if stage > 1:
            previous = self.adapter(trained_as(run, stage - 1), seed, stage - 1)
            model = PeftModel.from_pretrained(model, str(previous), is_trainable=True)
        output_dir = self.work_dir / "runs" / piece_name(run, seed, stage)
        shutil.rmtree(output_dir, ignore_errors=True)
        args = dict(
            output_dir=str(output_dir),
            learning_rate=LEARNING_RATE,
            seed=seed,
            per_device_train_batch_size=BATCH,
            num_train_epochs=EPOCHS,
            max_length=MAX_LENGTH,
            use_cpu=DEVICE == "cpu",
            bf16=False,
            activation_checkpointing=False,
            report_to="none",
            logging_steps=4,
            save_strategy="no",
            dataset_num_proc=None,
        )
        rows, old = self.data.train[stage], self.data.old(stage)
        if spec.trainer == "sft":
            if spec.old_rows == "replay" and old is not None:
                rows = concatenate_datasets([rows, old])
            trainer = SFTTrainer(
                model,
                args=SFTConfig(**args),
                train_dataset=rows.select_columns(["prompt", "completion"]),
                processing_class=tokenizer,
                peft_config=shared_lora_config("embedded") if stage == 1 else None,
            )
        else:
            flashbacks = old if spec.old_rows == "flashbacks" else None
            config = TKIConfig(
                **args,
                lta=True,
                kr=False,
                pcgrad=True,
                flashbacks_per_step=FLASHBACKS_PER_STEP,
                flashback_routing=spec.routing,
            )
            trainer = TKITrainer(
                model,
                args=config,
                train_dataset=rows,
                processing_class=tokenizer,
                peft_config=embedded_lora_config() if stage == 1 else None,
                flashback_dataset=flashbacks,
            )
        started = time.time()
        trainer.train()
        seconds = time.time() - started
        with staged_directory(self.adapter(run, seed, stage)) as staging:
            trainer.model.save_pretrained(str(staging))
        return {
            "seconds": seconds,
            "steps": trainer.state.global_step,
            "rows": len(rows),
            "flashbacks": 0 if spec.old_rows != "flashbacks" or old is None else len(old),
            "log_history": trainer.state.log_history,
        }

    def ensure(self, run: str, seed: int, stage: int, retrain: bool) -> bool:
        """Train (when missing, or when ``retrain``: its previous stage was trained again) and evaluate whatever
        this piece lacks, saving each part as it ends. Returns whether it was trained now."""
        path = self.runs / f"{piece_name(run, seed, stage)}.json"
        config = as_json({"run": run, "seed": seed, "stage": stage, "settings": SETTINGS})
        record = read_record(path)
        if record.get("config") != config:
            record = {"config": config}
        trained = False
        if stage > 0 and (retrain or "train" not in record or not self.adapter(run, seed, stage).is_dir()):
            print(f"== training {piece_name(run, seed, stage)}", flush=True)
            record = {"config": config, "train": self.train(run, seed, stage)}
            write_record(path, record)
            trained = True
        missing = [test for test in TESTS if test not in record.get("eval", {})]
        if missing:
            model, tokenizer = load_embedded_model()
            if stage > 0:
                model = PeftModel.from_pretrained(model, str(self.adapter(run, seed, stage)))
            model.to(DEVICE).eval()
            for test in missing:
                print(f"== evaluating {piece_name(run, seed, stage)} on {test}", flush=True)
                rows = self.data.tests[test]
                started = time.time()
                result = evaluate(model, tokenizer, rows, "cluster", cap=ANSWER_TOKENS)
                record.setdefault("eval", {})[test] = {**result, "seconds": time.time() - started}
                write_record(path, record)
        return trained

    def run(self, methods: list[str], seeds: list[int]) -> None:
        write_record(self.runs / "data.json", {"fits": self.data.fits, "sizes": self.sizes()})
        self.ensure("base", 0, 0, retrain=False)
        for seed in seeds:
            for method in methods:
                retrain = False
                for stage in range(1, len(STAGES) + 1):
                    retrain = self.ensure(trained_as(method, stage), seed, stage, retrain)

    def sizes(self) -> dict:
        return {
            **{f"train{stage}": len(rows) for stage, rows in self.data.train.items()},
            **{test: len(rows) for test, rows in self.data.tests.items()},
        }


# Report ------------------------------------------------------------------------------------------------------------


def matrix(method: str, seed: int, runs: Path = RUNS) -> list[dict] | None:
    """Row ``i`` = the per-test results after stage ``i`` (row 0: the base model); None until every stage of this
    method and seed has every test."""
    rows = []
    for stage in range(len(STAGES) + 1):
        record = read_record(runs / f"{piece_name(trained_as(method, max(stage, 1)), seed, stage)}.json")
        if set(record.get("eval", {})) < set(TESTS):
            return None
        rows.append(record["eval"])
    return rows


def scores(rows: list[dict], test: str, stage: int) -> np.ndarray:
    return np.asarray(rows[stage][test]["per_example"]["rougeL"])


def measures(rows: list[dict]) -> dict[str, np.ndarray]:
    """Per-example vectors of one method and seed. ``forgetting``: the score on each earlier stage's held-out rows
    after the last stage minus right after learning that stage (backward transfer; below 0 = forgotten);
    ``new``: each stage's score right after learning it (plasticity); ``final``: every stage after the last;
    ``unseen``: the unseen clusters after the last stage; ``unseen_change``: that minus the base model's."""
    last = len(STAGES)
    stages = range(1, last + 1)
    return {
        "forgetting": np.concatenate(
            [scores(rows, f"stage{j}", last) - scores(rows, f"stage{j}", j) for j in range(1, last)]
        ),
        "new": np.concatenate([scores(rows, f"stage{j}", j) for j in stages]),
        "final": np.concatenate([scores(rows, f"stage{j}", last) for j in stages]),
        "unseen": scores(rows, "unseen", last),
        "unseen_change": scores(rows, "unseen", last) - scores(rows, "unseen", 0),
    }


MEASURES = ("forgetting", "new", "final", "unseen", "unseen_change")
COMPARED = (("jfa", "sft"), ("jfa", "replay"), ("replay", "sft"), ("jfa", "jfa_no_jtl"), ("jfa", "lta"))


def report(runs: Path = RUNS) -> None:
    found = {
        method: {seed: rows for seed in SEEDS if (rows := matrix(method, seed, runs)) is not None}
        for method in METHODS
    }
    found = {method: by_seed for method, by_seed in found.items() if by_seed}
    per_method = {
        method: {seed: measures(rows) for seed, rows in by_seed.items()} for method, by_seed in found.items()
    }
    table_rows = {
        method: {name: [float(m[name].mean()) for m in by_seed.values()] for name in MEASURES}
        | {"seeds": sorted(by_seed)}
        for method, by_seed in per_method.items()
    }
    comparisons = {}
    for a, b in COMPARED:
        if a in per_method and b in per_method:
            common = sorted(set(per_method[a]) & set(per_method[b]))
            for name in MEASURES:
                first = np.stack([per_method[a][s][name] for s in common])
                second = np.stack([per_method[b][s][name] for s in common])
                result = paired_bootstrap(first, second, paired_seeds=True).to_dict()
                comparisons[f"{a}_minus_{b}_{name}"] = {**result, "seeds": common}
    accuracy = {
        method: np.mean(
            [
                [[rows[i][test]["all"]["rougeL"] for test in TESTS] for i in range(len(rows))]
                for rows in by_seed.values()
            ],
            axis=0,
        ).tolist()
        for method, by_seed in found.items()
    }
    data = read_record(runs / "data.json")
    table = markdown(table_rows, comparisons, accuracy, data)
    payload = {
        "rows": table_rows,
        "comparisons": comparisons,
        "accuracy_matrices": accuracy,
        "data": data,
        "settings": {**SETTINGS, "seeds": SEEDS, "tki": embedded_lora_config().to_dict(), "device": DEVICE},
        "training": training_summary(runs),
    }
    write_results("continual", payload, table)
    if accuracy:
        plot_matrices(accuracy)
    print(table)


def training_summary(runs: Path) -> dict:
    """Per trained piece: its seconds, steps and the mean of each logged flashback quantity."""
    summary = {}
    for path in sorted(runs.glob("*-stage*.json")):
        train = read_record(path).get("train")
        if train is None:
            continue
        logged = {
            key: float(np.mean(values))
            for key in ("loss_flashback", "pcgrad_conflict_rate", "pcgrad_cosine_flashback")
            if (values := [entry[key] for entry in train["log_history"] if key in entry])
        }
        summary[path.stem] = {"seconds": train["seconds"], "steps": train["steps"], **logged}
    return summary


def markdown(rows: dict, comparisons: dict, accuracy: dict, data: dict) -> str:
    sizes = data.get("sizes", {})
    lines = [
        f"Continual instruction tuning, embedded SmolLM2-135M: three stages of P3 train clusters ({', '.join(STAGES)}), "
        f"{TRAIN_ROWS} rows each, {EPOCHS} epochs per stage at lr {LEARNING_RATE:g}; held-out rows per stage: "
        f"{sizes.get('stage1', EVAL_ROWS)}; unseen = {sizes.get('unseen', EVAL_ROWS)} prompts of P3's held-out "
        f"clusters. JFA keeps {FLASHBACKS_PER_STAGE} prompts of each old stage; replay keeps the same rows with "
        "their targets. ROUGE-L x100, greedy answers, mean ± sd over seeds. Produced by "
        "`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python bench/continual.py` (resumable; `--report` "
        "rebuilds this page).",
        "",
        "Forgetting = score on each earlier stage after the last stage minus right after learning it (backward "
        "transfer: 0 is no forgetting); new = each stage right after learning it; final = every stage after the last; "
        "unseen change = unseen clusters after the last stage minus the base model.",
        "",
        "| method | seeds | forgetting | new | final | unseen | unseen change |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, row in rows.items():
        cells = [mean_sd(row[name]) for name in MEASURES]
        lines.append(f"| {METHODS[method].label} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    if comparisons:
        lines += [
            "",
            "Differences, paired by seed and by example, bootstrap 95% intervals; 'unresolved' when the interval holds "
            "0 (for forgetting, a positive difference means the first forgets less).",
            "",
            "| a − b | measure | difference | 95% interval | seeds | verdict |",
            "|---|---|---|---|---|---|",
        ]
        for name, c in comparisons.items():
            pair, measure = next(
                (name.removesuffix(f"_{m}"), m) for m in sorted(MEASURES, key=len, reverse=True) if name.endswith(m)
            )
            a, b = pair.split("_minus_")
            verdict = {"a better": "a higher", "b better": "b higher"}.get(c["verdict"], "unresolved")
            lines.append(
                f"| {METHODS[a].label} − {METHODS[b].label} | {measure} | {c['difference']:+.2f} | "
                f"[{c['low']:+.2f}, {c['high']:+.2f}] | {', '.join(map(str, c['seeds']))} | {verdict} |"
            )
    recovered = recovered_share(rows)
    if recovered is not None:
        lines += [
            "",
            f"Share of sequential SFT's forgetting that replay removes and JFA removes: JFA's gain over SFT is "
            f"{recovered:.0%} of replay's (mean over seeds; a ratio of the two differences above).",
        ]
    for method, values in accuracy.items():
        lines += ["", f"Accuracy matrix, {METHODS[method].label} (rows: after stage; mean ROUGE-L over seeds):", ""]
        lines += ["| after | " + " | ".join(TESTS) + " |", "|---" * (len(TESTS) + 1) + "|"]
        for stage, row in enumerate(values):
            label = "base" if stage == 0 else f"stage {stage} ({STAGES[stage - 1]})"
            lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
    return "\n".join(lines)


def recovered_share(rows: dict) -> float | None:
    if not {"sft", "replay", "jfa"} <= set(rows):
        return None
    forgetting = {method: np.mean(rows[method]["forgetting"]) for method in ("sft", "replay", "jfa")}
    gap = forgetting["replay"] - forgetting["sft"]
    return None if abs(gap) < 1e-9 else float((forgetting["jfa"] - forgetting["sft"]) / gap)


def plot_matrices(accuracy: dict[str, list[list[float]]]) -> None:
    """One heat map per method: rows = after which stage, columns = which test set."""
    with saved_figure("continual_matrices.png", ncols=len(accuracy), figsize=(3.6 * len(accuracy), 3.6)) as axes:
        axes = np.atleast_1d(axes)
        high = max(max(max(row) for row in values) for values in accuracy.values())
        for axis, (method, values) in zip(axes, accuracy.items()):
            axis.imshow(np.array(values), vmin=0, vmax=high, cmap="viridis")
            for i, row in enumerate(values):
                for j, value in enumerate(row):
                    axis.text(j, i, f"{value:.0f}", ha="center", va="center", color="white", fontsize=8)
            axis.set(
                title=METHODS[method].label,
                xticks=range(len(TESTS)),
                xticklabels=TESTS,
                yticks=range(len(values)),
                yticklabels=["base", *(f"after {s}" for s in range(1, len(values)))],
            )
            axis.tick_params(axis="x", labelrotation=45, labelsize=7)
            axis.tick_params(axis="y", labelsize=7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="outputs/bench-continual", help="Adapters and query caches.")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="Rows, in order.")
    parser.add_argument("--seeds", nargs="+", type=int, choices=SEEDS, default=list(SEEDS), help="Seeds to run.")
    parser.add_argument("--report", action="store_true", help="Only rebuild the tables and the plot.")
    args = parser.parse_args()
    if not args.report:
        if not (P3 / "train.jsonl.gz").is_file():
            raise SystemExit(f"continual.py: no {P3}: the shared data folder must sit beside the repository.")
        Bench(Path(args.work_dir)).run(args.methods, args.seeds)
    report()


if __name__ == "__main__":
    main()
