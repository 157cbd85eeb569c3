"""Divergences between the model's next-token distributions and the reference's, per position."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


DIVERGENCE_NAMES = {
    "symmetric_kl": "symmetric KL",
    "kl": "KL(reference ‖ model)",
    "reverse_kl": "KL(model ‖ reference)",
    "js": "Jensen-Shannon",
}
DIVERGENCES = tuple(DIVERGENCE_NAMES)
"""``symmetric_kl``: KL(reference || model) + KL(model || reference), the paper's flashback divergence (the
default); ``kl``: KL(reference || model) alone, the distillation direction, which keeps every continuation the
reference finds likely; ``reverse_kl``: KL(model || reference); ``js``: Jensen-Shannon, symmetric and bounded by
log 2."""


def token_divergence(model_log_probs: torch.Tensor, reference_log_probs: torch.Tensor, kind: str) -> torch.Tensor:
    """The divergence at each position, [positions], in nats, from log-probabilities [positions, vocab]."""
    if kind == "symmetric_kl":
        return ((reference_log_probs.exp() - model_log_probs.exp()) * (reference_log_probs - model_log_probs)).sum(-1)
    if kind == "kl":
        return F.kl_div(model_log_probs, reference_log_probs, reduction="none", log_target=True).sum(-1)
    if kind == "reverse_kl":
        return F.kl_div(reference_log_probs, model_log_probs, reduction="none", log_target=True).sum(-1)
    if kind == "js":
        mixture = torch.logaddexp(model_log_probs, reference_log_probs) - math.log(2)
        to_mixture = F.kl_div(mixture, model_log_probs, reduction="none", log_target=True).sum(-1)
        return 0.5 * (to_mixture + F.kl_div(mixture, reference_log_probs, reduction="none", log_target=True).sum(-1))
    raise ValueError(f"The flashback divergence must be one of {DIVERGENCES}, got {kind!r}.")
