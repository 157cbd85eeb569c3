"""The TAGI collator: TRL's collated batch plus each example's instruction embedding and, with teachers, the
teacher's side of the batch (its prompt holds the instruction) and where the two sides' answer tokens lie."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence


INSTRUCTION_EMBEDDINGS = "instruction_embeddings"
TEACHER_INDEX = "teacher_index"
TEACHER_INPUT_IDS = "teacher_input_ids"
TEACHER_ATTENTION_MASK = "teacher_attention_mask"
STUDENT_DISTILLED = "student_distilled"
TEACHER_DISTILLED = "teacher_distilled"
TEACHER_KEYS = (TEACHER_INDEX, TEACHER_INPUT_IDS, TEACHER_ATTENTION_MASK, STUDENT_DISTILLED, TEACHER_DISTILLED)

ROW_COLUMNS = (
    "teacher_index",
    "teacher_input_ids",
    "teacher_prompt_length",
    "student_prompt_length",
    "distill_length",
)
"""Columns `prepare_rows` adds for the teacher's side."""


def _span(length: int, starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[rows, length] masks of the positions ``starts[i] <= p < starts[i] + counts[i]``."""
    positions = torch.arange(length).unsqueeze(0)
    return (positions >= starts.unsqueeze(1)) & (positions < (starts + counts).unsqueeze(1))


@dataclass
class InstructionCollator:
    """Wraps the collator `SFTTrainer` builds. Adds ``instruction_embeddings`` [batch, key_dim]; with teachers,
    ``teacher_index`` [batch], the teacher's ``teacher_input_ids`` / ``teacher_attention_mask`` (right-padded, as
    TRL pads) and ``student_distilled`` / ``teacher_distilled``: boolean masks of the answer tokens both sides
    predict, the same tokens in the same order on each side."""

    base: Callable[[list[dict[str, Any]]], dict[str, Any]]
    embedding_column: str
    pad_token_id: int
    teachers: bool = False

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(examples)
        batch[INSTRUCTION_EMBEDDINGS] = torch.tensor(
            [example[self.embedding_column] for example in examples], dtype=torch.float32
        )
        if not self.teachers:
            return batch
        teacher_ids = [torch.tensor(example["teacher_input_ids"]) for example in examples]
        batch[TEACHER_INDEX] = torch.tensor([example["teacher_index"] for example in examples])
        batch[TEACHER_INPUT_IDS] = pad_sequence(teacher_ids, batch_first=True, padding_value=self.pad_token_id)
        batch[TEACHER_ATTENTION_MASK] = pad_sequence(
            [torch.ones_like(ids) for ids in teacher_ids], batch_first=True, padding_value=0
        )
        column = {name: torch.tensor([example[name] for example in examples]) for name in ROW_COLUMNS[2:]}
        counts = column["distill_length"]
        batch[STUDENT_DISTILLED] = _span(batch["input_ids"].shape[1], column["student_prompt_length"], counts)
        batch[TEACHER_DISTILLED] = _span(batch[TEACHER_INPUT_IDS].shape[1], column["teacher_prompt_length"], counts)
        return batch
