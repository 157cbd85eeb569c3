"""Evaluation: routed greedy generation and offline BLEU / ROUGE / exact-match scoring."""

from .callback import GenerationEvaluationCallback
from .generation import answer_budgets, generate_answers
from .heuristics import HEURISTICS, heuristic_predictions, score_heuristics, side_by_side
from .likelihood import completion_nll
from .predictions import saved_answers
from .scoring import METRIC_NAMES, score, score_by, score_examples


__all__ = [
    "GenerationEvaluationCallback",
    "HEURISTICS",
    "METRIC_NAMES",
    "answer_budgets",
    "completion_nll",
    "generate_answers",
    "heuristic_predictions",
    "saved_answers",
    "score",
    "score_by",
    "score_examples",
    "score_heuristics",
    "side_by_side",
]
