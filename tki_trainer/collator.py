"""The TKI collator: TRL's collated batch plus each example's query, group and id."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


QUERY_EMBEDDINGS = "query_embeddings"
GROUP_IDS = "group_ids"
EXAMPLE_IDS = "example_ids"


@dataclass
class TKICollator:
    """Wraps the collator `SFTTrainer` builds and adds ``query_embeddings`` [batch, key_dim] and ``group_ids``
    [batch] for routing, and the examples' ids (a list) for looking up prior inputs. Evaluation batches carry the
    ids too, but only a training step looks them up: evaluation rows need no prior inputs."""

    base: Callable[[list[dict[str, Any]]], dict[str, Any]]
    query_column: str | None = None
    group_column: str | None = None
    id_column: str | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(examples)
        if self.query_column is not None:
            queries = [example[self.query_column] for example in examples]
            batch[QUERY_EMBEDDINGS] = torch.tensor(queries, dtype=torch.float32)
            batch[GROUP_IDS] = torch.tensor([example[self.group_column] for example in examples], dtype=torch.long)
        if self.id_column is not None:
            batch[EXAMPLE_IDS] = [example[self.id_column] for example in examples]
        return batch
