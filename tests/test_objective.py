"""The reinstatement objective under each reading of the paper's eq. 6, against a hand computation."""

import pytest
import torch

from tki_trainer.reinstatement.backward import BackwardPlan, choose_plan
from tki_trainer.reinstatement.losses import ReinstatementLosses


LOSS_X = [2.0, 1.0, 3.0, 0.5]
LOSS_Q = [1.0, 4.0, 3.0, 0.25]
"""Per-example summed losses with the real prompt and with the prior input; the third is a tie."""


@pytest.mark.parametrize(
    "target,chosen,through_prior",
    [
        ("easier", [1.0, 1.0, 3.0, 0.25], [True, False, False, True]),
        ("harder", [2.0, 4.0, 3.0, 0.5], [False, True, False, False]),
    ],
)
def test_each_reading_takes_its_input_per_example_and_ties_go_to_the_prompt(target, chosen, through_prior):
    loss_x = torch.tensor(LOSS_X, requires_grad=True)
    loss_q = torch.tensor(LOSS_Q, requires_grad=True)
    objectives = ReinstatementLosses(loss_x, loss_q, torch.tensor(5.0), target)
    assert objectives.through_prior.tolist() == through_prior
    assert objectives.sft.item() == pytest.approx(sum(LOSS_X) / 5)
    reinstatement = objectives.reinstatement
    assert reinstatement.item() == pytest.approx(sum(chosen) / 5)
    reinstatement.backward()
    prior = torch.tensor(through_prior, dtype=torch.float32)
    torch.testing.assert_close(loss_q.grad, prior / 5)
    torch.testing.assert_close(loss_x.grad, (1 - prior) / 5)


def test_the_prior_input_share_is_what_the_plan_trains_through_it():
    objectives = ReinstatementLosses(torch.tensor(LOSS_X), torch.tensor(LOSS_Q), torch.tensor(5.0), "easier")
    through = sum(q for q, prior in zip(LOSS_Q, objectives.through_prior.tolist()) if prior)
    assert float(objectives.reinstatement_through_prior) == pytest.approx(through / 5)


@pytest.mark.parametrize("target", ["easier", "harder"])
def test_equal_losses_give_the_sft_objective_and_the_one_backward_plan(target):
    """``q = e``: every example ties, so L_reinst = L_sft and no backward goes through the prior input."""
    objectives = ReinstatementLosses(torch.tensor(LOSS_X), torch.tensor(LOSS_X), torch.tensor(5.0), target)
    assert float(objectives.reinstatement) == float(objectives.sft)
    assert choose_plan(objectives.through_prior, False) is BackwardPlan.PROMPT_ONLY


def test_a_batch_whose_prior_inputs_are_all_easier_takes_the_prior_input_plan():
    easier = ReinstatementLosses(torch.tensor(LOSS_X), torch.tensor(LOSS_X) / 2, torch.tensor(5.0), "easier")
    assert choose_plan(easier.through_prior, False) is BackwardPlan.PRIOR_ONLY
    harder = ReinstatementLosses(torch.tensor(LOSS_X), torch.tensor(LOSS_X) / 2, torch.tensor(5.0), "harder")
    assert choose_plan(harder.through_prior, False) is BackwardPlan.PROMPT_ONLY
