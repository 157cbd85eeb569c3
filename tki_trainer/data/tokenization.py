"""How TRL's `SFTTrainer` tokenizes a prompt/completion row, so that every span TKI derives from it matches.

TRL tokenizes the prompt alone and the prompt followed by the completion, and starts the completion where the
two token sequences diverge (tokens can merge across the boundary, and chat templates may render a prompt
differently once an answer follows). The prompt span is that common prefix. Built from TRL's own helpers;
`tests/test_data.py` checks the result against an `SFTTrainer`'s prepared dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase
from trl.data_utils import _tokenize, common_prefix_length, is_conversational


@dataclass(frozen=True)
class TokenizedRow:
    input_ids: list[int]
    prompt_length: int

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids[: self.prompt_length]

    @property
    def completion_length(self) -> int:
        return len(self.input_ids) - self.prompt_length


TEMPLATE_COLUMNS = ("tools", "chat_template_kwargs")
"""Columns whose per-row values `SFTTrainer` passes to the chat template."""


def template_arguments(row: dict[str, Any]) -> dict[str, Any]:
    """A row's own chat-template arguments, as `SFTTrainer` reads them: its ``tools`` (a list, or JSON text) and the
    keywords of its ``chat_template_kwargs``."""
    tools = row.get("tools")
    return {"tools": json.loads(tools) if isinstance(tools, str) else tools, **(row.get("chat_template_kwargs") or {})}


def tokenize_row(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Any,
    completion: Any,
    chat_template: str | None = None,
    **template_kwargs: Any,
) -> TokenizedRow:
    """Token ids of ``prompt + completion`` and the length of the prompt span, exactly as `SFTTrainer` builds them
    (before its ``max_length`` truncation). A standard completion gets the end-of-sequence token TRL appends;
    ``template_kwargs`` (a row's `template_arguments`) reach a conversational row's chat template."""
    prompt_ids = tokenize_prompt(tokenizer, prompt, chat_template, **template_kwargs)
    if not is_conversational({"prompt": prompt}) and not completion.endswith(tokenizer.eos_token):
        completion = completion + tokenizer.eos_token
    input_ids = _tokenize(tokenizer, prompt + completion, chat_template=chat_template, **template_kwargs)["input_ids"]
    return TokenizedRow(list(input_ids), common_prefix_length(prompt_ids, input_ids))


def tokenize_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: Any, chat_template: str | None = None, **template_kwargs: Any
) -> list[int]:
    """Token ids of a prompt alone, as `SFTTrainer` tokenizes it: a conversational prompt under the chat template
    with the generation prompt (the model's turn opened), a string as it is."""
    generation_prompt = {"add_generation_prompt": True} if is_conversational({"prompt": prompt}) else {}
    ids = _tokenize(tokenizer, prompt, chat_template=chat_template, **template_kwargs, **generation_prompt)
    return list(ids["input_ids"])


def truncate_row(row: TokenizedRow, max_length: int | None) -> TokenizedRow | None:
    """TRL's ``keep_start`` truncation; ``None`` for a row left without completion tokens (TRL drops it)."""
    if max_length is None:
        return row
    truncated = TokenizedRow(row.input_ids[:max_length], min(row.prompt_length, max_length))
    return truncated if truncated.completion_length > 0 else None
