"""Which backward passes a PCGrad micro-batch takes to get the SFT and reinstatement gradients apart.

``g1`` is the gradient of ``L_sft`` (through the real prompt: the Trainer's own backward), ``g2`` that of ``alpha
* L_reinst``, which flows through the prior input for the examples whose reinstatement term takes ``q``
(`ReinstatementLosses.through_prior`, under either reading) and through the real prompt for the others. No plan
takes a third forward; the floor is one backward per graph that ``g2`` needs.
"""

from __future__ import annotations

import enum

import torch

from ..gradients import GradientEngine
from .losses import ReinstatementLosses


class BackwardPlan(enum.Enum):
    PROMPT_ONLY = 1
    """Every example's reinstatement term takes the real prompt: ``g2 = alpha g1``, one backward."""
    PRIOR_ONLY = 2
    """Every example's reinstatement term takes the prior input: one backward through each graph."""
    SPLIT = 3
    """Mixed: the real-prompt backward also yields, through `GradientCapture`, the reinstatement share of the
    examples whose term takes the real prompt; then one backward through the prior-input graph."""
    RETAINED = 4
    """Mixed, where the capture cannot cover every trainable parameter: the reinstatement backward runs through
    both graphs before the Trainer's, the real-prompt graph kept alive for it (three passes through a graph: the
    real-prompt graph twice, the prior-input graph once)."""

    @property
    def backward_passes(self) -> int:
        return {BackwardPlan.PROMPT_ONLY: 1, BackwardPlan.RETAINED: 3}.get(self, 2)


def choose_plan(through_prior: torch.Tensor, can_share_examples: bool) -> BackwardPlan:
    """The cheapest plan for this micro-batch (``through_prior``: the examples whose reinstatement term takes the
    prior input; ``can_share_examples``: whether the Trainer's backward can also give an example subset's share)."""
    if not bool(through_prior.any()):
        return BackwardPlan.PROMPT_ONLY
    if bool(through_prior.all()):
        return BackwardPlan.PRIOR_ONLY
    return BackwardPlan.SPLIT if can_share_examples else BackwardPlan.RETAINED


def run_plan(
    plan: BackwardPlan, losses: ReinstatementLosses, alpha: float, scale: float, engine: GradientEngine, name: str
) -> None:
    """Take ``g2`` into objective ``name`` of ``engine``: the plan's own backward passes (``scale``: the Trainer's
    factor) and its share of the Trainer's coming backward, which gives ``g1``."""
    if plan is BackwardPlan.PROMPT_ONLY:
        engine.share(name, alpha)
    elif plan is BackwardPlan.RETAINED:
        engine.backward(alpha * scale * losses.reinstatement, name, retain_graph=True)
    else:
        if plan is BackwardPlan.SPLIT:
            engine.share(name, alpha, examples=~losses.through_prior)
        engine.backward(alpha * scale * losses.reinstatement_through_prior, name)
