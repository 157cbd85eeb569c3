"""Knowledge reinstatement: stage 1 (optimised prior inputs) and their store."""

from .stage1 import PriorInputConfig, PriorInputs, compute_prior_inputs, optimize_prior_inputs
from .store import PriorInputStore


__all__ = ["PriorInputConfig", "PriorInputStore", "PriorInputs", "compute_prior_inputs", "optimize_prior_inputs"]
