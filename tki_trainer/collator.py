"""The TKI collator: TRL's collated batch plus each example's query, group and prior input."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from .reinstatement import PriorInputStore


QUERY_EMBEDDINGS = "query_embeddings"
GROUP_IDS = "group_ids"
PRIOR_DELTAS = "prior_deltas"


@dataclass
class TKICollator:
    """Wraps the collator `SFTTrainer` builds and adds ``query_embeddings`` [batch, key_dim], ``group_ids`` [batch]
    and, from a prior-input store, ``prior_deltas`` [batch, max_prompt_tokens, hidden] (``q - e``, zero-padded;
    TRL's batches start every prompt at position 0)."""

    base: Callable[[list[dict[str, Any]]], dict[str, Any]]
    query_column: str | None = None
    group_column: str | None = None
    id_column: str = "id"
    store: PriorInputStore | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(examples)
        if self.query_column is not None:
            batch[QUERY_EMBEDDINGS] = torch.tensor([example[self.query_column] for example in examples], dtype=torch.float32)
            batch[GROUP_IDS] = torch.tensor([example[self.group_column] for example in examples], dtype=torch.long)
        if self.store is not None:
            deltas = [self.store.load_delta(example[self.id_column]) for example in examples]
            batch[PRIOR_DELTAS] = pad_sequence(deltas, batch_first=True)
        return batch
