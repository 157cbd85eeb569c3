"""Which backward passes a PCGrad micro-batch takes, and in which order, to get both objectives' gradients.

``g1`` is the gradient of ``L_sft`` (through the real prompt), ``g2`` that of ``alpha * L_reinst``, which flows
through the prior input for the examples whose reinstatement term takes ``q`` (`Objectives.through_prior`, under
either reading) and through the real prompt for the others. No plan takes a third forward; the floor is one backward per graph that ``g2`` needs.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import torch

from .capture import SubsetGradients
from .pcgrad import PCGradAccumulator
from .reinstatement.objective import Objectives


class BackwardPlan(enum.Enum):
    PROMPT_ONLY = 1
    """Every example's reinstatement term takes the real prompt: ``g2 = alpha g1``, one backward."""
    PRIOR_ONLY = 2
    """Every example's reinstatement term takes the prior input: one backward through each graph."""
    SPLIT = 3
    """Mixed: the real-prompt backward also yields, through `SubsetGradients`, the reinstatement share of the
    examples whose term takes the real prompt; then one backward through the prior-input graph."""
    RETAINED = 4
    """Mixed, where the capture cannot cover every trainable parameter: the reinstatement backward runs through
    both graphs, the real-prompt graph kept alive for it (three passes through a graph: the real-prompt graph
    twice, the prior-input graph once)."""

    @property
    def backward_passes(self) -> int:
        return {BackwardPlan.PROMPT_ONLY: 1, BackwardPlan.RETAINED: 3}.get(self, 2)


def choose_plan(through_prior: torch.Tensor, capture: SubsetGradients | None) -> BackwardPlan:
    """The cheapest plan for this micro-batch (``through_prior``: the examples whose reinstatement term takes the
    prior input; ``capture``: the recording of its real-prompt forward, if any)."""
    if not bool(through_prior.any()):
        return BackwardPlan.PROMPT_ONLY
    if bool(through_prior.all()):
        return BackwardPlan.PRIOR_ONLY
    return BackwardPlan.SPLIT if capture is not None and capture.complete else BackwardPlan.RETAINED


def run_plan(
    plan: BackwardPlan,
    objectives: Objectives,
    alpha: float,
    accumulator: PCGradAccumulator,
    backward: Callable[..., None],
    capture: SubsetGradients | None,
) -> None:
    """Take the plan's backward passes (``backward(loss, retain_graph=...)``, which scales as the Trainer does) and
    add ``g1`` to objective 0 and ``g2`` to objective 1 of ``accumulator``."""
    if plan is BackwardPlan.PROMPT_ONLY:
        backward(objectives.sft)
        g1 = accumulator.take_gradients()
        accumulator.add(0, g1)
        accumulator.add(1, g1, scale=alpha)
        return
    if plan is BackwardPlan.SPLIT:
        capture.weights = (~objectives.through_prior).float()
    backward(objectives.sft, retain_graph=plan is BackwardPlan.RETAINED)
    accumulator.add(0, accumulator.take_gradients())
    if plan is BackwardPlan.SPLIT:
        accumulator.add(1, capture.take(), scale=alpha)
    through = objectives.reinstatement if plan is BackwardPlan.RETAINED else objectives.reinstatement_through_prior
    backward(alpha * through)
    accumulator.add(1, accumulator.take_gradients())
