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

TEACHER_COLUMN = "teacher_index"
TEACHER_IDS_COLUMN = "teacher_input_ids"
TEACHER_PROMPT_COLUMN = "teacher_prompt_length"
DISTILL_COLUMN = "distill_length"
ROW_COLUMNS = (TEACHER_COLUMN, TEACHER_IDS_COLUMN, TEACHER_PROMPT_COLUMN, DISTILL_COLUMN)
"""Columns `prepare_rows` adds to training rows for the teacher's side."""


def _span(length: int, starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[rows, length] masks of the positions ``starts[i] <= p < starts[i] + counts[i]``."""
    positions = torch.arange(length).unsqueeze(0)
    return (positions >= starts.unsqueeze(1)) & (positions < (starts + counts).unsqueeze(1))


@dataclass
class InstructionCollator:
    """Wraps the collator `SFTTrainer` builds. Adds ``instruction_embeddings`` [batch, key_dim]; for training rows
    that carry a teacher, ``teacher_index`` [batch], the teacher's ``teacher_input_ids`` / ``teacher_attention_mask``
    (right-padded, as TRL pads) and ``student_distilled`` / ``teacher_distilled``: boolean masks of the answer
    tokens both sides predict, the same tokens in the same order on each side. The student's are the first answer
    tokens of TRL's own labels, so they follow whatever template and truncation TRL applied."""

    base: Callable[[list[dict[str, Any]]], dict[str, Any]]
    embedding_column: str
    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(examples)
        batch[INSTRUCTION_EMBEDDINGS] = torch.tensor(
            [example[self.embedding_column] for example in examples], dtype=torch.float32
        )
        if TEACHER_IDS_COLUMN not in examples[0]:  # evaluation rows: the student's prediction loss alone
            return batch
        teacher_ids = [torch.tensor(example[TEACHER_IDS_COLUMN]) for example in examples]
        batch[TEACHER_INDEX] = torch.tensor([example[TEACHER_COLUMN] for example in examples])
        batch[TEACHER_INPUT_IDS] = pad_sequence(teacher_ids, batch_first=True, padding_value=self.pad_token_id)
        batch[TEACHER_ATTENTION_MASK] = pad_sequence(
            [torch.ones_like(ids) for ids in teacher_ids], batch_first=True, padding_value=0
        )
        counts = torch.tensor([example[DISTILL_COLUMN] for example in examples])
        starts = torch.tensor([example[TEACHER_PROMPT_COLUMN] for example in examples])
        targets = batch["labels"] != -100
        batch[STUDENT_DISTILLED] = targets & (targets.cumsum(dim=1) <= counts.unsqueeze(1))
        batch[TEACHER_DISTILLED] = _span(batch[TEACHER_INPUT_IDS].shape[1], starts, counts)
        return batch
