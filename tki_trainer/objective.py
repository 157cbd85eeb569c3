"""The shape of an auxiliary training objective of `TKITrainer`.

An objective adds a term to SFTTrainer's loss. It is either *in-batch* (its term comes from the micro-batch the
Trainer trains on and that forward's outputs: knowledge reinstatement) or brings *its own micro-batch* after the
Trainer's (flashbacks). Its gradient goes through the `GradientEngine`, which keeps it apart for PCGrad. Adding an
objective is a class with this face in its own package, the config fields it reads, and one line in
`objectives.OBJECTIVES`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from peft import PeftConfig

from .gradients import GradientEngine


if TYPE_CHECKING:
    from .trainer import TKITrainer


@dataclass
class MicroBatch:
    """What an in-batch objective sees of a training micro-batch, after the Trainer's forward."""

    model: torch.nn.Module
    inputs: dict[str, Any]
    outputs: Any
    """The forward's fused outputs (per-token log-probabilities of the labels)."""
    example_ids: list[str] | None
    num_items_in_batch: torch.Tensor | int | None


class TrainingObjective:
    """One auxiliary objective of `TKITrainer`.

    ``name`` names its gradient for PCGrad (and PCGrad's cosine metrics). `prepare` runs before SFTTrainer's
    construction, where every check that can fail should run (before the model is wrapped and rows tokenized); it
    returns what the objective is built from, or None when the arguments leave it off.
    """

    name: ClassVar[str]
    in_batch: ClassVar[bool] = False
    """Whether its term comes from the Trainer's micro-batch (`loss`) rather than its own (`own_step`)."""
    own_backward: ClassVar[bool] = False
    """Whether it takes a backward of its own each micro-batch. DDP reduces in the backward of the Trainer's
    forward and cannot take a second one, so the engine then reduces the gradients itself."""
    shares_examples: ClassVar[bool] = False
    """Whether its gradient is a share of the Trainer's backward restricted to some examples (`GradientEngine.share`
    with ``examples``): the engine then records the Trainer's forward."""
    paper: ClassVar[dict[str, str]] = {}
    """The objective's paper (``title``, ``citation``), cited on the card when it trained; TKI's own are not."""

    def __init__(self, trainer: TKITrainer, prepared: Any) -> None:
        self.trainer = trainer
        self.needs_example_ids = False
        """Whether the collator must pass each row's id (to `loss`, in `MicroBatch.example_ids`)."""

    @classmethod
    def prepare(
        cls, args: Any, *, model: Any, peft_config: PeftConfig | None, train_dataset: Any, sources: dict[str, Any]
    ) -> Any:
        """What this objective is built from, checked; None when ``args`` (or ``sources``) leave it off."""
        raise NotImplementedError

    def around_step(self, model: torch.nn.Module, inputs: dict[str, Any]) -> AbstractContextManager:
        """A context around the Trainer's step on ``inputs`` (its forward and its backward, which recomputes
        forwards under activation checkpointing): e.g. an intervention in the model's computation."""
        return nullcontext()

    def loss(self, batch: MicroBatch, engine: GradientEngine) -> torch.Tensor:
        """In-batch objectives: the weighted term, on the scale of ``compute_loss``'s result (the Trainer multiplies
        it by ``engine.scale``), added to the loss the Trainer backpropagates. With PCGrad (``engine.projects``) the
        objective takes or declares its gradient through ``engine`` and the trainer adds only the term's value; a
        term whose gradient the objective took with a backward of its own is returned detached either way."""
        raise NotImplementedError

    def own_step(self, model: torch.nn.Module, engine: GradientEngine) -> torch.Tensor:
        """Own-batch objectives: one micro-batch's forward and backward (through ``engine``), after the Trainer's.
        Returns the weighted term on the scale of the Trainer's logged ``loss``."""
        raise NotImplementedError

    def end_of_step(self) -> None:
        """Called once per optimizer step, after the gradients are reduced."""

    def card_text(self) -> str | None:
        """What the model card says of this objective's training."""
        return None

    def uploads(self) -> dict[str, Path]:
        """Folders `TKITrainer.push_to_hub` can upload beside the adapter, by their name in the repository."""
        return {}
