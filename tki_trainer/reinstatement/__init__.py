"""Knowledge reinstatement: stage 1 (optimised prior inputs) and their store."""

from .settings import PriorInputConfig
from .stage1 import PriorInputs, compute_prior_inputs, optimize_prior_inputs
from .store import PriorInputStore


__all__ = ["PriorInputConfig", "PriorInputStore", "PriorInputs", "compute_prior_inputs", "optimize_prior_inputs"]
