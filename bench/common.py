"""What every benchmark records next to its numbers: the machine, the library versions, and the command."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

from tki_trainer._io import staged_file
from tki_trainer.evaluation import answer_budgets, completion_nll, generate_answers, score_by, score_examples
from tki_trainer.presets import prior_input_config


RESULTS = Path(__file__).parent / "results"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
"""The shared data folder beside the repository."""
P3 = SHARED_DATA / "p3"
SNI = SHARED_DATA / "sni"
STAGE1 = prior_input_config("embedded")
"""KR stage 1 of the embedded preset (recipes/sni_llama.py)."""
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "sentence-transformers", "tki-trainer")


def environment() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "machine": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "python": sys.version.split()[0],
        "versions": {name: version(name) for name in LIBRARIES},
        "command": " ".join(
            [
                *(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_")),
                Path(sys.executable).name,
                *sys.argv,
            ]
        ),
    }


def write_results(name: str, payload: dict, table: str) -> None:
    """``results/<name>.json`` (every number, with the environment) and ``results/<name>.md`` (the short table)."""
    RESULTS.mkdir(exist_ok=True)
    payload = {**payload, "environment": environment()}
    as_json = json.dumps(
        payload, indent=2, default=lambda value: sorted(value) if isinstance(value, set) else str(value)
    )
    env = payload["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    markdown = f"{table}\n\n{env['machine']['cpu']}, {env['machine']['torch_threads']} threads; {versions}.\n"
    for path, text in (
        (RESULTS / f"{name}.json", as_json + "\n"),
        (RESULTS / f"{name}.md", f"{markdown}`{env['command']}`\n"),
    ):
        with staged_file(path) as staging:
            staging.write_text(text)


def training_arguments(output_dir: Path, **settings) -> dict:
    """`SFTConfig` / `TKIConfig` keywords every benchmark run shares (float32 on CPU or CUDA alike, so runs compare
    across devices; no reporting; logs every 4 steps), with the run's own ``settings`` on top."""
    return {
        "output_dir": str(output_dir),
        "use_cpu": not torch.cuda.is_available(),
        "bf16": False,
        "activation_checkpointing": False,
        "report_to": "none",
        "logging_steps": 4,
        "dataset_num_proc": None,
        **settings,
    }


def as_json(value: dict) -> dict:
    """``value`` as it reads back from a saved record (tuples become lists), so that the two compare equal."""
    return json.loads(json.dumps(value))


def read_record(path: Path) -> dict:
    """A saved piece of a resumable benchmark; empty when it was never written."""
    return json.loads(path.read_text()) if path.is_file() else {}


def write_record(path: Path, record: dict) -> None:
    with staged_file(path) as staging:
        staging.write_text(json.dumps(record, indent=1) + "\n")


def evaluate(model, tokenizer, dataset: Dataset, group: str, cap: int = 256) -> dict:
    """Greedy answers (routed when the model holds the bank) of at most ``cap`` tokens, scored overall, per group
    and per example."""
    budgets = answer_budgets(tokenizer, dataset["references"], dataset[group], cap=cap)
    answers = generate_answers(model, tokenizer, dataset, max_new_tokens=budgets, group_column=group, batch_size=8)
    return scored(answers, dataset, group)


def likelihood(model, tokenizer, dataset: Dataset, group: str, max_length: int) -> dict:
    """Mean token NLL of each row's reference answer (its completion; routed when the model holds the bank),
    averaged overall and per group, and per example for pairing."""
    values = completion_nll(model, tokenizer, dataset, max_length=max_length)
    members = defaultdict(list)
    for value, name in zip(values, dataset[group]):
        members[name].append(value)
    return {
        "all": {"nll": float(np.mean(values))},
        "by_group": {name: {"nll": float(np.mean(v))} for name, v in sorted(members.items())},
        "ids": list(dataset["id"]),
        "per_example": {"nll": values},
    }


def scored(answers: list[str], dataset: Dataset, group: str) -> dict:
    """`score_by` the ``group`` column, with the answers and per-example scores that paired comparisons read."""
    references = list(dataset["references"])
    by_group = score_by(answers, references, list(dataset[group]))
    return {
        "all": by_group.pop("all"),
        "by_group": by_group,
        "ids": list(dataset["id"]),
        "answers": answers,
        "per_example": score_examples(answers, references),
    }


def mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{np.mean(values):.1f}" + (f" ± {np.std(values, ddof=1):.1f}" if len(values) > 1 else "")


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
