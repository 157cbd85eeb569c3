"""Evaluation: routed greedy generation and offline BLEU / ROUGE / exact-match scoring."""

from .callback import GenerationEvaluationCallback
from .generation import answer_budgets, generate_answers
from .scoring import METRIC_NAMES, score, score_by, score_examples


__all__ = ["GenerationEvaluationCallback", "METRIC_NAMES", "answer_budgets", "generate_answers", "score", "score_by", "score_examples"]
