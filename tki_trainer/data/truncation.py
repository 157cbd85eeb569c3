"""Fit over-long rows into ``max_length`` by cutting the prompt from the left, token-exact, or dropping them.

TRL keeps only the start of a sequence that is too long, which cuts the completion (and drops a row left
with no completion token). Most prompt templates put the question at the end, so the start of the prompt is
what can go.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .tokenization import tokenize_row


logger = logging.getLogger(__name__)


@dataclass
class FitReport:
    """How many rows were kept as they were, cut from the left, or dropped."""

    kept: int = 0
    truncated: int = 0
    dropped: int = 0

    def __str__(self) -> str:
        return f"{self.kept} rows fit, {self.truncated} prompts cut from the left, {self.dropped} rows dropped"


def _cuttable_text(prompt: Any) -> str:
    """The text whose start may go: the prompt string, or the first non-system message of a conversation."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in prompt if m["role"] != "system")


def _with_text(prompt: Any, text: str) -> Any:
    if isinstance(prompt, str):
        return text
    index = next(i for i, m in enumerate(prompt) if m["role"] != "system")
    return [*prompt[:index], {**prompt[index], "content": text}, *prompt[index + 1 :]]


def fit_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: Any, completion: Any, max_length: int, chat_template: str | None = None
) -> Any | None:
    """``prompt`` cut from the left just enough that TRL's tokenization of the row fits ``max_length``.

    Returns the prompt unchanged when it fits and ``None`` when even an empty prompt text leaves no room.
    Cutting is on token boundaries of the prompt text; the result is re-tokenized in context until it fits.
    """
    excess = len(tokenize_row(tokenizer, prompt, completion, chat_template).input_ids) - max_length
    if excess <= 0:
        return prompt
    text_ids = tokenizer(_cuttable_text(prompt), add_special_tokens=False)["input_ids"]
    for cut in range(excess, len(text_ids)):
        candidate = _with_text(prompt, tokenizer.decode(text_ids[cut:]))
        if len(tokenize_row(tokenizer, candidate, completion, chat_template).input_ids) <= max_length:
            return candidate
    return None


def fit_prompts(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    overlong: Literal["truncate_left", "drop"] = "truncate_left",
    chat_template: str | None = None,
) -> tuple[Dataset, FitReport]:
    """Make every prompt/completion row fit ``max_length`` tokens as TRL will tokenize it.

    ``overlong="truncate_left"`` cuts the start of the prompt (rows whose completion alone does not fit are
    dropped); ``"drop"`` drops every row that does not fit. Returns the dataset and the counts.
    """
    if overlong not in ("truncate_left", "drop"):
        raise ValueError(f"overlong must be 'truncate_left' or 'drop', got {overlong!r}.")

    def fit(row: dict) -> dict:
        fitted = fit_prompt(tokenizer, row["prompt"], row["completion"], max_length, chat_template)
        if fitted is None or (overlong == "drop" and fitted != row["prompt"]):
            return {"prompt": row["prompt"], "_fit": "dropped"}
        return {"prompt": fitted, "_fit": "kept" if fitted == row["prompt"] else "truncated"}

    marked = dataset.map(fit, desc=f"Fitting rows into {max_length} tokens")
    outcome = marked["_fit"]
    report = FitReport(*(outcome.count(status) for status in ("kept", "truncated", "dropped")))
    fitted = marked.filter(lambda status: status != "dropped", input_columns="_fit").remove_columns("_fit")
    logger.info("fit to %d tokens: %s", max_length, report)
    return fitted, report
