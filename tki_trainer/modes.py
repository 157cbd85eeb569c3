"""Context managers that switch a model's mode for a block and restore it after, whatever the block raises."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode inside the block (no dropout, so no draw from the random number generator)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
