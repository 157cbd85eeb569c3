"""BIG-bench JSON tasks, read in place from the ``bigbench==1.0.0`` source distribution (evaluation only).

``pip download --no-deps bigbench==1.0.0`` gives a ``.tar.gz`` holding ``bigbench/benchmark_tasks/<task>/task.json``;
the requested tasks are read from it in one pass, nothing is extracted or copied. Prompts follow BIG-bench's
JSON-task conventions (task prefix, input and output prefixes; multiple-choice options appended to the input)
and multiple-choice tasks become generation: the completion is the best-scored option.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset

from .formats import as_conversational


def _read_tasks(source: str | os.PathLike, tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``task.json`` of each task (``name`` or ``name/subtask``) from the sdist archive or an extracted tree."""
    wanted = {f"bigbench/benchmark_tasks/{task}/task.json": task for task in tasks}
    found: dict[str, dict[str, Any]] = {}
    source = Path(source)
    if source.is_dir():
        for relative, task in wanted.items():
            path = next(source.glob(f"**/{relative}"), None)
            if path is not None:
                found[task] = json.loads(path.read_text())
    elif source.is_file():
        with tarfile.open(source) as archive:
            for member in archive:
                relative = member.name.split("/", 1)[-1]
                if relative in wanted:
                    found[wanted[relative]] = json.load(archive.extractfile(member))
                    if len(found) == len(wanted):
                        break
    else:
        raise ValueError(
            f"No BIG-bench source at {source}: run `pip download --no-deps bigbench==1.0.0` and pass the .tar.gz."
        )
    missing = [task for task in tasks if task not in found]
    if missing:
        raise ValueError(
            f"BIG-bench tasks not found in {source}: {missing} (composite tasks are named 'task/subtask')."
        )
    return found


def bigbench_rows(task: str, data: dict[str, Any], max_examples: int | None = None) -> list[dict[str, Any]]:
    """Prompt/completion rows of one task with every acceptable answer in ``references``."""
    if "examples" not in data:
        raise ValueError(
            f"BIG-bench task {task!r} has no examples of its own: name one of its subtasks as '{task}/<subtask>'."
        )
    task_prefix = data.get("task_prefix") or ""
    input_prefix = data.get("example_input_prefix", "\nQ: ")
    output_prefix = data.get("example_output_prefix", "\nA: ")
    choice_prefix = data.get("choice_prefix", "\n  choice: ")
    append_choices = data.get("append_choices_to_input", True) is not False
    rows = []
    for index, example in enumerate(data["examples"][:max_examples]):
        text = example["input"]
        if "target_scores" in example:
            scores = example["target_scores"]
            if append_choices:
                text += "".join(choice_prefix + choice for choice in scores)
            best = max(scores.values())
            references = [choice for choice, score in scores.items() if score == best]
        else:
            target = example["target"]
            references = [target] if isinstance(target, str) else list(target)
        rows.append(
            {
                "id": f"{task}-{index}",
                "task": task,
                "prompt": (task_prefix + input_prefix + text + output_prefix).lstrip(),
                "completion": references[0],
                "references": references,
            }
        )
    return rows


def load_bigbench(
    source: str | os.PathLike, tasks: Sequence[str], *, max_examples: int | None = None, conversational: bool = False
) -> Dataset:
    """Rows of the given BIG-bench tasks, at most ``max_examples`` each, in file order."""
    data = _read_tasks(source, tasks)
    dataset = Dataset.from_list([row for task in tasks for row in bigbench_rows(task, data[task], max_examples)])
    return as_conversational(dataset) if conversational else dataset
