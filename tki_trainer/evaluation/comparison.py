"""Paired comparison of two systems scored on the same examples, over examples and training seeds."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


Z_95, Z_80_POWER = 1.959964, 0.841621


@dataclass(frozen=True)
class Comparison:
    """``difference`` = mean score of system a minus system b, with its bootstrap 95% interval ``[low, high]``.

    ``detectable`` is the smallest true difference this evaluation set finds with 80% power at the 5% level
    ((1.96 + 0.84) standard errors). ``verdict`` is ``"a better"``, ``"b better"`` or ``"unresolved"`` (the
    interval holds 0).
    """

    difference: float
    low: float
    high: float
    standard_error: float
    detectable: float
    examples: int
    seeds_a: int
    seeds_b: int

    @property
    def verdict(self) -> str:
        return "a better" if self.low > 0 else "b better" if self.high < 0 else "unresolved"

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, *, paired_seeds: bool = False, resamples: int = 10_000, seed: int = 0
) -> Comparison:
    """Compare per-example scores ``a[seeds_a, n]`` and ``b[seeds_b, n]`` (the same n examples, in the same order).

    Each resample draws the n examples with replacement (shared by both systems: the pairing) and seeds with
    replacement (training runs are a second source of variance), and takes the difference of the means. With
    ``paired_seeds`` row ``s`` of ``a`` and of ``b`` come from the same training seed, and both systems draw the same
    seeds, so what a seed does to both (its data order, its initialisation) cancels; otherwise each system draws its
    own.
    """
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError(
            f"paired_bootstrap needs scores of the same examples for both systems; got {a.shape} and {b.shape}."
        )
    if paired_seeds and a.shape[0] != b.shape[0]:
        raise ValueError(
            f"paired_seeds needs the same training seeds for both systems; got {a.shape[0]} and {b.shape[0]} rows."
        )
    rng = np.random.default_rng(seed)
    n = a.shape[1]
    differences = []
    for size in np.diff([*range(0, resamples, 1000), resamples]):
        rows = rng.integers(0, n, size=(size, n))
        seeds = [rng.integers(0, len(scores), size=(size, len(scores))) for scores in (a, b)]
        if paired_seeds:
            seeds[1] = seeds[0]
        means = [_resampled_mean(scores, rows, drawn) for scores, drawn in zip((a, b), seeds)]
        differences.append(means[0] - means[1])
    differences = np.concatenate(differences)
    low, high = np.quantile(differences, [0.025, 0.975])
    error = float(differences.std(ddof=1))
    return Comparison(
        difference=float(a.mean() - b.mean()),
        low=float(low),
        high=float(high),
        standard_error=error,
        detectable=(Z_95 + Z_80_POWER) * error,
        examples=n,
        seeds_a=a.shape[0],
        seeds_b=b.shape[0],
    )


def _resampled_mean(scores: np.ndarray, rows: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Per resample ``i``: the mean over its examples ``rows[i]`` of the mean over its seeds ``seeds[i]``."""
    per_example = scores[seeds].mean(axis=1)
    return np.take_along_axis(per_example, rows, axis=1).mean(axis=1)
