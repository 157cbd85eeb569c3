"""Local JSON / JSON-lines files with prompt/completion or messages rows."""

from __future__ import annotations

import os

from datasets import Dataset, load_dataset

from .formats import messages_to_prompt_completion, with_ids


def load_local(path: str | os.PathLike, *, split_messages: bool = True) -> Dataset:
    """Rows of a ``.json`` or ``.jsonl`` file as a `Dataset`.

    ``messages`` rows are split into prompt/completion at their last assistant turn (``split_messages``).
    Rows without an ``id`` get one: a hash of their content, stable across runs and row order.
    """
    if not os.path.isfile(path):
        raise ValueError(f"No file at {path}: pass a .json or .jsonl file of prompt/completion or messages rows.")
    dataset = load_dataset("json", data_files=str(path), split="train")
    columns = set(dataset.column_names)
    if "messages" in columns and split_messages:
        dataset = dataset.map(messages_to_prompt_completion, remove_columns="messages", desc="Splitting messages")
    elif not ({"prompt", "completion"} <= columns or "messages" in columns):
        raise ValueError(f"{path} needs prompt/completion or messages rows; its columns are {sorted(columns)}.")
    return with_ids(dataset)
