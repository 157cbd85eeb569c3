"""P3 (the prompted training mixture of T0) in the JSON-lines format of ``shared/data/p3``.

Each row is ``{"id", "cluster", "dataset", "template", "prompt", "completion"}``: already TRL's
prompt/completion format, one prompt template of one dataset per row, labelled with its T0 task cluster.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from datasets import Dataset, load_dataset

from .formats import as_conversational


def load_p3(
    path: str | os.PathLike,
    *,
    clusters: Sequence[str] | None = None,
    per_template: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    conversational: bool = False,
) -> Dataset:
    """Rows of one P3 file (``train.jsonl.gz`` or ``heldout.jsonl.gz``), optionally a seeded subset.

    ``clusters`` keeps only those task clusters; ``per_template`` keeps at most that many rows of each
    prompt template (every template stays represented); ``limit`` then keeps a seeded sample of that many rows.
    """
    if not os.path.isfile(path):
        raise ValueError(f"No P3 file at {path}: pass the path of train.jsonl.gz or heldout.jsonl.gz.")
    dataset = load_dataset("json", data_files=str(path), split="train")
    if clusters is not None:
        unknown = set(clusters) - set(dataset.unique("cluster"))
        if unknown:
            raise ValueError(
                f"Unknown P3 clusters {sorted(unknown)}; this file has {sorted(dataset.unique('cluster'))}."
            )
        dataset = dataset.filter(lambda cluster: cluster in set(clusters), input_columns="cluster")
    dataset = dataset.shuffle(seed=seed)
    if per_template is not None:
        seen: dict[tuple[str, str], int] = {}
        keep = []
        for i, key in enumerate(zip(dataset["dataset"], dataset["template"])):
            seen[key] = seen.get(key, 0) + 1
            if seen[key] <= per_template:
                keep.append(i)
        dataset = dataset.select(keep)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    dataset = dataset.sort("id")
    return as_conversational(dataset) if conversational else dataset


def group_references(dataset: Dataset) -> Dataset:
    """One row per distinct prompt, its completions gathered as ``references`` (P3's held-out files give a
    prompt once per acceptable answer). The first row's other columns and id are kept."""
    first: dict[str, int] = {}
    references: dict[str, list[str]] = {}
    for index, (prompt, completion) in enumerate(zip(dataset["prompt"], dataset["completion"])):
        key = prompt if isinstance(prompt, str) else repr(prompt)
        if key not in first:
            first[key] = index
            references[key] = []
        references[key].append(completion if isinstance(completion, str) else completion[-1]["content"])
    grouped = dataset.select(sorted(first.values()))
    ordered = [references[key] for key, _ in sorted(first.items(), key=lambda item: item[1])]
    return grouped.add_column("references", ordered)
