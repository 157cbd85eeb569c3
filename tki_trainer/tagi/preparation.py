"""Rows for `TAGITrainer`, checked and completed before `SFTTrainer` tokenizes them: instruction embeddings, and
with teachers each row's teacher and the teacher's tokens, aligned with the student's answer."""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ..data import add_query_embeddings
from ..data.tokenization import template_arguments, tokenize_row, truncate_row
from ..preparation import query_encoder
from .collator import DISTILL_COLUMN, TEACHER_COLUMN, TEACHER_IDS_COLUMN, TEACHER_PROMPT_COLUMN
from .config import TAGIConfig
from .rows import teacher_prompt
from .teachers import TeacherLoras


def check_rows(dataset: Any, args: TAGIConfig, name: str, teachers: bool) -> None:
    """Refuse, naming the fix, rows TAGI cannot train on, before any encoding or tokenization."""
    if dataset is None:
        return
    if not isinstance(dataset, Dataset):
        raise ValueError(
            f"TAGITrainer's {name} rows must be a datasets.Dataset (got {type(dataset).__name__}): instruction "
            "embeddings and the teachers' tokens are computed for every row before training; load it without "
            "streaming."
        )
    columns = set(dataset.column_names)
    needed = {"prompt", "completion"}
    if args.instruction_embedding_column not in columns:
        needed.add(args.instruction_column)
    if teachers:
        needed |= {args.instruction_column, args.teacher_column}
    missing = sorted(needed - columns)
    if missing:
        raise ValueError(
            f"The {name} rows lack {missing} (they have {sorted(columns)}): TAGI reads prompt/completion rows whose "
            f"prompt holds the input alone, with the task's instruction in {args.instruction_column!r}"
            + (f" and its teacher in {args.teacher_column!r}" if teachers else "")
            + " (tki_trainer.tagi.sni_instruction_rows builds them from SNI)."
        )


def prepare_rows(
    dataset: Dataset | None,
    args: TAGIConfig,
    tokenizer: PreTrainedTokenizerBase,
    key_dim: int,
    teachers: TeacherLoras | None = None,
) -> Dataset | None:
    """``dataset`` with its instruction embeddings (encoded once per distinct instruction when the column is
    missing) and, with ``teachers``, the columns of `collator.ROW_COLUMNS`."""
    if dataset is None:
        return None
    if args.instruction_embedding_column not in dataset.column_names:
        dataset = add_query_embeddings(
            dataset,
            query_encoder(args.instruction_encoder),
            column=args.instruction_embedding_column,
            key_dim=key_dim,
            text_of=lambda row: row[args.instruction_column],
        )
    if teachers is None:
        return dataset
    _check_one_teacher_per_instruction(dataset, args)
    teacher_of_row = teachers.index(dataset[args.teacher_column])
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)

    def teacher_side(row: dict[str, Any], position: int) -> dict[str, Any]:
        template = template_arguments(row)
        prompt = teacher_prompt(row["prompt"], row[args.instruction_column], args.teacher_separator)
        student = truncate_row(tokenize_row(tokenizer, row["prompt"], row["completion"], **template), args.max_length)
        teacher = tokenize_row(tokenizer, prompt, row["completion"], **template)  # read whole: no gradient flows
        if student is not None and student.prompt_length == 0:
            raise ValueError(
                f"Row {position} of the training rows has an empty prompt: the student must read the task's input "
                "(the instruction goes in its own column)."
            )
        # The answer tokens both sides predict: those TRL keeps for the student (a row it truncates to no answer
        # token, it drops).
        length = 0 if student is None else min(student.completion_length, teacher.completion_length)
        answer = [] if student is None else student.input_ids[student.prompt_length :][:length]
        if teacher.input_ids[teacher.prompt_length :][:length] != answer:
            raise ValueError(
                f"Row {position} of the training rows: its answer tokenizes differently after the teacher's prompt "
                "than after the student's, so the two cannot be compared token by token. End teacher_separator and "
                "the prompts where a token ends (e.g. with a space or a newline)."
            )
        return {
            TEACHER_COLUMN: teacher_of_row[position],
            TEACHER_IDS_COLUMN: teacher.input_ids[: teacher.prompt_length + length],
            TEACHER_PROMPT_COLUMN: teacher.prompt_length,
            DISTILL_COLUMN: length,
        }

    return dataset.map(teacher_side, with_indices=True, desc="Teacher prompts")


def _check_one_teacher_per_instruction(dataset: Dataset, args: TAGIConfig) -> None:
    """Parameter matching compares a task's one generated LoRA with one teacher: an instruction under two teachers
    has no single target."""
    teacher_of: dict[str, str] = {}
    for instruction, teacher in zip(dataset[args.instruction_column], dataset[args.teacher_column]):
        if teacher_of.setdefault(instruction, teacher) != teacher:
            raise ValueError(
                f"One instruction has two teachers ({teacher_of[instruction]!r} and {teacher!r}): give every row of "
                f"a task the same {args.teacher_column!r} (its category). Instruction: {instruction[:80]!r}"
            )
