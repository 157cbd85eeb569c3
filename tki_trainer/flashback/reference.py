"""The reference model of flashbacks: the model as it was before this training, without a second copy of its weights."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import PeftModel
from torch import nn


class Reference:
    """Switches a model to its state before training, for no-grad forwards.

    An adapter the trainer built starts as the identity (LoRA's ``B`` and the bank's ``A_j`` are zero), so the
    reference is the base model with the adapters disabled. A model that arrives holding an adapter (a previous
    stage of continual training) is its own reference: the adapter's trainable weights are copied once, at
    construction, and swapped in for reference forwards (a pointer swap per parameter; the base weights are never
    copied).
    """

    def __init__(self, model: nn.Module, snapshot: bool) -> None:
        if not isinstance(model, PeftModel):
            raise ValueError(
                "Flashbacks compare the model with itself before training, which needs an adapter to switch off: pass "
                "a peft_config (or a PeftModel), or train without a flashback dataset."
            )
        self.model = model
        trainable = [p for p in model.parameters() if p.requires_grad]
        self._snapshot = [(p, p.detach().clone()) for p in trainable] if snapshot else None

    @contextmanager
    def active(self) -> Iterator[None]:
        """Inside the block, the model computes as the reference does (eval mode: no dropout)."""
        was_training = self.model.training
        self.model.eval()
        try:
            if self._snapshot is None:
                with self.model.disable_adapter():
                    yield
            else:
                current = [p.data for p, _ in self._snapshot]
                for p, saved in self._snapshot:
                    p.data = saved
                try:
                    yield
                finally:
                    for (p, _), data in zip(self._snapshot, current):
                        p.data = data
        finally:
            self.model.train(was_training)

    def checksum(self) -> str:
        """SHA-256 of the reference's adapter weights ("" for the base model): it keys cached continuations."""
        digest = hashlib.sha256()
        for _, saved in self._snapshot or []:
            digest.update(saved.to(torch.float32).cpu().numpy().tobytes())
        return digest.hexdigest() if self._snapshot else ""
