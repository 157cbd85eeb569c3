"""Batched greedy generation with each example's own adapter: routed into the latent bank by its query (TKI), or
the LoRA generated from its instruction (TAGI)."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..modes import evaluation_mode
from ..tagi.tuner import InstructionLoraModel, generate_for
from ..tuner.model import TKIModel, route


def answer_budgets(
    tokenizer: PreTrainedTokenizerBase, references: list[list[str]], groups: list[str], cap: int = 256
) -> dict[str, int]:
    """``max_new_tokens`` per group (task or cluster): its longest reference in tokens, plus a quarter and 8
    tokens of slack, at most ``cap``."""
    longest: dict[str, int] = defaultdict(int)
    for options, group in zip(references, groups):
        for reference in options:
            longest[group] = max(longest[group], len(tokenizer(reference, add_special_tokens=False)["input_ids"]))
    return {group: min(cap, int(length * 1.25) + 8) for group, length in longest.items()}


def _prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: Any) -> str:
    """The prompt as the model saw it in training: chat-templated with the generation prompt, or the string."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    *,
    max_new_tokens: int | dict[str, int] = 64,
    group_column: str | None = None,
    query_column: str = "query_embedding",
    instruction_column: str = "instruction_embedding",
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers for the ``prompt`` column, in dataset order, stopping at end-of-sequence.

    Rows are batched within their group, by length (left padding); a model holding the TKI tuner is routed with each row's
    ``query_column`` and no group ids, so unseen inputs retrieve per ``inference_retrieval``; a model holding an
    instruction-generated LoRA gets each row's LoRA from its ``instruction_column`` (generated once per distinct
    instruction of a batch). ``max_new_tokens`` is a number or a budget per value of ``group_column`` (see
    `answer_budgets`).
    """
    column, per_row = _per_row_adapter(model, query_column, instruction_column)
    if column is not None and column not in dataset.column_names:
        raise ValueError(
            f"The model's adapter is chosen per row but the dataset has no '{column}' column: add it with "
            "add_query_embeddings (TKI: the prompt's embedding; TAGI: the instruction's, text_of=lambda row: "
            "row['instruction'])."
        )
    texts = [_prompt_text(tokenizer, prompt) for prompt in dataset["prompt"]]
    groups = dataset[group_column] if group_column else [""] * len(texts)
    budget = max_new_tokens if isinstance(max_new_tokens, dict) else defaultdict(lambda: max_new_tokens)
    order = sorted(range(len(texts)), key=lambda i: (groups[i], len(texts[i])))
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad_token = tokenizer.pad_token
    if pad_token is None:  # Llama-3's tokenizers have none; left padding is masked, so end-of-sequence serves
        tokenizer.pad_token = tokenizer.eos_token
    answers = [""] * len(texts)
    device = next(model.parameters()).device
    by_group: dict[str, list[int]] = defaultdict(list)
    for i in order:
        by_group[groups[i]].append(i)
    batches = [rows[i : i + batch_size] for rows in by_group.values() for i in range(0, len(rows), batch_size)]
    try:
        with evaluation_mode(model):
            for batch in tqdm(batches, desc="Generating answers"):
                inputs = tokenizer(
                    [texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False
                ).to(device)
                with (
                    per_row(model, torch.tensor([dataset[i][column] for i in batch]))
                    if column
                    else contextlib.nullcontext()
                ):
                    output = model.generate(
                        **inputs,
                        max_new_tokens=budget[groups[batch[0]]],
                        do_sample=False,
                        pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id,
                    )
                for i, ids in zip(batch, output[:, inputs["input_ids"].shape[1] :]):
                    answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = padding_side
        if pad_token is None:
            tokenizer.pad_token = None
    return answers


def _per_row_adapter(
    model: torch.nn.Module, query_column: str, instruction_column: str
) -> tuple[str | None, Callable[..., contextlib.AbstractContextManager] | None]:
    """The column a per-row adapter is chosen by and the context that applies it, or None for a model without one."""
    for module in model.modules():
        if isinstance(module, TKIModel):
            return query_column, route
        if isinstance(module, InstructionLoraModel):
            return instruction_column, generate_for
    return None, None
