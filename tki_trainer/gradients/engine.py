"""The gradient engine: where each backward pass of an optimizer step goes.

The Trainer's own `training_step` takes the backward of what ``compute_loss`` returns (with its loss scaling,
context parallelism, LOMO's arguments, cache clearing). An objective that needs a backward of its own (through
another graph: the prior inputs', the flashbacks') takes it through `GradientEngine.backward`, and one whose
gradient is a share of the Trainer's backward (the same graph, some examples, a weight) declares it with
`GradientEngine.share`. With PCGrad each objective's gradient goes into its own sum and the sums are projected once
per optimizer step; with several processes and a latent bank or a second backward per micro-batch, the sum is
all-reduced here, not by DDP, whose buckets take no row-sparse gradient and expect one backward per micro-batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers import Trainer

from .capture import GradientCapture
from .pcgrad import Projection
from .sums import ObjectiveGradients


SFT = "sft"
"""The gradient of SFTTrainer's loss: the Trainer's own backward."""


class GradientEngine:
    """Per-objective gradient accumulation, capture, reduction and PCGrad for one trainer.

    ``objectives`` names the auxiliary objectives in order (their gradients' slots after ``"sft"``). ``pcgrad``
    projects their gradients (with at least one auxiliary objective); ``reduce`` all-reduces the gradients here
    instead of DDP. ``capture`` records the Trainer's forward so that a share of its backward restricted to some
    examples comes without another backward (`GradientCapture`); objectives act on it only inside `step`.
    """

    def __init__(
        self, trainer: Trainer, objectives: list[str], *, pcgrad: bool, reduce: bool, capture: bool = False
    ) -> None:
        parameters = [p for p in trainer.model.parameters() if p.requires_grad]
        self.trainer = trainer
        self.names = [SFT, *objectives]
        self.projects = pcgrad and len(self.names) > 1
        count = len(self.names) if self.projects else 1
        self.sums = ObjectiveGradients(parameters, count) if self.projects or reduce else None
        self.capture = GradientCapture(trainer.model, parameters) if self.projects and capture else None
        """Records the Trainer's forward when an objective shares an example subset of its backward."""
        self.recorded: GradientCapture | None = None
        """The capture that recorded the current micro-batch's forward, when it could (at least two examples)."""
        self._shares: list[tuple[str, float, torch.Tensor | None]] = []
        self.in_step = False

    @property
    def owns_reduction(self) -> bool:
        return self.sums is not None

    @contextlib.contextmanager
    def step(self, model: torch.nn.Module) -> Iterator[None]:
        """Wrap a micro-batch's training step: objectives take their gradients only inside it (a ``compute_loss``
        called elsewhere computes the SFT loss alone), and DDP does not reduce them when the engine does."""
        self._shares, self.in_step = [], True
        try:
            with self.trainer.accelerator.no_sync(model) if self.owns_reduction else contextlib.nullcontext():
                yield
        finally:
            self.in_step = False

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches in the current optimizer step (the Trainer's count, set by its loop; else the argument)."""
        return accumulation_steps(self.trainer)

    def scale(self, num_items_in_batch: Any) -> float:
        """The factor `Trainer.training_step` applies to ``compute_loss``'s result before its backward (`loss_factor`)."""
        return loss_factor(self.trainer, num_items_in_batch)

    @contextlib.contextmanager
    def recording(self, batch_size: int) -> Iterator[None]:
        """Wrap the Trainer's forward of a micro-batch, so that `share` can take some of its examples."""
        self.recorded = (
            self.capture if self.capture is not None and self.capture.supported and batch_size > 1 else None
        )
        if self.recorded is None:
            yield
            return
        with self.recorded.recording():
            yield

    @property
    def can_share_examples(self) -> bool:
        """Whether `share` may restrict to examples: the last recording covered every trainable parameter."""
        return self.recorded is not None and self.recorded.complete

    def backward(self, loss: torch.Tensor, objective: str, *, retain_graph: bool = False) -> None:
        """An objective's own backward (``loss`` already scaled as the caller wants), into its sum with PCGrad."""
        self.trainer.accelerator.backward(loss, retain_graph=retain_graph)
        if self.projects:
            self.sums.add(self.names.index(objective), self.sums.take_gradients())

    def share(self, objective: str, scale: float, examples: torch.Tensor | None = None) -> None:
        """Objective ``objective``'s gradient also holds ``scale`` times the Trainer's coming backward, or, with
        ``examples`` ([batch] bool), that backward restricted to those examples (needs `can_share_examples`)."""
        if examples is not None:
            if not self.can_share_examples:
                raise RuntimeError("share(examples=...) needs a complete recording of this micro-batch's forward.")
            if self.recorded.weights is not None:
                raise RuntimeError("One share of examples per micro-batch: the recording holds one set of weights.")
            self.recorded.weights = examples.float()
        self._shares.append((objective, scale, examples))

    def after_trainer_backward(self) -> None:
        """Move the Trainer's backward into the SFT sum, and its shares into their objectives'."""
        if not self.projects:
            return
        gradients = self.sums.take_gradients()
        self.sums.add(0, gradients)
        for objective, scale, examples in self._shares:
            shared = gradients if examples is None else self.recorded.take()
            self.sums.add(self.names.index(objective), shared, scale=scale)
        self._shares = []

    def end_of_step(self) -> dict[str, float]:
        """At the end of an effective batch: all-reduce (and with PCGrad project) the sums into ``.grad``. Returns
        PCGrad's metrics: its conflict rate and the cosine of each pair of objectives' gradients."""
        if self.sums is None:
            return {}
        if not self.projects:
            self.sums.add(0, self.sums.take_gradients())
        projection = self.sums.apply()
        return {} if projection is None else self._metrics(projection)

    def _metrics(self, projection: Projection) -> dict[str, float]:
        metrics = {"pcgrad_conflict_rate": float(projection.conflict)}
        for i, first in enumerate(self.names):
            for j in range(i + 1, len(self.names)):
                metrics[cosine_metric(first, self.names[j])] = projection.cosine(i, j)
        return metrics


def cosine_metric(first: str, second: str) -> str:
    """The log name of two objectives' gradient cosine (``pcgrad_cosine`` for SFT and reinstatement)."""
    pair = [name for name in (first, second) if name != SFT]
    return "pcgrad_cosine" if pair == ["reinst"] else "_".join(["pcgrad_cosine", *pair])


def accumulation_steps(trainer: Trainer) -> int:
    """Micro-batches in the current optimizer step (the Trainer's count, set by its loop; else the argument)."""
    return getattr(trainer, "current_gradient_accumulation_steps", trainer.args.gradient_accumulation_steps)


def loss_factor(trainer: Trainer, num_items_in_batch: Any) -> float:
    """The factor `Trainer.training_step` applies to ``compute_loss``'s result before its backward: ``1 /
    accumulation steps`` unless the loss is already normalised over the effective batch. The one mirror of the
    Trainer's step, pinned by a test against the installed transformers."""
    scaled = trainer.loss_is_scaled_for_ga
    if scaled is None:
        scaled = (
            trainer.model_accepts_loss_kwargs and num_items_in_batch is not None
        ) or trainer.compute_loss_func is not None
    return 1.0 if scaled else 1.0 / accumulation_steps(trainer)


def micro_batch_weight(trainer: Trainer, num_items_in_batch: Any) -> float:
    """What a per-micro-batch mean is multiplied by inside ``compute_loss``'s result so that, after the Trainer's
    factor, the optimizer step takes the mean over its micro-batches (as TRL does for the MoE auxiliary loss)."""
    return 1.0 / (accumulation_steps(trainer) * loss_factor(trainer, num_items_in_batch))
