"""Query embeddings: one sentence-encoder vector per prompt, the key TKI retrieves latent tasks with."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from safetensors.torch import load_file, save_file
from trl.data_utils import maybe_convert_to_chatml

from .._io import staged_directory
from .formats import message_text


def query_text(prompt: Any) -> str:
    """The text a prompt is encoded from: the string itself, or a conversation's turns joined by newlines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(message_text(message) for message in prompt)


def prompt_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The turns before the last assistant turn (KR's prompt); all of them when no earlier turn precedes one."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=0)
    return messages[:last] if last else messages


def row_query_text(row: dict[str, Any], text_field: str = "text", tokenizer: Any = None) -> str:
    """One row's query text, from what the model reads before its answer, in every format TRL trains on: the
    prompt; for ``messages`` (or ``conversations``) rows every turn before the last assistant turn; for
    language-modelling rows the text (``text_field``); for pretokenized rows the ids decoded with ``tokenizer``."""
    row = maybe_convert_to_chatml(row)
    if "prompt" in row:
        return query_text(row["prompt"])
    if "messages" in row:
        return query_text(prompt_turns(row["messages"]))
    if text_field in row:
        return row[text_field]
    if "input_ids" in row and tokenizer is not None:
        return tokenizer.decode(row["input_ids"], skip_special_tokens=True)
    raise ValueError(
        f"Query embeddings are encoded from a 'prompt', 'messages' or 'text' column (or 'conversations', or "
        f"'input_ids' with a tokenizer); the row has {sorted(row)}: add a 'query_embedding' column with "
        "tki_trainer.add_query_embeddings."
    )


def query_texts(dataset: Dataset, text_of: Callable[[dict[str, Any]], str] = row_query_text) -> list[str]:
    """One query text per row (`row_query_text` unless ``text_of`` says otherwise)."""
    return [text_of(row) for row in dataset]


def encoder_name(encoder: Any) -> str:
    """The name a sentence-transformers encoder goes by: its model card's base model, else its path."""
    return encoder.model_card_data.base_model or encoder[0].auto_model.config.name_or_path


def add_query_embeddings(
    dataset: Dataset | IterableDataset,
    encoder: Any | None = None,
    *,
    batch_size: int = 64,
    column: str = "query_embedding",
    cache_dir: str | os.PathLike | None = None,
    key_dim: int | None = None,
    text_of: Callable[[dict[str, Any]], str] = row_query_text,
) -> Dataset | IterableDataset:
    """``dataset`` with a ``column`` of unit-norm embeddings of each row's query text (``text_of``, by default
    `row_query_text`: the prompt).

    ``encoder`` is any sentence-transformers model (default: the embedded all-MiniLM-L6-v2). With ``cache_dir``
    the embeddings are stored as safetensors under a hash of the texts and the encoder's name and dimension,
    and reused on the next call. ``key_dim``, the adapter's, is checked against the encoder before any encoding.
    A streaming `IterableDataset` is encoded as its rows stream, ``batch_size`` rows at a time (not cached).
    """
    if encoder is None:
        from ..embedded import load_embedded_encoder

        encoder = load_embedded_encoder()
    name, dim = encoder_name(encoder), encoder.get_embedding_dimension()
    if key_dim is not None and dim != key_dim:
        raise ValueError(
            f"The encoder {name} gives {dim}-dimensional embeddings but the adapter has key_dim={key_dim}: use the "
            f"encoder the adapter was built for, or build the adapter with key_dim={dim}."
        )
    if isinstance(dataset, IterableDataset):
        return dataset.map(
            lambda rows: {column: _encode(encoder, [text_of(row) for row in _rows(rows)], batch_size).tolist()},
            batched=True,
            batch_size=batch_size,
        )
    texts = query_texts(dataset, text_of)
    digest = hashlib.sha256(json.dumps([name, dim, texts]).encode()).hexdigest()[:24]
    cache_file = Path(cache_dir) / f"queries-{digest}.safetensors" if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        embeddings = load_file(cache_file)["query_embeddings"]
    else:
        embeddings = _encode(encoder, texts, batch_size, progress=True)
        if cache_file is not None:
            with staged_directory(cache_file.parent) as staging:
                save_file(
                    {"query_embeddings": embeddings.contiguous()},
                    staging / cache_file.name,
                    metadata={"encoder": name},
                )
    if column in dataset.column_names:
        dataset = dataset.remove_columns(column)
    return dataset.add_column(column, embeddings.numpy().tolist())


def _encode(encoder: Any, texts: list[str], batch_size: int, progress: bool = False) -> torch.Tensor:
    """Unit-norm float32 embeddings [len(texts), dim] on the CPU."""
    embeddings = encoder.encode(
        texts, batch_size=batch_size, show_progress_bar=progress, convert_to_tensor=True, normalize_embeddings=True
    )
    return embeddings.float().cpu()


def _rows(batch: dict[str, list]) -> list[dict[str, Any]]:
    """A batch of columns (`IterableDataset.map` with ``batched=True``) as rows."""
    return [dict(zip(batch, values)) for values in zip(*batch.values())]
