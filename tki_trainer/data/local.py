"""Rows from where users keep them: local JSON / JSON-lines files with prompt/completion or messages rows, and one
split of any dataset a setting names (a data file, a saved dataset folder or a Hub id)."""

from __future__ import annotations

import os
from pathlib import Path

from datasets import Dataset, load_dataset, load_from_disk

from .formats import messages_to_prompt_completion, with_ids


FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(source: Dataset | str | os.PathLike, setting: str) -> Dataset:
    """One split of rows from a `Dataset`, a saved dataset folder, a data file (json/jsonl/parquet/csv) or a Hub
    id; ``setting`` names the argument ``source`` came from, for the error that names the fix."""
    if isinstance(source, Dataset):
        return source
    path = Path(source)
    if (path / "dataset_info.json").is_file():
        rows = load_from_disk(str(path))
    elif path.suffix in FILE_BUILDERS or path.is_file():
        if path.suffix not in FILE_BUILDERS or not path.is_file():
            raise ValueError(
                f"{setting}={source}: give a {'/'.join(FILE_BUILDERS)} file, a saved dataset folder or a Hub id."
            )
        rows = load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    else:
        rows = load_dataset(str(source), split="train")
    if not isinstance(rows, Dataset):
        raise ValueError(f"{setting}={source!r} holds several splits: save or pass the one split to use.")
    return rows


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
