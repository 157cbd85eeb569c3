"""Knowledge reinstatement, stage 2: the two training objectives, per example, from TRL's fused outputs.

With ``n_i`` completion tokens of example ``i``, ``N`` those of the effective batch (SFTTrainer's divisor) and
``l_x,i`` / ``l_q,i`` the example's summed token loss with its real prompt and with its prior input:
``L_sft = sum_i l_x,i / N`` (SFTTrainer's loss) and, as the paper's eq. 6 is written (``-max`` of the target's
log-likelihoods), ``L_reinst = sum_i min(l_q,i, l_x,i) / N``: each example trains through whichever input already
produces its target more easily, after stage 1 mostly the prior input (``"easier"``). ``"harder"`` is the reading
that drops eq. 6's minus sign, ``max(l_q,i, l_x,i)``. Ties go to the real prompt, so ``q = e`` gives
``L_reinst = L_sft`` under either reading. The token loss is SFTTrainer's for its ``loss_type``: the negative
log-probability (``"nll"``) or DFT's probability-weighted one (``"dft"``). TRL's fused LM head gives per-token
log-probabilities (zero at ignored positions), never full logits, and the per-example sums are their row sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn


REINSTATEMENT_TARGETS = ("easier", "harder")
"""``"easier"``: eq. 6 as written, ``min`` of the two losses; ``"harder"``: its minus sign dropped, ``max``."""


def summed_token_loss(outputs: Any, loss_type: str = "nll") -> torch.Tensor:
    """``l_i``, the summed token loss of each example, [batch], from a `FusedCausalLMOutput` (as SFTTrainer's
    ``compute_loss`` computes it before dividing by the token count)."""
    per_token = -outputs.log_probs
    if loss_type == "dft":
        per_token = per_token * outputs.log_probs.exp().detach()
    return per_token.sum(dim=1)


@dataclass
class ReinstatementLosses:
    """The per-example terms of one micro-batch and the two losses they make."""

    loss_x: torch.Tensor
    """[batch] summed token loss with the real prompt."""
    loss_q: torch.Tensor
    """[batch] the same with the prior input."""
    divisor: torch.Tensor
    target: Literal["easier", "harder"] = "easier"
    """Which of its two losses each example's reinstatement term takes (`REINSTATEMENT_TARGETS`)."""

    def __post_init__(self) -> None:
        if self.target not in REINSTATEMENT_TARGETS:
            raise ValueError(f"target must be one of {REINSTATEMENT_TARGETS}, got {self.target!r}.")

    @property
    def through_prior(self) -> torch.Tensor:
        """[batch] bool: examples whose reinstatement term goes through the prior input ``q`` (the easier input under
        ``"easier"``, the harder one under ``"harder"``; the real prompt on ties)."""
        if self.target == "easier":
            return self.loss_q < self.loss_x
        return self.loss_q > self.loss_x

    @property
    def sft(self) -> torch.Tensor:
        return self.loss_x.sum() / self.divisor

    @property
    def reinstatement(self) -> torch.Tensor:
        return torch.where(self.through_prior, self.loss_q, self.loss_x).sum() / self.divisor

    @property
    def reinstatement_through_prior(self) -> torch.Tensor:
        """The part of ``L_reinst`` that flows through the prior-input graph."""
        return torch.where(self.through_prior, self.loss_q, torch.zeros_like(self.loss_q)).sum() / self.divisor


def reinstatement_losses(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    prompt_outputs: Any,
    prior_deltas: torch.Tensor,
    embedding: nn.Module,
    divisor: torch.Tensor,
    loss_type: str = "nll",
    target: Literal["easier", "harder"] = "easier",
) -> ReinstatementLosses:
    """Both objectives of a micro-batch, given the real-prompt forward's fused outputs: one more forward, through
    the prior inputs ``q = e + prior_deltas`` (``[batch, prompt_tokens, hidden]``, zero past each prompt; TRL's
    batches start every prompt at position 0), same routing and labels."""
    embeddings = embedding(inputs["input_ids"])
    padding = (0, 0, 0, embeddings.shape[1] - prior_deltas.shape[1])
    prior = {key: value for key, value in inputs.items() if key != "input_ids"}
    prior["inputs_embeds"] = embeddings + F.pad(prior_deltas.to(embeddings.dtype), padding)
    prior_outputs = model(**prior, fused_lm_head=True)
    return ReinstatementLosses(
        summed_token_loss(prompt_outputs, loss_type), summed_token_loss(prior_outputs, loss_type), divisor, target
    )
