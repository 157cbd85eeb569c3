"""Super-NaturalInstructions: the raw task JSON of the allenai repository, and the common Hub rows.

Prompts follow the Tk-Instruct encoding the SNI paper evaluates with (task definition, then positive
examples, then the instance). The default split ships train and test task lists only; validation is a
seeded choice of tasks from the train list, as the TKI paper's 700/128/119 split implies.

Rows keep the parts their prompt is built from (``definition``, ``positive_examples``, ``instance_input``), so
that `fit_sni_prompts` can shorten a prompt where the task can spare it (examples first, never the definition),
and what reporting needs: the task's ``category`` and the output of its first positive example (``demo_output``,
the answer of SNI's copy-demo heuristic).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .formats import as_conversational
from .tokenization import tokenize_row


logger = logging.getLogger(__name__)

UNCATEGORIZED = "Uncategorized"
PROMPT_PARTS = ("definition", "positive_examples", "instance_input")


def sni_prompt(definition: str, instance_input: str, positive_examples: Sequence[dict[str, Any]] = ()) -> str:
    """Definition, numbered positive examples, then the instance, ending where the answer starts."""
    parts = [f"Definition: {definition.strip()}"]
    for number, example in enumerate(positive_examples, start=1):
        parts.append(
            f"Positive Example {number} -\nInput: {example['input'].strip()}\nOutput: {example['output'].strip()}"
        )
    parts.append(f"Now complete the following example -\nInput: {instance_input.strip()}\nOutput: ")
    return "\n\n".join(parts)


def sni_splits(repo_dir: str | os.PathLike, num_validation: int | float = 128, seed: int = 0) -> dict[str, list[str]]:
    """Task names per split of the default SNI split; ``validation`` is a seeded choice from the train list,
    removed from ``train``.

    ``num_validation`` is a number of tasks (the TKI paper's 128 of 756) or, for checkouts of any size, a fraction
    of the train list (rounded, at least one task).
    """
    splits = Path(repo_dir) / "splits" / "default"
    lists = {}
    for split in ("train", "test"):
        path = splits / f"{split}_tasks.txt"
        if not path.is_file():
            raise ValueError(
                f"No {path}: pass the root of a natural-instructions checkout (it holds splits/ and tasks/)."
            )
        lists[split] = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    count = _validation_count(num_validation, len(lists["train"]))
    validation = sorted(random.Random(seed).sample(lists["train"], count))
    lists["validation"] = validation
    lists["train"] = [task for task in lists["train"] if task not in set(validation)]
    return lists


def _validation_count(num_validation: int | float, num_train: int) -> int:
    if isinstance(num_validation, float):
        if not 0 < num_validation < 1:
            raise ValueError(
                f"num_validation={num_validation} is a float: give a fraction of the train tasks between 0 and 1."
            )
        count = max(1, round(num_validation * num_train))
    else:
        count = num_validation
    if not 0 <= count < num_train:
        raise ValueError(
            f"num_validation={num_validation} asks for {count} validation tasks but the train list has {num_train}: "
            "pass fewer tasks or a fraction of the train list (e.g. 0.15)."
        )
    return count


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

    ``completion`` is the first reference output; ``references`` keeps them all for evaluation. ``category`` is the
    task's first ``Categories`` entry (SNI's task category; ``"Uncategorized"`` in a task file without one).
    ``definition``, ``positive_examples`` (the first ``num_positive``) and ``instance_input`` rebuild the prompt with
    `sni_prompt`; ``demo_output`` is the output of the task's first positive example, whether or not the prompt
    shows it.
    """
    rows = []
    for task in tasks:
        path = Path(repo_dir) / "tasks" / f"{task}.json"
        if not path.is_file():
            raise ValueError(f"No task file {path}: check the task name and the natural-instructions checkout.")
        data = json.loads(path.read_text())
        instances = _at_most(data["Instances"], task, max_instances, seed)
        definition = " ".join(data["Definition"])
        all_examples = [{"input": e["input"], "output": e["output"]} for e in data["Positive Examples"]]
        examples = all_examples[:num_positive]
        category = (data.get("Categories") or [UNCATEGORIZED])[0]
        demo_output = all_examples[0]["output"] if all_examples else ""
        for instance in instances:
            rows.append(
                {
                    "id": instance["id"],
                    "task": task,
                    "category": category,
                    "prompt": sni_prompt(definition, instance["input"], examples),
                    "completion": instance["output"][0],
                    "references": list(instance["output"]),
                    "definition": definition,
                    "positive_examples": examples,
                    "instance_input": instance["input"],
                    "demo_output": demo_output,
                }
            )
    dataset = Dataset.from_list(rows)
    return as_conversational(dataset) if conversational else dataset


def _at_most(instances: list, task: str, max_instances: int | None, seed: int) -> list:
    """At most ``max_instances`` of one task's instances, drawn with a seed of its own (``seed`` and the task name),
    so a task's draw does not depend on which other tasks are loaded."""
    if max_instances is None or len(instances) <= max_instances:
        return instances
    return random.Random(f"{seed}-{task}").sample(instances, max_instances)


def sni_from_hub_rows(
    dataset: Dataset, *, max_instances: int | None = None, seed: int = 0, conversational: bool = False
) -> Dataset:
    """Rows of the common Hub copies of SNI (``task_name``, ``id``, ``definition``, ``inputs``, ``targets``) as
    prompt/completion rows; those copies carry no positive examples (nor categories). ``max_instances``: at most that
    many seeded rows per task, drawn as `load_sni` draws a task file's instances (tasks in order of first appearance,
    each task's rows together)."""
    missing = {"task_name", "id", "definition", "inputs", "targets"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"SNI Hub rows need the columns {sorted(missing)}; this dataset has {dataset.column_names}.")
    if max_instances is not None:
        members: dict[str, list[int]] = {}
        for index, task in enumerate(dataset["task_name"]):
            members.setdefault(task, []).append(index)
        dataset = dataset.select(
            [index for task, rows in members.items() for index in _at_most(rows, task, max_instances, seed)]
        )
    converted = dataset.map(
        lambda row: {
            "task": row["task_name"],
            "prompt": sni_prompt(row["definition"], row["inputs"]),
            "completion": row["targets"],
            "references": [row["targets"]],
            "definition": row["definition"],
            "positive_examples": [],
            "instance_input": row["inputs"],
        },
        remove_columns=[c for c in dataset.column_names if c != "id"],
        desc="Formatting SNI rows",
    )
    return as_conversational(converted) if conversational else converted


@dataclass
class SniFitReport:
    """How `fit_sni_prompts` fitted the rows: ``kept`` as they were; ``examples_dropped``: without some positive
    examples (the last first), the instance whole; ``instance_cut``: without any example and with the start of the
    instance input cut; ``dropped``: removed, as the definition and an empty instance do not fit."""

    kept: int = 0
    examples_dropped: int = 0
    instance_cut: int = 0
    dropped: int = 0

    def __str__(self) -> str:
        return (
            f"{self.kept} rows fit, {self.examples_dropped} without some positive examples, {self.instance_cut} "
            f"without examples and with the instance input cut from the left, {self.dropped} rows dropped"
        )


def fit_sni_prompts(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, chat_template: str | None = None
) -> tuple[Dataset, SniFitReport]:
    """Fit SNI rows (of `load_sni` or `sni_from_hub_rows`, standard or conversational) into ``max_length`` tokens as
    TRL will tokenize them, keeping what the task needs: positive examples go first (the last one first), then the
    instance input is cut from the left inside its "Now complete the following example" frame; the definition is
    never cut, and a row where even the definition and an empty instance do not fit is dropped.

    ``positive_examples`` and ``instance_input`` are updated with the prompt, so they still rebuild it. Cut points are
    token boundaries of the instance input, found by a bisection that starts where the excess says.
    """
    missing = {"prompt", "completion", *PROMPT_PARTS} - set(dataset.column_names)
    if missing:
        raise ValueError(
            f"fit_sni_prompts needs the columns {sorted(missing)} that load_sni and sni_from_hub_rows write; "
            "for other prompt/completion rows use tki_trainer.data.fit_prompts."
        )
    if not tokenizer.is_fast:
        raise ValueError(
            "fit_sni_prompts cuts instance inputs at token offsets: load a fast tokenizer (use_fast=True)."
        )

    def fit(row: dict) -> dict:
        return _fit_row(tokenizer, row, max_length, chat_template)

    marked = dataset.map(fit, desc=f"Fitting SNI prompts into {max_length} tokens")
    outcome = marked["_fit"]
    report = SniFitReport(
        *(outcome.count(status) for status in ("kept", "examples_dropped", "instance_cut", "dropped"))
    )
    fitted = marked.filter(lambda status: status != "dropped", input_columns="_fit").remove_columns("_fit")
    logger.info("fit SNI prompts to %d tokens: %s", max_length, report)
    return fitted, report


def _fit_row(tokenizer: PreTrainedTokenizerBase, row: dict, max_length: int, chat_template: str | None) -> dict:
    definition, examples, instance = (row[part] for part in PROMPT_PARTS)
    written = sni_prompt(definition, instance, examples)

    def candidate(kept_examples: list[dict], text: str) -> dict:
        prompt = _replace_text(row["prompt"], written, sni_prompt(definition, text, kept_examples), row.get("id"))
        return {"prompt": prompt, "positive_examples": kept_examples, "instance_input": text}

    def excess(fitted: dict) -> int:
        return len(tokenize_row(tokenizer, fitted["prompt"], row["completion"], chat_template).input_ids) - max_length

    for keep in range(len(examples), -1, -1):
        fitted = candidate(examples[:keep], instance)
        over = excess(fitted)
        if over <= 0:
            return {**fitted, "_fit": "kept" if keep == len(examples) else "examples_dropped"}
    if excess(candidate([], "")) > 0:
        return {"prompt": row["prompt"], "positive_examples": examples, "instance_input": instance, "_fit": "dropped"}
    offsets = tokenizer(instance, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    cuts = [*sorted({start for start, _ in offsets if start > 0}), len(instance)]
    # Bisect for the first cut that fits (the whole instance, below cuts[0], does not; the empty one does), probing
    # first where cutting ``over`` tokens lands and its neighbours: usually two tokenizations.
    guess = min(over, len(cuts)) - 1
    probes = (guess, guess - 1, guess + 1)
    low, high = -1, len(cuts) - 1
    while high - low > 1:
        middle = next((probe for probe in probes if low < probe < high), (low + high) // 2)
        if excess(candidate([], instance[cuts[middle] :])) <= 0:
            high = middle
        else:
            low = middle
    return {**candidate([], instance[cuts[high] :]), "_fit": "instance_cut"}


def _replace_text(prompt: Any, written: str, text: str, row_id: Any) -> Any:
    """``prompt`` with its SNI text ``written`` (the whole string, or the message holding it) replaced by ``text``."""
    if isinstance(prompt, str) and prompt == written:
        return text
    if isinstance(prompt, list):
        for index, message in enumerate(prompt):
            if message["content"] == written:
                return [*prompt[:index], {**message, "content": text}, *prompt[index + 1 :]]
    raise ValueError(
        f"Row {row_id!r}: its prompt is not sni_prompt(definition, instance_input, positive_examples) of its own "
        "columns; fit the rows load_sni or sni_from_hub_rows wrote, or use tki_trainer.data.fit_prompts."
    )
