"""Knowledge reinstatement, stage 2: the two training objectives, per example, from TRL's fused outputs.

With ``n_i`` completion tokens of example ``i``, ``N`` those of the effective batch (SFTTrainer's divisor) and
``CE_x,i`` / ``CE_q,i`` the example's mean token cross-entropy with its real prompt and with its prior input:
``L_sft = sum_i n_i CE_x,i / N`` (SFTTrainer's loss) and ``L_reinst = sum_i n_i max(CE_q,i, CE_x,i) / N``.
TRL's fused LM head gives per-token log-probabilities (zero at ignored positions), never full logits, and the
per-example sums ``n_i CE_i`` are their row sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def summed_cross_entropy(outputs) -> torch.Tensor:
    """``n_i * CE_i`` per example, [batch], from a `FusedCausalLMOutput`."""
    return -outputs.log_probs.sum(dim=1)


@dataclass
class Objectives:
    """The per-example terms of one micro-batch and the two losses they make."""

    ce_x: torch.Tensor
    """[batch] summed token cross-entropy with the real prompt."""
    ce_q: torch.Tensor
    """[batch] the same with the prior input."""
    divisor: torch.Tensor

    @property
    def q_wins(self) -> torch.Tensor:
        """Examples whose prior input is the harder one: there the reinstatement term follows ``q``."""
        return self.ce_q > self.ce_x

    @property
    def sft(self) -> torch.Tensor:
        return self.ce_x.sum() / self.divisor

    @property
    def reinstatement(self) -> torch.Tensor:
        return torch.maximum(self.ce_q, self.ce_x).sum() / self.divisor

    @property
    def reinstatement_through_q(self) -> torch.Tensor:
        """The part of ``L_reinst`` that flows through the prior-input graph (examples where ``q`` wins)."""
        return torch.where(self.q_wins, self.ce_q, torch.zeros_like(self.ce_q)).sum() / self.divisor
