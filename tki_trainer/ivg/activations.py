"""Task-conditioned head activations: each head's output at the last prompt token, averaged over the N-shot
prompts of a task that the model answers correctly (the paper's eq. 1, after Todd et al.)."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..logits import logits_at
from .heads import AttentionHeads
from .prompts import EncodedPrompt, padded_batch


def first_token_right(logits: torch.Tensor, prompts: list[EncodedPrompt], top_k: int | None) -> torch.Tensor:
    """Whether each prompt's first answer token ranks among the ``top_k`` most likely next tokens of its row of
    ``logits`` ([prompts, vocab]; ties count against it); all True when ``top_k`` is None."""
    targets = torch.tensor([p.answer_ids[0] for p in prompts], device=logits.device)
    if top_k is None:
        return torch.ones_like(targets, dtype=torch.bool)
    return (logits > logits.gather(1, targets[:, None])).sum(1) < top_k


def last_prompt_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The next-token logits at each row's last prompt token of a `padded_batch`, [rows, vocab] (the head runs
    there only)."""
    keep = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    keep[torch.arange(len(batch["last"]), device=keep.device), batch["last"]] = True
    return logits_at(model, keep, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


@torch.no_grad()
def task_activations(
    model: nn.Module,
    heads: AttentionHeads,
    prompts: list[EncodedPrompt],
    *,
    pad_token_id: int,
    batch_size: int,
    correct_top_k: int | None,
    desc: str = "IV: head activations",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean head activations over the prompts answered correctly, [layers, heads, head_dim] float32 (zeros
    when none is), and which prompts were, [prompts] bool.

    A prompt counts as answered correctly when the first answer token ranks among the ``correct_top_k`` most
    likely next tokens (1: the model's greedy answer starts right); ``None`` keeps every prompt. One forward per
    batch of prompts captures the activations and the logits at the last prompt token together.
    """
    device = next(model.parameters()).device
    total = torch.zeros(heads.shape)
    correct = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        chunk = prompts[start : start + batch_size]
        batch = padded_batch(chunk, pad_token_id, device)
        with heads.capture(batch["last"]) as capture:
            logits = last_prompt_logits(model, batch)
        right = first_token_right(logits, chunk, correct_top_k)
        total += capture.activations[right].float().sum(0).cpu()
        correct.append(right.cpu())
    correct = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
    return total / max(int(correct.sum()), 1), correct
