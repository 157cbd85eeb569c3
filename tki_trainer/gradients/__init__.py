"""Gradients of several objectives in one optimizer step: per-objective sums, their reduction across processes,
PCGrad's projection, and the capture of an example subset's share of a backward."""

from .capture import GradientCapture
from .engine import SFT, GradientEngine, cosine_metric
from .pcgrad import Projection, project
from .sums import ObjectiveGradients


__all__ = [
    "SFT",
    "GradientCapture",
    "GradientEngine",
    "ObjectiveGradients",
    "Projection",
    "cosine_metric",
    "project",
]
