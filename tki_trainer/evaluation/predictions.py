"""Greedy answers saved as JSON lines beside a run, whole or not at all, and reused when the run is resumed."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset

from .._io import staged_file


def saved_answers(path: str | os.PathLike, rows: Dataset, group: str, answer: Callable[[], list[str]]) -> list[str]:
    """The answers stored at ``path``, or ``answer()``'s, written there with each row's id, ``group`` value and
    references (atomically: an interrupted run leaves no partial file to be taken for a finished one)."""
    path = Path(path)
    if path.is_file():
        return [json.loads(line)["prediction"] for line in path.read_text().splitlines()]
    answers = answer()
    lines = [
        json.dumps({"id": row["id"], group: row[group], "prediction": prediction, "references": row["references"]})
        for row, prediction in zip(rows, answers)
    ]
    with staged_file(path) as staging:
        staging.write_text("".join(line + "\n" for line in lines))
    return answers
