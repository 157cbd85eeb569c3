"""Seeded subsets that keep every task (or cluster, or category) represented."""

from __future__ import annotations

from datasets import Dataset


def balanced_subset(dataset: Dataset, column: str, total: int | None, seed: int = 0) -> Dataset:
    """A seeded subset of ``total`` rows, as equal per value of ``column`` as the rows allow: each value's rows are
    taken in turn from a seeded shuffle, which is also the subset's order. The whole dataset when ``total`` is None
    or not smaller."""
    if total is None or total >= len(dataset):
        return dataset
    shuffled = dataset.shuffle(seed=seed)
    seen: dict[str, int] = {}
    ranks = []
    for value in shuffled[column]:
        ranks.append(seen.get(value, 0))
        seen[value] = ranks[-1] + 1
    keep = sorted(range(len(ranks)), key=lambda index: (ranks[index], index))[:total]
    return shuffled.select(sorted(keep))
