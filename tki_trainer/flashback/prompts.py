"""Flashback prompts: loaded from a dataset, a local path or a Hub id, tokenized as `SFTTrainer` tokenizes a prompt,
optionally extended by the reference's continuation (generated once, cached), and drawn a few per training step."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from .._io import staged_file
from ..data.local import load_rows
from ..data.tokenization import tokenize_prompt
from ..tuner import bypass_bank, route
from .reference import Reference


def load_flashback_rows(source: Dataset | str) -> Dataset:
    """Flashback rows with a ``prompt`` column, from a `Dataset`, a saved dataset folder, a data file
    (json/jsonl/parquet/csv) or a Hub id. Completions are dropped (flashbacks are prompts only); a ``messages`` row
    becomes every turn before its last assistant turn, or all of it when it has none."""
    rows = load_rows(source, "flashback_dataset")
    columns = set(rows.column_names)
    if "prompt" not in columns and "messages" in columns:
        rows = rows.map(_messages_prompt, remove_columns="messages", desc="Flashback prompts from messages")
    elif "prompt" not in columns:
        raise ValueError(
            f"Flashback rows need a 'prompt' or 'messages' column; these have {sorted(columns)}: rename the column that "
            "holds the old tasks' prompts to 'prompt'."
        )
    rows = rows.remove_columns([c for c in ("completion", "text") if c in rows.column_names])
    if len(rows) == 0:
        raise ValueError("The flashback dataset is empty: give at least one old-task prompt, or no flashback dataset.")
    return rows


def _messages_prompt(row: dict[str, Any]) -> dict[str, Any]:
    messages = row["messages"]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return {"prompt": messages[:last] or messages}


@dataclass
class FlashbackBatch:
    """Padded flashback sequences; the divergence is taken at every real position."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    query_embeddings: torch.Tensor | None
    group_ids: torch.Tensor | None
    bank: bool
    """Whether the model has a latent bank (which flashbacks without queries bypass)."""

    @property
    def keep(self) -> torch.Tensor:
        return self.attention_mask.bool()

    def mean_per_flashback(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over the flashbacks of each one's mean over its positions (``values``: [positions], in `keep`'s
        order). Every micro-batch holds ``per_step`` flashbacks, so the mean over a step's micro-batches and
        processes is the mean over all its flashbacks, however they are split (a mean over tokens would weigh a
        micro-batch by its length)."""
        lengths = self.attention_mask.sum(1)
        return (values / lengths.repeat_interleave(lengths)).sum() / len(lengths)

    def routing(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """Route the flashbacks through the bank by their own queries (joint latent task learning), or past it."""
        if self.query_embeddings is not None:
            return route(model, self.query_embeddings, self.group_ids)
        return bypass_bank(model) if self.bank else contextlib.nullcontext()


class Flashbacks:
    """The flashback sequences of a run and the seeded order they are drawn in.

    Draw number ``index`` of process ``rank`` (of ``world``) takes the next ``per_step`` rows of one stream of
    seeded permutations of the set (epoch ``e`` seeded with ``seed + e``, as accelerate's seedable sampler does), so
    the processes see disjoint rows and a resumed run draws what the interrupted one would have drawn.
    """

    def __init__(
        self,
        token_ids: list[list[int]],
        *,
        pad_token_id: int,
        per_step: int,
        seed: int,
        query_embeddings: torch.Tensor | None = None,
        group_ids: torch.Tensor | None = None,
        bank: bool = False,
    ) -> None:
        if any(len(ids) == 0 for ids in token_ids):
            raise ValueError(
                "A flashback prompt tokenizes to no tokens: drop empty prompts from the flashback dataset."
            )
        self.token_ids = token_ids
        self.pad_token_id = pad_token_id
        self.per_step = per_step
        self.seed = seed
        self.query_embeddings = query_embeddings
        self.group_ids = group_ids
        self.bank = bank

    def __len__(self) -> int:
        return len(self.token_ids)

    def rows(self, index: int, rank: int = 0, world: int = 1) -> list[int]:
        start = (index * world + rank) * self.per_step
        positions = range(start, start + self.per_step)
        permutations = {}
        for epoch in {p // len(self) for p in positions}:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            permutations[epoch] = torch.randperm(len(self), generator=generator).tolist()
        return [permutations[p // len(self)][p % len(self)] for p in positions]

    def batch(
        self, rows: list[int], device: torch.device | str = "cpu", padding_side: str = "right"
    ) -> FlashbackBatch:
        """The rows as one batch: right-padded for training (TRL's layout), left-padded for generation."""
        ids = [torch.tensor(self.token_ids[i]) for i in rows]
        input_ids = pad_sequence(ids, batch_first=True, padding_value=self.pad_token_id, padding_side=padding_side)
        attention_mask = pad_sequence([torch.ones_like(i) for i in ids], batch_first=True, padding_side=padding_side)
        pick = torch.tensor(rows)
        queries = None if self.query_embeddings is None else self.query_embeddings[pick].to(device)
        groups = None if self.group_ids is None else self.group_ids[pick].to(device)
        return FlashbackBatch(input_ids.to(device), attention_mask.to(device), queries, groups, self.bank)

    def draw(self, index: int, rank: int, world: int, device: torch.device | str) -> FlashbackBatch:
        return self.batch(self.rows(index, rank, world), device)


def tokenize_flashbacks(tokenizer: Any, prompts: list[Any], max_length: int | None) -> list[list[int]]:
    """Each prompt's tokens as `SFTTrainer` tokenizes a prompt, its last ``max_length`` kept (the end is nearest to
    what the model answers; the loaders cut training prompts the same way)."""
    token_ids = [tokenize_prompt(tokenizer, prompt) for prompt in prompts]
    return [ids[-max_length:] if max_length else ids for ids in token_ids]


def end_of_sequence_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """The tokens that end a continuation: the model's generation config's (Llama 3's ``<|eot_id|>`` among them),
    else the tokenizer's end-of-sequence token; none when neither has one."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return []
    return [configured] if isinstance(configured, int) else list(configured)


@torch.no_grad()
def extend_with_continuations(
    flashbacks: Flashbacks,
    reference: Reference,
    *,
    tokens: int,
    eos_token_ids: list[int],
    cache_dir: str | os.PathLike,
    key: dict[str, Any],
    batch_size: int = 8,
) -> None:
    """Append to each flashback the reference's greedy continuation of at most ``tokens`` tokens (stopping after
    the first of ``eos_token_ids``), generated once and cached as safetensors under ``cache_dir`` (keyed by
    ``key``, the model's and tokenizer's fingerprints, plus the prompts, the reference's weights and the routing).
    Under several processes, call it on the main process first: the others then read its file."""
    digest = hashlib.sha256(
        json.dumps(
            {
                **key,
                "tokens": tokens,
                "prompts": flashbacks.token_ids,
                "reference": reference.checksum(),
                "queries": None if flashbacks.query_embeddings is None else flashbacks.query_embeddings.tolist(),
                "groups": None if flashbacks.group_ids is None else flashbacks.group_ids.tolist(),
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    path = Path(cache_dir) / f"continuations-{digest}.safetensors"
    if path.is_file():
        stored = load_file(path)
        continuations = stored["ids"].split(stored["lengths"].tolist())
    else:
        continuations = _generate(flashbacks, reference, tokens, eos_token_ids, batch_size)
        with staged_file(path) as staging:
            lengths = torch.tensor([len(c) for c in continuations])
            save_file({"ids": torch.cat(continuations), "lengths": lengths}, staging)
    flashbacks.token_ids = [prompt + c.tolist() for prompt, c in zip(flashbacks.token_ids, continuations)]


def _generate(
    flashbacks: Flashbacks, reference: Reference, tokens: int, eos_token_ids: list[int], batch_size: int
) -> list[torch.Tensor]:
    model = reference.model
    device = next(model.parameters()).device
    continuations: list[torch.Tensor] = []
    for start in tqdm(range(0, len(flashbacks), batch_size), desc="Flashbacks: reference continuations"):
        rows = list(range(start, min(start + batch_size, len(flashbacks))))
        batch = flashbacks.batch(rows, device, padding_side="left")
        width = batch.input_ids.shape[1]
        with reference.active(), batch.routing(model):
            output = model.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                max_new_tokens=tokens,
                do_sample=False,
                pad_token_id=flashbacks.pad_token_id,
                eos_token_id=eos_token_ids or None,
            )
        for new in output[:, width:].cpu():
            stop = torch.isin(new, torch.tensor(eos_token_ids, dtype=new.dtype)).nonzero()
            continuations.append(new[: int(stop[0]) + 1] if len(stop) else new)
    return continuations
