"""Rows for TAGI: the student's (input alone, the instruction in its own column), the teacher's (the instruction in
the prompt), SNI rows in that shape, and plain-text rows for the hypernetwork's pretraining."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from datasets import Dataset


def teacher_prompt(prompt: Any, instruction: str, separator: str = "\n\n") -> Any:
    """The prompt a teacher reads: the instruction, ``separator``, then the student's prompt (a string), or the
    same text leading the first user turn (a conversational prompt), so both render the input the same way."""
    if isinstance(prompt, str):
        return f"{instruction}{separator}{prompt}"
    turns = [dict(turn) for turn in prompt]
    for turn in turns:
        if turn["role"] == "user":
            turn["content"] = f"{instruction}{separator}{turn['content']}"
            return turns
    raise ValueError("A conversational prompt without a user turn has nowhere to put the instruction for the teacher.")


def teacher_rows(dataset: Dataset, instruction_column: str = "instruction", separator: str = "\n\n") -> Dataset:
    """``dataset`` with the instruction moved into the prompt: the rows a teacher LoRA is trained on with
    `SFTTrainer` (Tk-Instruct's encoding), rendered as `TAGITrainer` renders the teacher's side."""
    missing = [column for column in (instruction_column, "prompt", "completion") if column not in dataset.column_names]
    if missing:
        raise ValueError(f"teacher_rows needs prompt/completion rows with {instruction_column!r}; missing {missing}.")
    return dataset.map(
        lambda row: {"prompt": teacher_prompt(row["prompt"], row[instruction_column], separator)},
        desc="Teacher prompts",
    )


SNI_INSTANCE = "Now complete the following example -"
"""Where `sni_prompt`'s instance part starts: the definition and demonstrations before it are the instruction."""


def sni_instruction_rows(dataset: Dataset, separator: str = "\n\n") -> Dataset:
    """SNI rows (`load_sni`, after any `fitted_subset`) split as TAGI reads them: ``instruction`` = the prompt's
    definition and positive examples (as many as the rows were loaded with), ``prompt`` = the instance part alone,
    string or one user turn as the rows were; ``teacher`` = the top of the task's category path (``"Question
    Answering -> Extractive"`` -> ``"Question Answering"``). `teacher_prompt` puts the two back together."""

    def split(row: dict[str, Any]) -> dict[str, Any]:
        conversational = not isinstance(row["prompt"], str)
        text = row["prompt"][-1]["content"] if conversational else row["prompt"]
        instruction, marker, instance = text.partition(separator + SNI_INSTANCE)
        if not marker:
            raise ValueError(f"Row {row['id']}: its prompt has no {SNI_INSTANCE!r} part; load the rows with load_sni.")
        student = SNI_INSTANCE + instance
        return {
            "instruction": instruction,
            "prompt": [{"role": "user", "content": student}] if conversational else student,
            "teacher": row["category"].split(" -> ")[0],
        }

    return dataset.map(split, desc="Instruction rows")


def pretraining_rows(texts: Iterable[str], min_words: int = 24) -> Dataset:
    """TAGI's pretraining rows from plain text: each text's words in three parts, the first as the instruction (the
    hypernetwork reads it), the second as the prompt, the third as the completion; shorter texts are skipped."""
    rows = []
    for text in texts:
        words = text.split()
        if len(words) < min_words:
            continue
        third = len(words) // 3
        parts: Sequence[list[str]] = (words[:third], words[third : 2 * third], words[2 * third :])
        instruction, prompt, completion = (" ".join(part) for part in parts)
        rows.append({"instruction": instruction, "prompt": prompt, "completion": " " + completion})
    if not rows:
        raise ValueError(f"No text has {min_words} words or more: pretraining rows need longer texts.")
    return Dataset.from_list(rows)
