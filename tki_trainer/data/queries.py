"""Query embeddings: one sentence-encoder vector per prompt, the key TKI retrieves latent tasks with."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from datasets import Dataset
from safetensors.torch import load_file, save_file

from .._io import staged_directory
from .formats import messages_to_prompt_completion


def query_text(prompt: Any) -> str:
    """The text a prompt is encoded from: the string itself, or a conversation's turns joined by newlines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(message["content"] for message in prompt)


def query_texts(dataset: Dataset) -> list[str]:
    """One query text per row: the prompt; for messages rows every turn before the last assistant turn; for
    language-modelling rows the text itself."""
    if "prompt" in dataset.column_names:
        return [query_text(prompt) for prompt in dataset["prompt"]]
    if "messages" in dataset.column_names:
        return [query_text(messages_to_prompt_completion({"messages": m})["prompt"]) for m in dataset["messages"]]
    if "text" in dataset.column_names:
        return list(dataset["text"])
    raise ValueError(
        f"Query embeddings are encoded from a 'prompt', 'messages' or 'text' column; the dataset has {dataset.column_names}."
    )


def encoder_name(encoder: Any) -> str:
    """The name a sentence-transformers encoder goes by: its model card's base model, else its path."""
    return encoder.model_card_data.base_model or encoder[0].auto_model.config.name_or_path


def add_query_embeddings(
    dataset: Dataset,
    encoder: Any | None = None,
    *,
    batch_size: int = 64,
    column: str = "query_embedding",
    cache_dir: str | os.PathLike | None = None,
    key_dim: int | None = None,
) -> Dataset:
    """``dataset`` with a ``column`` of unit-norm embeddings of each row's prompt (see `query_texts`).

    ``encoder`` is any sentence-transformers model (default: the embedded all-MiniLM-L6-v2). With ``cache_dir``
    the embeddings are stored as safetensors under a hash of the prompts and the encoder's name and dimension,
    and reused on the next call. ``key_dim``, the adapter's, is checked against the encoder before any encoding.
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
    texts = query_texts(dataset)
    digest = hashlib.sha256(json.dumps([name, dim, texts]).encode()).hexdigest()[:24]
    cache_file = Path(cache_dir) / f"queries-{digest}.safetensors" if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        embeddings = load_file(cache_file)["query_embeddings"]
    else:
        embeddings = (
            encoder.encode(
                texts, batch_size=batch_size, show_progress_bar=True, convert_to_tensor=True, normalize_embeddings=True
            )
            .float()
            .cpu()
        )
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
