"""In-context accuracy with and without an instruction vector: the paper's Appendix E check that a vector is
sufficient (added to zero-shot prompts it raises accuracy) and necessary (removed from N-shot prompts it lowers
it)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from tqdm.auto import tqdm

from ..modes import evaluation_mode
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
    batch_size: int = 8,
    desc: str = "IV: accuracy",
) -> torch.Tensor:
    """Whether the model's greedy answer to each prompt starts right (its first answer token ranks in the top
    ``top_k``, as extraction counts a correct prompt), [prompts] bool; with ``vector``, ``scale * vector`` is added
    to decoder layer ``layer``'s output at each prompt's last token (``scale=-1`` removes it)."""
    if vector is not None and layer is None:
        raise ValueError("answered_correctly: a vector needs its layer (InstructionVector.layer).")
    device = next(model.parameters()).device
    right = []
    with evaluation_mode(model):
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
            chunk = prompts[start : start + batch_size]
            batch = padded_batch(chunk, pad_token_id, device)
            with nullcontext() if vector is None else intervene(model, vector, layer, scale=scale):
                logits = last_prompt_logits(model, batch)
            right.append(first_token_right(logits, chunk, top_k).cpu())
    return torch.cat(right) if right else torch.zeros(0, dtype=torch.bool)
