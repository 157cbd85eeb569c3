"""Answers that need no training, scored like a model's: SNI's copy baselines (Wang et al. 2022, Table 3).

Copying the instance input, and copying the output of the task's first positive example ("copy demo"), are what
a model must beat on unseen tasks to show it follows the instruction at all: SNI reports 14.2 and 28.5 ROUGE-L on
its English test tasks. Both read the rows of `tki_trainer.data.load_sni` (fitted or not), so they answer the very
prompts the model answers, and `score_by` scores them with the model's metric module.
"""

from __future__ import annotations

from collections.abc import Mapping

from datasets import Dataset

from .scoring import score_by


HEURISTICS = {"copy_input": "instance_input", "copy_demo": "demo_output"}


def heuristic_predictions(dataset: Dataset, heuristic: str) -> list[str]:
    """Each row's answer under ``heuristic``: ``"copy_input"``, the instance input as the prompt holds it (cut, if
    `fit_sni_prompts` cut it), or ``"copy_demo"``, the output of the task's first positive example."""
    if heuristic not in HEURISTICS:
        raise ValueError(f"Unknown heuristic {heuristic!r}; choose one of {sorted(HEURISTICS)}.")
    column = HEURISTICS[heuristic]
    if column not in dataset.column_names:
        raise ValueError(
            f"The {heuristic} heuristic reads the '{column}' column that load_sni writes; "
            f"this dataset has {dataset.column_names}."
        )
    return list(dataset[column])


def score_heuristics(dataset: Dataset, group_column: str = "category") -> dict[str, dict[str, dict[str, float]]]:
    """`score_by` of every heuristic against the rows' ``references``, per ``group_column`` value and ``"all"``:
    ``{heuristic: {group: {metric: value}}}``, the shape the recipe's model results have."""
    missing = {"references", group_column} - set(dataset.column_names)
    if missing:
        raise ValueError(
            f"score_heuristics needs the columns {sorted(missing)}; load the rows with tki_trainer.data.load_sni."
        )
    references, groups = list(dataset["references"]), list(dataset[group_column])
    return {name: score_by(heuristic_predictions(dataset, name), references, groups) for name in HEURISTICS}


def side_by_side(
    results: Mapping[str, Mapping[str, Mapping[str, float]]], metric: str = "rougeL", group: str = "category"
) -> str:
    """A Markdown table of one metric: a column per system (base model, adapter, heuristics...), a row per group
    (``all`` first), from `score_by` results on the same rows."""
    if not results:
        raise ValueError("side_by_side needs at least one system's score_by results.")
    names = list(results)
    groups = list(results[names[0]])
    for name in names[1:]:
        if set(results[name]) != set(groups):
            raise ValueError(
                f"{name!r} is scored on groups {sorted(results[name])}, {names[0]!r} on {sorted(groups)}: "
                "score the same rows."
            )
    lines = [f"| {group} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in ["all", *(g for g in groups if g != "all")]:
        lines.append(f"| {row} | " + " | ".join(f"{results[name][row][metric]:.1f}" for name in names) + " |")
    return "\n".join(lines)
