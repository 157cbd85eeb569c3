"""Super-NaturalInstructions: the raw task JSON of the allenai repository, and the common Hub rows.

Prompts follow the Tk-Instruct encoding the SNI paper evaluates with (task definition, then positive
examples, then the instance). The default split ships train and test task lists only; validation is a
seeded choice of tasks from the train list, as the TKI paper's 700/128/119 split implies.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset

from .formats import as_conversational


def sni_prompt(definition: str, instance_input: str, positive_examples: Sequence[dict[str, Any]] = ()) -> str:
    """Definition, numbered positive examples, then the instance, ending where the answer starts."""
    parts = [f"Definition: {definition.strip()}"]
    for number, example in enumerate(positive_examples, start=1):
        parts.append(f"Positive Example {number} -\nInput: {example['input'].strip()}\nOutput: {example['output'].strip()}")
    parts.append(f"Now complete the following example -\nInput: {instance_input.strip()}\nOutput: ")
    return "\n\n".join(parts)


def sni_splits(repo_dir: str | os.PathLike, num_validation: int = 128, seed: int = 0) -> dict[str, list[str]]:
    """Task names per split of the default SNI split; ``validation`` is a seeded choice from the train list,
    removed from ``train``."""
    splits = Path(repo_dir) / "splits" / "default"
    lists = {}
    for split in ("train", "test"):
        path = splits / f"{split}_tasks.txt"
        if not path.is_file():
            raise ValueError(f"No {path}: pass the root of a natural-instructions checkout (it holds splits/ and tasks/).")
        lists[split] = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    validation = sorted(random.Random(seed).sample(lists["train"], num_validation))
    lists["validation"] = validation
    lists["train"] = [task for task in lists["train"] if task not in set(validation)]
    return lists


def load_sni(
    repo_dir: str | os.PathLike,
    tasks: Sequence[str],
    *,
    max_instances: int = 100,
    num_positive: int = 2,
    seed: int = 0,
    conversational: bool = False,
) -> Dataset:
    """At most ``max_instances`` seeded instances of each task, as prompt/completion rows.

    ``completion`` is the first reference output; ``references`` keeps them all for evaluation.
    """
    rows = []
    for task in tasks:
        path = Path(repo_dir) / "tasks" / f"{task}.json"
        if not path.is_file():
            raise ValueError(f"No task file {path}: check the task name and the natural-instructions checkout.")
        data = json.loads(path.read_text())
        instances = data["Instances"]
        if len(instances) > max_instances:
            instances = random.Random(f"{seed}-{task}").sample(instances, max_instances)
        definition = " ".join(data["Definition"])
        examples = data["Positive Examples"][:num_positive]
        for instance in instances:
            rows.append(
                {
                    "id": instance["id"],
                    "task": task,
                    "prompt": sni_prompt(definition, instance["input"], examples),
                    "completion": instance["output"][0],
                    "references": list(instance["output"]),
                }
            )
    dataset = Dataset.from_list(rows)
    return as_conversational(dataset) if conversational else dataset


def sni_from_hub_rows(dataset: Dataset, *, conversational: bool = False) -> Dataset:
    """Rows of the common Hub copies of SNI (``task_name``, ``id``, ``definition``, ``inputs``, ``targets``) as
    prompt/completion rows; those copies carry no positive examples."""
    missing = {"task_name", "id", "definition", "inputs", "targets"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"SNI Hub rows need the columns {sorted(missing)}; this dataset has {dataset.column_names}.")
    converted = dataset.map(
        lambda row: {
            "task": row["task_name"],
            "prompt": sni_prompt(row["definition"], row["inputs"]),
            "completion": row["targets"],
            "references": [row["targets"]],
        },
        remove_columns=[c for c in dataset.column_names if c != "id"],
        desc="Formatting SNI rows",
    )
    return as_conversational(converted) if conversational else converted
