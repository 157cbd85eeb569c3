"""Rows of tasks to extract instruction vectors from: a data file or a saved dataset folder."""

from __future__ import annotations

import os
from pathlib import Path

from datasets import Dataset, load_dataset, load_from_disk


BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(data: str | os.PathLike) -> Dataset:
    """The rows of ``data``: a saved dataset folder or a .json/.jsonl/.csv/.parquet file."""
    path = Path(data)
    if (path / "dataset_info.json").is_file():
        return load_from_disk(str(path))
    if path.suffix not in BUILDERS or not path.is_file():
        raise ValueError(f"{data}: give a {'/'.join(BUILDERS)} file or a saved dataset folder of task rows.")
    return load_dataset(BUILDERS[path.suffix], data_files=str(path), split="train")
