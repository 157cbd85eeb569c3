"""Causal effect of each attention head: on a counterfactual prompt (label-shuffled demonstrations, which
usually lead the model astray), put the head's task-conditioned activation at the last prompt token and measure
how much more likely the correct answer becomes (the paper's eq. 2, after Todd et al.).

Every head of the model is scored on every prompt. The patched runs are batched: one forward per batch of
heads, row ``i`` patching head ``i`` of the batch. A patch at the last prompt token changes nothing before it,
so with ``reuse_prefix`` the prompt up to that token runs once and only the rest runs per batch of heads,
from a copy of its key/value cache.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Literal

import torch
from peft import PeftModel
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from .heads import AttentionHeads, text_config
from .prompts import EncodedPrompt


EffectMetric = Literal["probability", "log_likelihood"]
EFFECT_METRICS = ("probability", "log_likelihood")
"""``probability``: rise of the first answer token's probability (the paper, Todd et al.); ``log_likelihood``:
rise of the whole answer's mean log-likelihood, teacher-forced (the authors' code, ``--gen``: minus the change of
the answer's NLL)."""


def cache_keyword(model: nn.Module) -> str:
    """The forward keyword of the key/value cache (``cache`` in recent transformers, ``past_key_values`` before)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _answer_score(logits: torch.Tensor, targets: torch.Tensor, metric: str) -> torch.Tensor:
    """[rows] score of the answer from the logits at the positions that predict it, [rows, positions, vocab]."""
    log_probs = logits.float().log_softmax(-1)
    picked = log_probs.gather(2, targets[: log_probs.shape[1]].expand(len(logits), -1).unsqueeze(-1)).squeeze(-1)
    return picked[:, 0].exp() if metric == "probability" else picked.mean(1)


def _runner(
    model: nn.Module, prompt: EncodedPrompt, metric: str, reuse_prefix: bool, device: torch.device
) -> tuple[Callable[[int], torch.Tensor], int]:
    """A function running ``rows`` copies of the prompt (plus the answer but its last token, when the whole answer
    is scored) and returning the logits that predict the answer; and the position of the last prompt token in
    its inputs."""
    sequence = prompt.prompt_ids + (prompt.answer_ids[:-1] if metric == "log_likelihood" else [])
    patch_at = len(prompt.prompt_ids) - 1
    scored = len(sequence) - patch_at
    ids = torch.tensor([sequence], device=device)
    if not reuse_prefix or patch_at == 0:

        def rerun(rows: int) -> torch.Tensor:
            return model(input_ids=ids.expand(rows, -1), logits_to_keep=scored, use_cache=False).logits

        return rerun, patch_at
    keyword = cache_keyword(model)
    prefix = DynamicCache(config=text_config(model))
    model(input_ids=ids[:, :patch_at], use_cache=True, logits_to_keep=1, **{keyword: prefix})

    def run(rows: int) -> torch.Tensor:
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(rows)
        return model(input_ids=ids[:, patch_at:].expand(rows, -1), use_cache=True, **{keyword: cache}).logits

    return run, 0


@torch.no_grad()
def causal_effects(
    model: nn.Module,
    heads: AttentionHeads,
    prompts: list[EncodedPrompt],
    mean_activations: torch.Tensor,
    *,
    metric: EffectMetric = "probability",
    add: bool = False,
    heads_per_batch: int = 64,
    reuse_prefix: bool = True,
    desc: str = "IV: causal effects",
) -> torch.Tensor:
    """The causal effect of every head on every prompt, [prompts, layers, heads] float32: the answer's score
    (``metric``) with the head's output at the last prompt token replaced by ``mean_activations[layer, head]``
    ([layers, heads, head_dim]; added to it instead with ``add``), minus the score without the patch."""
    if metric not in EFFECT_METRICS:
        raise ValueError(f"metric must be one of {EFFECT_METRICS}, got {metric!r}.")
    device = next(model.parameters()).device
    num_layers, num_heads, _ = heads.shape
    layers = torch.arange(num_layers).repeat_interleave(num_heads)
    head_ids = torch.arange(num_heads).repeat(num_layers)
    effects = torch.zeros(len(prompts), num_layers * num_heads)
    for p, prompt in enumerate(tqdm(prompts, desc=desc, leave=False)):
        run, patch_at = _runner(model, prompt, metric, reuse_prefix, device)
        targets = torch.tensor(prompt.answer_ids, device=device)
        clean = _answer_score(run(1), targets, metric)
        for start in range(0, len(layers), heads_per_batch):
            pick = slice(start, start + heads_per_batch)
            rows = len(layers[pick])
            positions = torch.full((rows,), patch_at)
            values = mean_activations[layers[pick], head_ids[pick]]
            with heads.patch(layers[pick], head_ids[pick], positions, values, add=add):
                patched = _answer_score(run(rows), targets, metric)
            effects[p, pick] = (patched - clean).cpu()
    return effects.view(len(prompts), num_layers, num_heads)
