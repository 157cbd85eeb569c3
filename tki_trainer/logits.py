"""Logits at chosen positions only, from the model's own forward and LM head."""

from __future__ import annotations

import torch
from torch import nn

from .modes import evaluation_mode


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


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The logits a causal LM's forward makes of its decoder's last hidden states ``hidden`` [..., hidden]: the
    output head, then what the forward applies after it in transformers' models (Cohere's ``logit_scale``,
    Granite's ``logits_scaling``, Gemma's ``final_logit_softcapping``). For a trainer whose loss builds no logits
    (TRL's fused head) but needs some positions'; `check_head_logits` confirms a model does nothing else."""
    head = model.get_output_embeddings()
    logits = head(hidden.to(head.weight.device))
    config = model.config.get_text_config()
    if (scale := getattr(config, "logit_scale", None)) is not None:
        logits = logits * scale
    if (scaling := getattr(config, "logits_scaling", None)) is not None:
        logits = logits / scaling
    if (cap := getattr(config, "final_logit_softcapping", None)) is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def check_head_logits(model: nn.Module, decoder: nn.Module, user: str) -> None:
    """Refuse a model whose forward makes its logits otherwise than `head_logits` (one forward of three tokens)."""
    ids = torch.tensor([[1, 2, 3]], device=model.get_output_embeddings().weight.device) % model.config.vocab_size
    with evaluation_mode(model):
        expected = model(input_ids=ids, use_cache=False).logits
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
    if not torch.allclose(head_logits(model, hidden), expected.to(hidden.dtype), rtol=1e-3, atol=1e-3):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        raise ValueError(
            f"{user} computes logits from the last hidden state with the output head (and Cohere's, Granite's or "
            f"Gemma's scaling), but {type(base).__name__} makes its logits otherwise: train without this term "
            "(its weight 0), or use a model whose head is a plain projection."
        )
