"""Logits at chosen positions only, from the model's own forward and LM head."""

from __future__ import annotations

import torch
from torch import nn


def logits_at(model: nn.Module, keep: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
    """The logits at the positions where ``keep`` ([batch, tokens], bool) is True, [kept, vocab].

    The model's own head (any soft-capping or logit scaling stays its own) runs only at those positions, through a
    boolean ``logits_to_keep``: most of a row is often prompt, and a full-vocabulary row per token is the largest
    tensor of a forward. A forward that ignores ``logits_to_keep`` returns every position, and the same mask
    selects them.
    """
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    return logits[keep] if logits.ndim == 3 else logits


def log_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the vocabulary in at least float32 (bf16 logits lose the small differences that a
    divergence between two close distributions is made of)."""
    return logits.log_softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))
