"""Row formats shared by the loaders: TRL's standard and conversational prompt/completion, and messages."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

from datasets import Dataset, IterableDataset
from trl.data_utils import get_dataset_column_names


def message_text(message: dict[str, Any]) -> str:
    """The text of one chat turn: its content (a string, or the text parts of a multimodal list; none for a turn that
    only calls tools) followed by its tool calls as JSON."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(part.get("text") or "" for part in content if isinstance(part, dict))
    calls = message.get("tool_calls")
    return (content or "") + (json.dumps(calls, sort_keys=True, default=str) if calls else "")


def turns_text(value: str | list[dict[str, Any]]) -> str:
    """The text of a prompt or completion: the string itself, or its turns' texts joined."""
    return value if isinstance(value, str) else "".join(message_text(m) for m in value)


def as_conversational(dataset: Dataset) -> Dataset:
    """Wrap string prompt/completion rows as one user turn and one assistant turn (TRL's conversational format)."""
    return dataset.map(
        lambda row: {
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "completion": [{"role": "assistant", "content": row["completion"]}],
        },
        desc="Converting to conversational prompt/completion",
    )


def messages_to_prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
    """Split a ``messages`` row at its last assistant turn: every turn before it is the prompt, that turn the
    completion. Use it with ``dataset.map(messages_to_prompt_completion, remove_columns="messages")`` to give
    knowledge reinstatement the prompt/completion rows it needs."""
    messages = row["messages"]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or last == 0:
        raise ValueError(
            "A messages row needs an assistant turn after at least one other turn to be split into prompt and "
            f"completion; got roles {[m['role'] for m in messages]}."
        )
    return {"prompt": messages[:last], "completion": [messages[last]]}


def check_prompt_completion_rows(dataset: Dataset) -> None:
    """Refuse rows that knowledge reinstatement cannot use, before any work: it needs an ``id`` per row (unique),
    a ``prompt`` and a non-empty ``completion``."""
    columns = set(dataset.column_names)
    if "messages" in columns and "prompt" not in columns:
        raise ValueError(
            "Knowledge reinstatement needs prompt/completion rows, not messages: convert them with "
            "dataset.map(tki_trainer.data.messages_to_prompt_completion, remove_columns='messages')."
        )
    if not {"prompt", "completion"} <= columns:
        raise ValueError(
            f"Knowledge reinstatement needs 'prompt' and 'completion' columns; the dataset has {sorted(columns)}."
        )
    if "id" not in columns:
        raise ValueError(
            "The dataset needs an 'id' column (a stable, unique id per row) to key its prior inputs: the loaders in "
            "tki_trainer.data add one; for your own rows use dataset.map(lambda row, i: {'id': str(i)}, with_indices=True)."
        )
    ids = dataset["id"]
    if len(set(ids)) != len(ids):
        seen: set = set()
        duplicates = sorted({i for i in ids if i in seen or seen.add(i)})
        raise ValueError(f"The 'id' column has duplicates (e.g. {duplicates[:3]}); ids must be unique.")
    for example_id, completion in zip(ids, dataset["completion"]):
        if not turns_text(completion).strip():
            raise ValueError(f"Row {example_id!r} has an empty completion: drop it, there is no target to reinstate.")


CONTENT_COLUMNS = ("prompt", "completion", "messages", "text")

DERIVED_COLUMNS = ("query_embedding", "group_id")
"""Columns TKI computes from a row, left out of its id."""


def row_hash(row: dict[str, Any], derived: tuple[str, ...] = DERIVED_COLUMNS) -> str:
    """A stable hash of every column of a row but the ``derived`` ones, whatever its format (text,
    prompt/completion, messages, conversations, token ids, tools, chat-template arguments). The content columns come
    first, as ids were always hashed, so a row holding only those keeps the id it had."""
    content = [row[c] for c in CONTENT_COLUMNS if c in row]
    rest = [[c, row[c]] for c in sorted(row) if c not in CONTENT_COLUMNS and c not in derived]
    return hashlib.sha256(json.dumps(content + rest, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_text_ids(ids: list[Any], column: str = "id") -> None:
    """Refuse ids that are not strings: prior inputs are stored under them, as safetensors keys."""
    not_text = [example_id for example_id in ids if not isinstance(example_id, str)]
    if not_text:
        raise ValueError(
            f"The '{column}' column holds {type(not_text[0]).__name__} values (e.g. {not_text[0]!r}), but prior "
            "inputs are keyed by text ids: give every row a unique string id, e.g. dataset.map(lambda row, i: "
            "{'id': str(i)}, with_indices=True), or drop the column to have ids hashed from each row's content."
        )


def with_ids(
    dataset: Dataset | IterableDataset, id_column: str = "id", derived: tuple[str, ...] = DERIVED_COLUMNS
) -> Dataset | IterableDataset:
    """``dataset`` with an ``id_column``: kept when present (it must be unique), else a hash of each row's columns
    (`row_hash`, without the ``derived`` ones).

    A repeated row gets its hash plus the number of earlier repeats, so ids stay unique and do not depend on the
    row order of other rows. Streamed rows get the hash alone, as they stream (they key routing groups only: a
    streaming dataset gets no prior inputs)."""
    if isinstance(dataset, IterableDataset):
        if id_column in get_dataset_column_names(dataset):
            return dataset
        return dataset.map(lambda row: {id_column: row_hash(row, derived)})
    if id_column in dataset.column_names:
        ids = dataset[id_column]
        repeated = [i for i, n in Counter(ids).items() if n > 1]
        if repeated:
            raise ValueError(
                f"The '{id_column}' column has duplicates (e.g. {repeated[:3]}); TKI keys groups and prior inputs by "
                "it: make the ids unique, or drop the column to let TKI hash each row's content."
            )
        return dataset
    seen: Counter[str] = Counter()
    ids = []
    raw_rows = (row for table in dataset.with_format("arrow").iter(batch_size=1000) for row in table.to_pylist())
    for row in raw_rows:  # stored values, not decoded ones (an image decodes to an object without a stable text)
        digest = row_hash(row, derived)
        ids.append(digest if not seen[digest] else f"{digest}-{seen[digest]}")
        seen[digest] += 1
    return dataset.add_column(id_column, ids)
