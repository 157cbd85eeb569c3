"""Seeded subsets that keep every task (or cluster, or category) represented, of rows fitted into a token budget."""

from __future__ import annotations

from datasets import Dataset, Value
from transformers import PreTrainedTokenizerBase

from .formats import as_conversational
from .sni import PROMPT_PARTS, SniFitReport, fit_sni_prompts
from .truncation import FitReport, fit_prompts


def balanced_subset(dataset: Dataset, column: str, total: int | None, seed: int = 0) -> Dataset:
    """A seeded subset of ``total`` rows, as equal per value of ``column`` as the rows allow: each value's rows are
    taken in turn from a seeded shuffle, which is also the subset's order. The whole dataset when ``total`` is None
    or not smaller."""
    if total is None or total >= len(dataset):
        return dataset
    shuffled = dataset.shuffle(seed=seed)
    seen: dict[str, int] = {}
    ranks = []
    for value in shuffled[column]:
        ranks.append(seen.get(value, 0))
        seen[value] = ranks[-1] + 1
    keep = sorted(range(len(ranks)), key=lambda index: (ranks[index], index))[:total]
    return shuffled.select(sorted(keep))


def fitted_subset(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    *,
    column: str | None = None,
    total: int | None = None,
    seed: int = 0,
    chat_template: str | None = None,
) -> tuple[Dataset, FitReport | SniFitReport]:
    """Conversational prompt/completion rows that fit ``max_length`` tokens as TRL will tokenize them, then, given
    ``column``, their `balanced_subset` of ``total`` rows by it: the subset is drawn from the rows that fit, so it
    holds ``total`` rows whenever enough fit.

    String rows become one user turn and one assistant turn. SNI rows (with the prompt parts `load_sni` and
    `sni_from_hub_rows` write) are fitted by `fit_sni_prompts`, which keeps the task definition; other rows by
    `fit_prompts`, which cuts prompts from the left. Returns the rows and how they were fitted (all of them, before
    the subset)."""
    if isinstance(dataset.features["prompt"], Value):
        dataset = as_conversational(dataset)
    if set(PROMPT_PARTS) <= set(dataset.column_names):
        fitted, report = fit_sni_prompts(dataset, tokenizer, max_length, chat_template)
    else:
        fitted, report = fit_prompts(dataset, tokenizer, max_length, chat_template=chat_template)
    if column is not None:
        fitted = balanced_subset(fitted, column, total, seed)
    return fitted, report
