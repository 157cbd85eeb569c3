"""Does TKI generalise better than LoRA SFT to unseen tasks? The paper's comparison, on the embedded model.

Train on a fixed subset of the P3 train clusters; evaluate greedy answers on the held-out clusters of
``shared/data/p3`` (tasks never seen in training) and on a fixed list of BIG-bench tasks (out of domain, as the
paper uses FLAN). Configurations: the base model, LoRA SFT, full TKI, and TKI without LTA, without KR and
without PCGrad. SFT and TKI each get the same learning-rate search (lr and (1 + alpha) lr, since
``L_sft + alpha L_reinst`` with q close to x is a larger step), chosen on a validation split of the train
clusters; the chosen rates then run three seeds; ablations run at TKI's rate. KR stage 1 runs once.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python bench/quality.py

Every finished piece (a training run, an evaluation) is saved at once under ``bench/results/quality/``, so the
command resumes where an interrupted run stopped; ``--report`` only rebuilds the tables and plots;
``--reproduce <run>`` reruns one finished run from nothing and the report compares the two. Work files
(adapters, stage-1 store, predictions) live under ``--work_dir``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets
from peft import PeftModel

from common import P3, RESULTS, STAGE1, write_results
from tki_trainer import TKIConfig, TKITrainer, compute_prior_inputs, embedded_lora_config, load_embedded_model
from tki_trainer._io import staged_directory, staged_file
from tki_trainer.config import prior_input_arguments
from tki_trainer.data import (
    add_query_embeddings,
    as_conversational,
    fit_prompts,
    group_references,
    load_bigbench,
    load_p3,
)
from tki_trainer.embedded import load_embedded_encoder
from tki_trainer.evaluation import answer_budgets, generate_answers, score, score_examples
from tki_trainer.evaluation.comparison import paired_bootstrap
from tki_trainer.presets import shared_lora_config
from tki_trainer.retrieval import retrieve
from tki_trainer.tuner.model import find_tuner


RUNS = RESULTS / "quality"
MAX_LENGTH = 256
TRAIN_ROWS = 256
VALIDATION_PROMPTS = 128
HELDOUT_PER_CLUSTER = 300
BIGBENCH_TASKS = (
    "tense",
    "object_counting",
    "word_unscrambling",
    "sports_understanding",
    "date_understanding",
    "similarities_abstraction",
)
BIGBENCH_PER_TASK = 30
ALPHA = 1.0
BATCH = 4
LEARNING_RATES = (2e-4, (1 + ALPHA) * 2e-4)
SEEDS = (0, 1, 2)
SWITCHES = {
    "sft": dict(lta=False, kr=False, pcgrad=False),
    "tki": dict(lta=True, kr=True, pcgrad=True),
    "tki_no_lta": dict(lta=False, kr=True, pcgrad=True),
    "tki_no_kr": dict(lta=True, kr=False, pcgrad=False),
    "tki_no_pcgrad": dict(lta=True, kr=True, pcgrad=False),
}
ABLATIONS = tuple(method for method in SWITCHES if method not in ("sft", "tki"))
TEST_SETS = {"heldout": "cluster", "bigbench": "task"}
TRAINING_LOGS = (
    "loss_sft",
    "loss_reinst",
    "reinst_q_win_rate",
    "pcgrad_conflict_rate",
    "pcgrad_cosine",
    "latent_usage_entropy",
)


class Data:
    """The fixed splits, fitted into MAX_LENGTH tokens, with query embeddings."""

    def __init__(self, tokenizer, work_dir: Path, bigbench: Path) -> None:
        encoder = load_embedded_encoder()
        cache = work_dir / "queries"
        train_file = P3 / "train.jsonl.gz"
        train = load_p3(train_file, limit=TRAIN_ROWS, seed=0, conversational=True)
        self.train, self.train_fit = fit_prompts(train, tokenizer, MAX_LENGTH)
        used = set(train["id"])
        rest = load_p3(train_file, seed=1).filter(lambda i: i not in used, input_columns="id")
        validation = group_references(rest.select(range(4 * VALIDATION_PROMPTS)))
        validation = as_conversational(validation.select(range(min(VALIDATION_PROMPTS, len(validation)))))
        held = group_references(load_p3(P3 / "heldout.jsonl.gz", seed=0))
        per_cluster = [
            held.filter(lambda c, name=name: c == name, input_columns="cluster")
            for name in sorted(held.unique("cluster"))
        ]
        held = concatenate_datasets([part.select(range(min(HELDOUT_PER_CLUSTER, len(part)))) for part in per_cluster])
        sets = {
            "validation": validation,
            "heldout": as_conversational(held),
            "bigbench": load_bigbench(bigbench, BIGBENCH_TASKS, max_examples=BIGBENCH_PER_TASK, conversational=True),
        }
        self.fits = {"train": asdict(self.train_fit)}
        self.train = add_query_embeddings(self.train, encoder, cache_dir=cache)
        self.eval: dict[str, Dataset] = {}
        for name, dataset in sets.items():
            fitted, fit = fit_prompts(dataset, tokenizer, MAX_LENGTH)
            self.fits[name] = asdict(fit)
            self.eval[name] = add_query_embeddings(fitted, encoder, cache_dir=cache)


def run_name(method: str, lr: float, seed: int) -> str:
    return f"{method}-lr{lr:g}-s{seed}"


def load_record(name: str, runs: Path = RUNS) -> dict:
    path = runs / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save_record(name: str, record: dict, runs: Path = RUNS) -> None:
    with staged_file(runs / f"{name}.json") as staging:
        staging.write_text(json.dumps(record, indent=1) + "\n")


def train(method: str, lr: float, seed: int, data: Data, store: Path | None, work_dir: Path) -> dict:
    """Train one configuration; save its adapter under the work dir and return what training logged."""
    model, tokenizer = load_embedded_model()
    switches = SWITCHES[method]
    peft_config = embedded_lora_config() if switches["lta"] else shared_lora_config("embedded")
    output_dir = work_dir / "runs" / run_name(method, lr, seed)
    args = TKIConfig(
        output_dir=str(output_dir),
        learning_rate=lr,
        seed=seed,
        per_device_train_batch_size=BATCH,
        num_train_epochs=1,
        max_length=MAX_LENGTH,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        report_to="none",
        logging_steps=4,
        save_strategy="no",
        reinstatement_alpha=ALPHA,
        prior_inputs_dir=str(store) if switches["kr"] else None,
        dataset_num_proc=None,
        **switches,
        **prior_input_arguments(STAGE1),
    )
    trainer = TKITrainer(
        model, args=args, train_dataset=data.train, processing_class=tokenizer, peft_config=peft_config
    )
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    model = trainer.model
    with staged_directory(output_dir / "adapter") as staging:
        model.save_pretrained(str(staging))
    record = {"seconds": seconds, "steps": trainer.state.global_step, "log_history": trainer.state.log_history}
    if switches["lta"]:
        record["latent_usage"] = latent_usage(model, trainer.train_dataset)
    return record


def latent_usage(model: PeftModel, dataset: Dataset) -> dict:
    """Blend-weight mass and retrieval count per latent task over one epoch of the trainer's training set (its
    queries and group ids; keys are frozen, so this is exactly what training retrieved)."""
    tuner = find_tuner(model)
    config = tuner.peft_config["default"]
    indices, weights = retrieve(
        torch.tensor(dataset["query_embedding"]),
        tuner.tki_keys["default"],
        config.num_groups,
        config.top_k,
        torch.tensor(dataset["group_id"]),
        blend=config.blend,
        temperature=config.temperature,
    )
    mass = torch.zeros(config.num_latent_tasks, dtype=torch.float64).index_add_(
        0, indices.flatten(), weights.flatten().double()
    )
    count = torch.bincount(indices.flatten(), minlength=config.num_latent_tasks)
    return {"num_groups": config.num_groups, "mass": mass.tolist(), "count": count.tolist()}


def evaluate(model, tokenizer, dataset: Dataset, group: str, predictions_file: Path) -> dict:
    """Greedy answers (routed when the model holds the bank), corpus scores overall and per group, and each
    example's scores for the paired comparison."""
    references, groups, ids = list(dataset["references"]), list(dataset[group]), list(dataset["id"])
    budgets = answer_budgets(tokenizer, references, groups)
    answers = generate_answers(model, tokenizer, dataset, max_new_tokens=budgets, group_column=group, batch_size=8)
    predictions_file.parent.mkdir(parents=True, exist_ok=True)
    predictions_file.write_text("".join(json.dumps({"id": i, "prediction": a}) + "\n" for i, a in zip(ids, answers)))
    members = defaultdict(list)
    for index, name in enumerate(groups):
        members[name].append(index)
    return {
        "all": score(answers, references),
        "by_group": {
            name: score([answers[i] for i in rows], [references[i] for i in rows])
            for name, rows in sorted(members.items())
        },
        "ids": ids,
        "groups": groups,
        "per_example": score_examples(answers, references),
    }


def ensure(
    name: str,
    method: str,
    lr: float,
    seed: int,
    pieces: tuple[str, ...],
    data: Data,
    store: Path | None,
    work_dir: Path,
    runs: Path = RUNS,
) -> dict:
    """Run whatever of ``train`` and the evaluation ``pieces`` this configuration lacks, saving each as it ends."""
    record = load_record(name, runs)
    record.setdefault("config", {"method": method, "learning_rate": lr, "seed": seed, **SWITCHES.get(method, {})})
    missing = [piece for piece in pieces if piece not in record.get("eval", {})]
    if not missing:
        return record
    adapter = work_dir / "runs" / name / "adapter"
    if method != "base" and ("train" not in record or not adapter.is_dir()):
        print(f"== training {name}", flush=True)
        record["train"] = train(method, lr, seed, data, store, work_dir)
        save_record(name, record, runs)
    model, tokenizer = load_embedded_model()
    if method != "base":
        model = PeftModel.from_pretrained(model, str(adapter))
    for piece in missing:
        print(f"== evaluating {name} on {piece}", flush=True)
        group = TEST_SETS.get(piece, "cluster")
        started = time.time()
        result = evaluate(
            model, tokenizer, data.eval[piece], group, work_dir / "predictions" / name / f"{piece}.jsonl"
        )
        result["seconds"] = time.time() - started
        record.setdefault("eval", {})[piece] = result
        save_record(name, record, runs)
    return record


def bigbench_source(work_dir: Path, given: str | None) -> Path:
    """The bigbench==1.0.0 sdist, read in place (downloaded from PyPI when not given)."""
    if given:
        return Path(given)
    found = sorted(work_dir.glob("bigbench-1.0.0.tar.gz"))
    if not found:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "bigbench==1.0.0",
                "-d",
                str(work_dir),
            ],
            check=True,
        )
        found = sorted(work_dir.glob("bigbench-1.0.0.tar.gz"))
    return found[0]


def chosen_rate(method: str) -> float:
    """The learning rate with the best validation ROUGE-L at seed 0."""
    scores = {lr: load_record(run_name(method, lr, 0))["eval"]["validation"]["all"]["rougeL"] for lr in LEARNING_RATES}
    return max(scores, key=scores.get)


def run(work_dir: Path, bigbench: str | None, ablations: bool) -> None:
    work_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_embedded_model()
    data = Data(tokenizer, work_dir, bigbench_source(work_dir, bigbench))
    (RUNS).mkdir(parents=True, exist_ok=True)
    (RUNS / "data.json").write_text(
        json.dumps(
            {"fits": data.fits, "sizes": {k: len(v) for k, v in data.eval.items()} | {"train": len(data.train)}},
            indent=1,
        )
        + "\n"
    )
    store = compute_prior_inputs(
        model, tokenizer, data.train, work_dir / "prior_inputs", config=STAGE1, max_length=MAX_LENGTH
    )
    (RUNS / "stage1.json").write_text(json.dumps(store.summary(), indent=1) + "\n")
    del model
    args = (data, store.path, work_dir)
    tests = tuple(TEST_SETS)
    ensure("base", "base", 0.0, 0, tests, *args)
    for method in ("sft", "tki"):
        for lr in LEARNING_RATES:
            ensure(run_name(method, lr, 0), method, lr, 0, ("validation",), *args)
    rates = {method: chosen_rate(method) for method in ("sft", "tki")}
    for method in ("sft", "tki"):
        ensure(run_name(method, rates[method], 0), method, rates[method], 0, ("validation", *tests), *args)
    for seed in SEEDS[1:]:
        for method in ("sft", "tki"):
            ensure(run_name(method, rates[method], seed), method, rates[method], seed, tests, *args)
    if ablations:
        for method in ABLATIONS:
            ensure(run_name(method, rates["tki"], 0), method, rates["tki"], 0, tests, *args)


def reproduce(name: str, work_dir: Path, bigbench: str | None) -> None:
    """Rerun one saved configuration from nothing, in its own work dir (stage 1 included when it uses KR), into
    ``quality/reproduced/``; the report compares the two."""
    config = load_record(name).get("config")
    if config is None or "heldout" not in load_record(name).get("eval", {}):
        raise SystemExit(f"quality.py: no finished run {name!r} in {RUNS} to reproduce.")
    work_dir = work_dir / "reproduce"
    work_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_embedded_model()
    data = Data(tokenizer, work_dir, bigbench_source(work_dir, bigbench))
    uses_kr = SWITCHES.get(config["method"], {}).get("kr", False)
    store = (
        compute_prior_inputs(
            model, tokenizer, data.train, work_dir / "prior_inputs", config=STAGE1, max_length=MAX_LENGTH
        ).path
        if uses_kr
        else None
    )
    del model
    ensure(
        name,
        config["method"],
        config["learning_rate"],
        config["seed"],
        ("heldout",),
        data,
        store,
        work_dir,
        RUNS / "reproduced",
    )


def reproductions() -> dict:
    """Each reproduced run against its saved original: held-out ROUGE-L of both, examples scored identically, and
    the seed spread (sd over seeds) of that method at that learning rate."""
    found = {}
    for path in sorted((RUNS / "reproduced").glob("*.json")):
        again, original = json.loads(path.read_text()), load_record(path.stem)
        config = original["config"]
        seeds = [
            r
            for r in finished_runs().values()
            if r["config"]["method"] == config["method"]
            and r["config"]["learning_rate"] == config["learning_rate"]
            and "heldout" in r.get("eval", {})
        ]
        scores = [r["eval"]["heldout"]["all"]["rougeL"] for r in seeds]
        first, second = (np.array(r["eval"]["heldout"]["per_example"]["rougeL"]) for r in (original, again))
        found[path.stem] = {
            "rougeL": original["eval"]["heldout"]["all"]["rougeL"],
            "rougeL_reproduced": again["eval"]["heldout"]["all"]["rougeL"],
            "identical_examples": int((first == second).sum()),
            "examples": len(first),
            "seed_sd": float(np.std(scores, ddof=1)) if len(scores) > 1 else None,
        }
    return found


# Report ------------------------------------------------------------------------------------------------------------


def finished_runs() -> dict[str, dict]:
    return {
        path.stem: json.loads(path.read_text())
        for path in sorted(RUNS.glob("*.json"))
        if path.stem not in ("data", "stage1")
    }


def per_example(records: list[dict], test: str, metric: str = "rougeL") -> np.ndarray:
    return np.array([record["eval"][test]["per_example"][metric] for record in records])


def training_summary(records: list[dict]) -> dict:
    """What the mechanisms did while training, averaged over seeds: each logged TKI quantity over all logged steps
    and over the last quarter (does the prior input ever become the harder input, do the objectives conflict),
    and wall-clock training seconds (under whatever else ran: bench/speed.py measures cost). Without KR the
    logged loss is the SFT loss."""
    summary = {"train_seconds": float(np.mean([r["train"]["seconds"] for r in records]))}
    for key in TRAINING_LOGS:
        field = "loss" if key == "loss_sft" and not records[0]["config"]["kr"] else key
        logs = [
            (e["step"] / r["train"]["steps"], e[field])
            for r in records
            for e in r["train"]["log_history"]
            if field in e
        ]
        if logs:
            summary[key] = float(np.mean([v for _, v in logs]))
            summary[f"{key}_last_quarter"] = float(np.mean([v for f, v in logs if f > 0.75] or [np.nan]))
    return summary


def report() -> None:
    runs = finished_runs()
    tested = {name: r for name, r in runs.items() if all(t in r.get("eval", {}) for t in TEST_SETS)}
    by_config: dict[str, list[dict]] = defaultdict(list)
    for record in tested.values():
        config = record["config"]
        label = "base" if config["method"] == "base" else f"{config['method']} (lr {config['learning_rate']:g})"
        by_config[label].append(record)
    rows, comparisons = [], {}
    for label, records in by_config.items():
        row = {"config": label, "seeds": [r["config"]["seed"] for r in records]}
        if label != "base":
            row["training"] = training_summary(records)
        for test in TEST_SETS:
            for metric in ("bleu", "rouge1", "rouge2", "rougeL"):
                values = [r["eval"][test]["all"][metric] for r in records]
                row[f"{test}_{metric}"] = (
                    float(np.mean(values)),
                    float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                )
        rows.append(row)
    tki = next((records for label, records in by_config.items() if label.startswith("tki (")), None)
    sft = next((records for label, records in by_config.items() if label.startswith("sft (")), None)
    if tki and sft:
        for test in TEST_SETS:
            comparisons[f"tki_minus_sft_{test}"] = paired_bootstrap(
                per_example(tki, test), per_example(sft, test)
            ).to_dict()
        for label, records in by_config.items():
            if label.startswith("tki_no"):
                for test in TEST_SETS:
                    comparisons[f"{label.split()[0]}_minus_tki_{test}"] = paired_bootstrap(
                        per_example(records, test), per_example(tki, test)
                    ).to_dict()
    validation = {
        name: r["eval"]["validation"]["all"]["rougeL"] for name, r in runs.items() if "validation" in r.get("eval", {})
    }
    reproduced = reproductions()
    table = markdown(rows, comparisons, validation, reproduced)
    planned = 1 + 2 * len(SEEDS) + len(ABLATIONS)
    if len(tested) < planned:
        table = f"**Incomplete: {len(tested)} of {planned} planned configurations evaluated on the test sets so far; rerun the command to continue.**\n\n{table}"
    payload = {
        "rows": rows,
        "comparisons": comparisons,
        "validation_rougeL": validation,
        "reproductions": reproduced,
        "runs": {
            name: {
                "config": r["config"],
                "train_seconds": r.get("train", {}).get("seconds"),
                "eval": {
                    k: {"all": v["all"], "by_group": v["by_group"], "seconds": v.get("seconds")}
                    for k, v in r.get("eval", {}).items()
                },
            }
            for name, r in runs.items()
        },
        "data": json.loads((RUNS / "data.json").read_text()) if (RUNS / "data.json").is_file() else None,
        "stage1": json.loads((RUNS / "stage1.json").read_text()) if (RUNS / "stage1.json").is_file() else None,
        "settings": {
            "max_length": MAX_LENGTH,
            "train_rows": TRAIN_ROWS,
            "validation_prompts": VALIDATION_PROMPTS,
            "heldout_per_cluster": HELDOUT_PER_CLUSTER,
            "bigbench_tasks": BIGBENCH_TASKS,
            "bigbench_per_task": BIGBENCH_PER_TASK,
            "learning_rates": LEARNING_RATES,
            "seeds": SEEDS,
            "alpha": ALPHA,
            "stage1": STAGE1.to_dict(),
            "tki": embedded_lora_config().to_dict(),
            "batch": BATCH,
            "epochs": 1,
        },
    }
    write_results("quality", payload, table)
    plot_clusters(by_config)
    plot_usage(tested if tki else runs)
    print(table)


def markdown(rows: list[dict], comparisons: dict, validation: dict, reproduced: dict) -> str:
    def cell(value: tuple[float, float]) -> str:
        return f"{value[0]:.1f}" + (f" ± {value[1]:.1f}" if value[1] else "")

    lines = [
        "Unseen tasks, embedded SmolLM2-135M, greedy answers, x100 (mean ± sd over seeds). Held-out: the P3 held-out clusters "
        "(paraphrase identification, structure-to-text); BIG-bench: out-of-domain tasks. Trained on a fixed subset of the P3 "
        "train clusters; learning rates chosen on a validation split of the train clusters. Produced by "
        "`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python bench/quality.py` (resumable; `--report` rebuilds this page).",
        "",
        "| config | seeds | held-out B-4 | R-1 | R-2 | R-L | BIG-bench B-4 | R-1 | R-2 | R-L |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            cell(row[f"{test}_{metric}"]) for test in TEST_SETS for metric in ("bleu", "rouge1", "rouge2", "rougeL")
        ]
        lines.append(f"| {row['config']} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    trained = [row for row in rows if "training" in row]
    if trained:
        lines += [
            "",
            "Training (mean over logged steps and seeds; in brackets the last quarter of the steps): q-win rate = share of "
            "rows whose prior input is the harder one (else L_reinst counts the prompt's loss again).",
            "",
            "| config | loss_sft | loss_reinst | q-win rate | PCGrad conflicts | cosine | usage entropy |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in trained:
            t = row["training"]
            cells = [f"{t[k]:.3f} ({t[k + '_last_quarter']:.3f})" if k in t else "–" for k in TRAINING_LOGS]
            lines.append(f"| {row['config']} | " + " | ".join(cells) + " |")
    if comparisons:
        lines += [
            "",
            "Paired bootstrap over examples and seeds, ROUGE-L (95% interval; 'detectable' = smallest difference "
            "this set finds with 80% power):",
            "",
            "| comparison | test set | difference | 95% interval | detectable | verdict |",
            "|---|---|---|---|---|---|",
        ]
        for name, c in comparisons.items():
            label, test = name.rsplit("_", 1)
            lines.append(
                f"| {label.replace('_minus_', ' − ')} | {test} | {c['difference']:+.2f} | [{c['low']:+.2f}, {c['high']:+.2f}] | {c['detectable']:.2f} | {c['verdict'].replace('a better', 'first better').replace('b better', 'second better')} |"
            )
    if "tki_minus_sft_heldout" in comparisons:
        c = comparisons["tki_minus_sft_heldout"]
        met = c["difference"] >= 1.0 and c["low"] > 0
        lines += [
            "",
            f"Target TKI − SFT >= +1.0 ROUGE-L on the held-out clusters with the interval above 0: "
            f"{'met' if met else 'not met'} ({c['difference']:+.2f}, [{c['low']:+.2f}, {c['high']:+.2f}], {c['verdict'].replace('a better', 'TKI better').replace('b better', 'SFT better')}).",
        ]
        ablations = {k: v for k, v in comparisons.items() if k.startswith("tki_no") and k.endswith("heldout")}
        if ablations:
            below = [k.split("_minus_")[0] for k, v in ablations.items() if v["difference"] < 0]
            lines.append(
                f"Target: each ablation below full TKI on the held-out clusters: {len(below)} of {len(ablations)} below "
                f"({', '.join(below) or 'none'}); see the intervals above for which differences are resolved."
            )
    if validation:
        lines += [
            "",
            "Validation ROUGE-L (learning-rate choice, seed 0): "
            + ", ".join(f"{k} {v:.1f}" for k, v in sorted(validation.items()) if k.endswith("-s0")),
        ]
    if reproduced:
        lines.append("")
    for name, r in reproduced.items():
        spread = f"seed sd {r['seed_sd']:.2f}" if r["seed_sd"] is not None else "no seed spread yet"
        lines.append(
            f"- Rerun of {name} from nothing (`--reproduce {name}`): held-out ROUGE-L {r['rougeL']:.2f} then "
            f"{r['rougeL_reproduced']:.2f} ({spread}); {r['identical_examples']} of {r['examples']} examples scored identically."
        )
    return "\n".join(lines)


@contextmanager
def saved_figure(filename: str, **layout) -> Iterator:
    """Axes of a new figure, written to ``results/<filename>`` when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(**layout)
    yield axes
    figure.tight_layout()
    figure.savefig(RESULTS / filename, dpi=120)
    plt.close(figure)


def plot_clusters(by_config: dict[str, list[dict]]) -> None:
    groups = (
        [(test, name) for test in TEST_SETS for name in next(iter(by_config.values()))[0]["eval"][test]["by_group"]]
        if by_config
        else []
    )
    with saved_figure("quality_rougeL.png", figsize=(max(8, 1.2 * len(groups)), 4.5)) as axis:
        _cluster_bars(axis, by_config, groups)


def _cluster_bars(axis, by_config: dict[str, list[dict]], groups: list[tuple[str, str]]) -> None:
    width = 0.8 / max(len(by_config), 1)
    for offset, (label, records) in enumerate(by_config.items()):
        x = np.arange(len(groups)) + offset * width
        values = np.array([[r["eval"][test]["by_group"][name]["rougeL"] for test, name in groups] for r in records])
        axis.bar(x, values.mean(axis=0), width, label=label)
        if len(records) > 1:
            for seed_values in values:
                axis.plot(x, seed_values, "k.", markersize=3)
    axis.set_xticks(
        np.arange(len(groups)) + 0.4 - width / 2, [name for _, name in groups], rotation=30, ha="right", fontsize=8
    )
    axis.set_ylabel("ROUGE-L")
    axis.set_title("ROUGE-L per unseen cluster / BIG-bench task (dots: seeds)")
    axis.legend(fontsize=7)


def plot_usage(runs: dict[str, dict]) -> None:
    usage = {name: r["train"] for name, r in runs.items() if "latent_usage" in r.get("train", {})}
    if usage:
        with saved_figure("quality_latent_usage.png", ncols=2, figsize=(12, 4)) as (bars, curve):
            _usage_panels(bars, curve, usage)


def _usage_panels(bars, curve, usage: dict[str, dict]) -> None:
    import matplotlib

    name, first = next(iter(usage.items()))
    mass = np.array(first["latent_usage"]["mass"])
    groups = first["latent_usage"]["num_groups"]
    per_group = len(mass) // groups
    colors = np.repeat(np.arange(groups), per_group)
    bars.bar(np.arange(len(mass)), mass, color=[matplotlib.colormaps["tab10"](c) for c in colors])
    bars.set_xlabel("latent task (colour: group)")
    bars.set_ylabel("blend-weight mass over one epoch")
    bars.set_title(f"Latent-task usage, {name}")
    for name, record in usage.items():
        points = [(e["step"], e["latent_usage_entropy"]) for e in record["log_history"] if "latent_usage_entropy" in e]
        if points:
            curve.plot(*zip(*points), marker=".", label=name)
    reachable = min(len(mass), BATCH * embedded_lora_config().top_k)
    curve.axhline(
        np.log(reachable), color="grey", linestyle="--", label=f"log {reachable}: {BATCH} rows x k spread evenly"
    )
    curve.set_xlabel("step")
    curve.set_ylabel("usage entropy per batch (nats)")
    curve.legend(fontsize=7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--work_dir", default="outputs/bench-quality", help="Adapters, stage-1 store, predictions, BIG-bench sdist."
    )
    parser.add_argument("--bigbench", help="Path of bigbench-1.0.0.tar.gz (downloaded into work_dir when omitted).")
    parser.add_argument("--no_ablations", action="store_true", help="Skip TKI without LTA / KR / PCGrad.")
    parser.add_argument("--report", action="store_true", help="Only rebuild the table and plots from saved results.")
    parser.add_argument(
        "--reproduce", metavar="RUN", help="Rerun one saved run (e.g. sft-lr0.0002-s0) from nothing and compare."
    )
    args = parser.parse_args()
    if args.reproduce:
        reproduce(args.reproduce, Path(args.work_dir), args.bigbench)
    elif not args.report:
        if not (P3 / "train.jsonl.gz").is_file():
            raise SystemExit(f"quality.py: no P3 data at {P3}: the shared data folder must sit beside the repository.")
        run(Path(args.work_dir), args.bigbench, not args.no_ablations)
    report()


if __name__ == "__main__":
    main()
