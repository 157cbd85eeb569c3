"""Scores of generated answers: BLEU-4, ROUGE-1/2/L and exact match, through `evaluate` with a local module.

`evaluate.load("rouge")` fetches its script from the Hub; ``metrics/tki_answers.py`` ships with the package and
loads offline. Every example is scored against all its references (the best one counts, as in SNI).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import evaluate


METRICS_DIR = Path(__file__).parent / "metrics"
METRIC_NAMES = ("bleu", "rouge1", "rouge2", "rougeL", "exact_match")


@cache
def _module() -> evaluate.EvaluationModule:
    return evaluate.load(str(METRICS_DIR / "tki_answers.py"))


def score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """``{"bleu", "rouge1", "rouge2", "rougeL", "exact_match"}``, each x100, over the whole set."""
    results = _compute(predictions, references)
    return {name: results[name] for name in METRIC_NAMES}


def score_examples(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, list[float]]:
    """Each example's ``rouge1``, ``rouge2``, ``rougeL`` and ``exact_match`` (x100): what paired comparisons of two
    systems resample. BLEU is a corpus statistic and has no per-example value."""
    return _compute(predictions, references, per_example=True)["per_example"]


def _compute(predictions: Sequence[str], references: Sequence[Sequence[str]], **options) -> dict:
    if len(predictions) != len(references) or not predictions:
        raise ValueError(
            f"score needs one list of references per prediction; got {len(predictions)} and {len(references)}."
        )
    return _module().compute(predictions=list(predictions), references=[list(r) for r in references], **options)


def score_by(
    predictions: Sequence[str], references: Sequence[Sequence[str]], groups: Sequence[str]
) -> dict[str, dict[str, float]]:
    """`score` per group (task or cluster) and ``"all"``."""
    members: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    breakdown = {
        group: score([predictions[i] for i in idx], [references[i] for i in idx])
        for group, idx in sorted(members.items())
    }
    return {"all": score(predictions, references), **breakdown}
