"""Gradients of several objectives in one optimizer step: per-objective sums, their reduction across processes,
PCGrad's projection, and the capture of an example subset's share of a backward."""

from .capture import GradientCapture
from .engine import GradientEngine, accumulation_steps, loss_factor, micro_batch_weight
from .pcgrad import Projection, project
from .sums import ObjectiveGradients


__all__ = [
    "GradientCapture",
    "GradientEngine",
    "ObjectiveGradients",
    "Projection",
    "accumulation_steps",
    "loss_factor",
    "micro_batch_weight",
    "project",
]
