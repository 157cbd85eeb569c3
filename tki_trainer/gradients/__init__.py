"""Gradients of several objectives in one optimizer step: per-objective sums, their reduction across processes,
PCGrad's projection, and the capture of an example subset's share of a backward."""

from .capture import GradientCapture
from .engine import GradientEngine
from .pcgrad import Projection, project
from .sums import ObjectiveGradients


__all__ = [
    "GradientCapture",
    "GradientEngine",
    "ObjectiveGradients",
    "Projection",
    "project",
]
