"""In-context accuracy with and without an instruction vector: the paper's Appendix E check that a vector is
sufficient (added to zero-shot prompts it raises accuracy) and necessary (removed from N-shot prompts it lowers
it)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from tqdm.auto import tqdm

from ..modes import evaluation_mode
from ..tuner import route
from .activations import first_token_right, last_prompt_logits
from .intervention import intervene
from .prompts import EncodedPrompt, padded_batch


@torch.no_grad()
def answered_correctly(
    model: nn.Module,
    prompts: list[EncodedPrompt],
    *,
    pad_token_id: int,
    vector: torch.Tensor | None = None,
    layer: int | None = None,
    scale: float = 1.0,
    top_k: int = 1,
    query_embeddings: torch.Tensor | None = None,
    batch_size: int = 8,
    desc: str = "IV: accuracy",
) -> torch.Tensor:
    """Whether the model's answer to each prompt starts right (its first answer token ranks in the top ``top_k``
    of the next-token logits, as extraction counts a correct prompt; 1: the greedy token), [prompts] bool; with
    ``vector``, ``scale * vector`` is added to decoder layer ``layer``'s output at each prompt's last token
    (``scale=-1`` removes it). A model holding a TKI latent bank routes each prompt by its row of
    ``query_embeddings`` [prompts, key_dim] (the prompt's embedding, as `generate_answers` routes rows)."""
    if vector is not None and layer is None:
        raise ValueError("answered_correctly: a vector needs its layer (InstructionVector.layer).")
    if top_k < 1:
        raise ValueError(f"answered_correctly: top_k={top_k}; count an answer right within the top 1 or more.")
    if query_embeddings is not None and len(query_embeddings) != len(prompts):
        raise ValueError(
            f"answered_correctly: {len(query_embeddings)} query embeddings for {len(prompts)} prompts; give one per "
            "prompt."
        )
    device = next(model.parameters()).device
    right = []
    with evaluation_mode(model):
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
            chunk = prompts[start : start + batch_size]
            batch = padded_batch(chunk, pad_token_id, device)
            queries = None if query_embeddings is None else query_embeddings[start : start + batch_size].to(device)
            with (
                nullcontext() if queries is None else route(model, queries),
                nullcontext() if vector is None else intervene(model, vector, layer, scale=scale),
            ):
                logits = last_prompt_logits(model, batch)
            right.append(first_token_right(logits, chunk, top_k).cpu())
    return torch.cat(right) if right else torch.zeros(0, dtype=torch.bool)
