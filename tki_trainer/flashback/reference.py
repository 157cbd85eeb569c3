"""The reference model of flashbacks: the model as it was before this training, without a second copy of its weights."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig, PeftConfig, PeftModel
from torch import nn

from ..modes import evaluation_mode
from ..tuner import LatentLoraConfig


def starts_as_identity(config: PeftConfig | None) -> bool:
    """Whether the adapter built from ``config`` leaves the model unchanged at the first step: the TKI tuner (``B``
    of the shared LoRA and the bank's ``A_j`` are zero) and LoRA's default and Gaussian initialisations (``B = 0``).
    PiSSA, OLoRA, LoftQ, ``init_lora_weights=False`` and other tuners' initialisations may not."""
    if isinstance(config, LatentLoraConfig):
        return True
    return isinstance(config, LoraConfig) and config.init_lora_weights in (True, "gaussian")


class Reference:
    """Switches a model to its state before training, for no-grad forwards.

    An adapter that starts as the identity (see `starts_as_identity`) leaves the base model as the reference: the
    adapters are disabled for its forwards. Otherwise (a model that arrives holding an adapter, the previous stage
    of continual training; an initialisation that starts ``B`` non-zero or rewrites the base weights) the adapter's
    trainable weights are copied once, at construction, and swapped in for reference forwards (a pointer swap per
    parameter; the base weights are never copied).
    """

    def __init__(self, model: nn.Module, snapshot: bool) -> None:
        if not isinstance(model, PeftModel):
            raise ValueError(
                "Comparing the model with itself before training (flashbacks, guidance's KL term) needs an adapter to "
                "switch off: pass a peft_config (or a PeftModel), or train without that objective."
            )
        self.model = model
        trainable = [p for p in model.parameters() if p.requires_grad]
        self._snapshot = [(p, p.detach().clone()) for p in trainable] if snapshot else None

    @property
    def copies_weights(self) -> bool:
        """Whether the reference is a copy of the adapter's weights (else the model with its adapters off)."""
        return self._snapshot is not None

    @contextmanager
    def active(self) -> Iterator[None]:
        """Inside the block, the model computes as the reference does (eval mode: no dropout)."""
        with evaluation_mode(self.model):
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

    def checksum(self) -> str:
        """SHA-256 of the reference's adapter weights ("" for the base model): it keys cached continuations."""
        digest = hashlib.sha256()
        for _, saved in self._snapshot or []:
            digest.update(saved.to(torch.float32).cpu().numpy().tobytes())
        return digest.hexdigest() if self._snapshot else ""
