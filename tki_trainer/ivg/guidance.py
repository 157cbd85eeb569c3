"""Instruction-vector guidance as a `TKITrainer` objective (the IVG paper's IV-guided fine-tuning).

Two parts. Progressive intervention: every training forward adds ``s(t) * IV`` at the vector's layer, at each
row's last prompt token, with ``s`` falling linearly from ``ivg_scale_start`` (paper: 1) to ``ivg_scale_end``
(paper: 0) over training, so the model learns the new tasks on top of the computation the vector stands for. And
a KL term between the model's own output on the training input (zero-shot, no vector) and the reference's with
the full vector added (``ivg_kl_weight``, paper: 0.05). Which reference, at which positions, at which temperature
and whether hinged, the paper does not say; the defaults are the authors' code's (the model before training, its
adapters off, with the vector; the first answer position and all answer positions; temperature 2; each term
hinged at 0.1), each a config value.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch
from datasets import Dataset
from peft import PeftConfig, PeftModel

from .. import preparation
from ..data.local import load_rows
from ..flashback.divergence import token_divergence
from ..flashback.reference import Reference, starts_as_identity
from ..gradients import GradientEngine
from ..hub import public_name
from ..logits import log_probabilities, logits_at
from ..objective import MicroBatch, TrainingObjective
from ..tuner import bypass_bank
from .config import IVConfig
from .extraction import extract_instruction_vector
from .intervention import check_intervention, intervene
from .vector import InstructionVector


KL_POSITIONS = ("answer", "all", "both")
"""Where the KL term compares: the first answer token's prediction, every answer token's, or the sum of both."""


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """[batch, tokens] bool: the positions that predict an answer token (``labels`` as TRL collates them, -100
    outside the answer; the model shifts them itself)."""
    predicting = torch.zeros_like(labels, dtype=torch.bool)
    predicting[:, :-1] = labels[:, 1:] != -100
    return predicting


def last_prompt_positions(labels: torch.Tensor) -> torch.Tensor:
    """[batch] index of each row's last prompt token: the position that predicts the first answer token."""
    return answer_positions(labels).int().argmax(dim=1)


class InstructionVectorGuidance(TrainingObjective):
    """IV-guided fine-tuning (see the module's docstring). Logs ``ivg_scale`` and ``loss_ivg_kl`` (the KL term
    before its weight). The KL term takes its own backward through the engine inside ``compute_loss``, with the
    progressive intervention held off (the model's output without the vector is what the term compares)."""

    name = "ivg"
    in_batch = True
    own_backward = True
    paper = {
        "title": "Refine Large Language Model Fine-tuning via Instruction Vector",
        "citation": "@misc{ivg,\n  title = {Refine Large Language Model Fine-tuning via Instruction Vector},\n  "
        "author = {Gangwei Jiang and Caigao Jiang and Zhaoyi Li and Siqiao Xue and Jun Zhou and Linqi Song and Defu "
        "Lian and Ying Wei}\n}",
    }

    def __init__(self, trainer: Any, prepared: tuple[InstructionVector | Dataset, PeftConfig | None]) -> None:
        super().__init__(trainer, prepared)
        source, peft_config = prepared
        args = trainer.args
        model = trainer.accelerator.unwrap_model(trainer.model)
        needs_before = args.ivg_kl_weight > 0 or not isinstance(source, InstructionVector)
        before = None  # the model before training: the KL term's reference, and what a vector is extracted from
        if needs_before and isinstance(model, PeftModel):
            before = Reference(model, snapshot=not starts_as_identity(peft_config))
        if isinstance(source, InstructionVector):
            self.instruction_vector = source
        else:  # extracted from the model before training, on the main process first; the others read its results
            with (
                args.main_process_first(desc="instruction vector"),
                before.active() if before else nullcontext(),
                bypass_bank(model) if args.lta else nullcontext(),  # in-context prompts have no query to route by
            ):
                self.instruction_vector = extract_instruction_vector(
                    model,
                    trainer.processing_class,
                    source,
                    IVConfig(**json.loads(args.ivg_extraction or "{}")),
                    output_dir=preparation.cache_dir(args) / "instruction_vector",
                )
        vectors = self.instruction_vector
        self.vector = (vectors.vectors.mean(0) if args.ivg_task is None else vectors.vector(args.ivg_task)).to(
            args.device
        )
        self.layer = vectors.layer
        check_intervention(model, self.vector, self.layer, args.ivg_scale_start)
        self.reference = before if args.ivg_kl_weight > 0 else None
        self._added = torch.zeros_like(self.vector)
        """What the progressive intervention adds now: ``s(t) * IV``, zero while it is held off."""

    @classmethod
    def prepare(
        cls, args: Any, *, model: Any, peft_config: PeftConfig | None, train_dataset: Any, sources: dict[str, Any]
    ) -> tuple[InstructionVector | Dataset, PeftConfig | None] | None:
        """The vector (``ivg_vector``), or the rows of the tasks to extract it from (``ivg_tasks``, with the
        `IVConfig` overrides of ``ivg_extraction`` checked here)."""
        if not args.guided:
            return None
        if args.ivg_kl_weight > 0 and peft_config is None and not isinstance(model, PeftModel):
            raise ValueError(
                "The guidance's KL term compares the model with itself before training, which needs an adapter to "
                "switch off: pass a peft_config (or a PeftModel), or set ivg_kl_weight=0."
            )
        if args.ivg_tasks is not None:
            settings = IVConfig(**json.loads(args.ivg_extraction or "{}"))
            rows = load_rows(args.ivg_tasks, "ivg_tasks")
            missing = sorted(
                {settings.task_column, settings.input_column, settings.output_column} - set(rows.column_names)
            )
            if missing:
                raise ValueError(
                    f"{args.ivg_tasks} has no column {missing}: give rows with task, input and output columns, or name "
                    "yours in ivg_extraction (task_column, input_column, output_column)."
                )
            tasks = sorted(set(rows[settings.task_column]))
            if args.ivg_task is not None and args.ivg_task not in tasks:
                raise ValueError(f"ivg_task={args.ivg_task!r} is not a task of {args.ivg_tasks}: {tasks[:10]}.")
            return rows, peft_config
        vector = InstructionVector.load(args.ivg_vector)
        if args.ivg_task is not None:
            vector.vector(args.ivg_task)  # an unknown task is refused here
        return vector, peft_config

    def scale(self) -> float:
        """``s(t)``: linear from ``ivg_scale_start`` at the first step to ``ivg_scale_end`` at the last."""
        args, state = self.trainer.args, self.trainer.state
        progress = state.global_step / max(state.max_steps - 1, 1) if state.max_steps else 0.0
        return args.ivg_scale_start + (args.ivg_scale_end - args.ivg_scale_start) * min(progress, 1.0)

    def around_step(self, model: torch.nn.Module, inputs: dict[str, Any]) -> contextlib.AbstractContextManager:
        labels = inputs["labels"]
        if bool((labels[:, 0] != -100).any()):
            raise ValueError(
                "Instruction-vector guidance adds the vector at each row's last prompt token, but some rows train on "
                "their first token (no prompt masked out of the loss): train on prompt/completion rows with "
                "completion_only_loss left on, or on conversations with assistant_only_loss=True."
            )
        scale = self.scale()
        self.trainer.record_metric("ivg_scale", scale)
        if scale == 0:
            return contextlib.nullcontext()
        self._added.copy_(scale * self.vector)
        positions = last_prompt_positions(labels)
        return intervene(self.trainer.accelerator.unwrap_model(model), self._added, self.layer, positions=positions)

    @contextlib.contextmanager
    def _held_off(self) -> Iterator[None]:
        added = self._added.clone()
        self._added.zero_()
        try:
            yield
        finally:
            self._added.copy_(added)

    def loss(self, batch: MicroBatch, engine: GradientEngine) -> torch.Tensor:
        args = self.trainer.args
        if args.ivg_kl_weight == 0:
            return torch.zeros((), device=batch.inputs["input_ids"].device)
        labels = batch.inputs["labels"]
        keep = answer_positions(labels)
        inputs = {key: batch.inputs[key] for key in ("input_ids", "attention_mask") if key in batch.inputs}
        unwrapped = self.trainer.accelerator.unwrap_model(batch.model)
        with self._held_off():
            with torch.no_grad(), self.reference.active():
                with intervene(unwrapped, self.vector, self.layer, positions=last_prompt_positions(labels)):
                    reference = log_probabilities(logits_at(unwrapped, keep, **inputs) / args.ivg_kl_temperature)
            model_log_probs = log_probabilities(logits_at(batch.model, keep, **inputs) / args.ivg_kl_temperature)
            divergence = self._term(token_divergence(model_log_probs, reference, "kl"), keep)
            weight = args.ivg_kl_weight / engine.accumulation_steps
            engine.backward(weight * divergence, self.name)
        divergence = divergence.detach()
        self.trainer.record_metric(
            "loss_ivg_kl", self.trainer.accelerator.gather_for_metrics(divergence).mean().item()
        )
        # the Trainer scales what compute_loss returns: the logged loss gets the term on its own scale
        return weight * divergence / engine.scale(batch.num_items_in_batch)

    def _term(self, per_position: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The mean over rows of each row's hinged KL at its first answer position and/or averaged over its answer
        positions (``per_position``: [kept], in ``keep``'s order). Each row's term is hinged on its own, so where
        micro-batches and processes hold as many rows each, the step's term is the mean over its rows however they
        are split."""
        args = self.trainer.args
        lengths = keep.sum(dim=1)
        answered = lengths > 0
        if not bool(answered.any()):  # every answer truncated away: nothing to compare, a zero in the graph
            return per_position.sum() * 0
        first = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])[answered]
        rows = torch.repeat_interleave(torch.arange(len(lengths), device=keep.device), lengths)
        terms = []
        if args.ivg_kl_positions in ("answer", "both"):
            terms.append(per_position[first])
        if args.ivg_kl_positions in ("all", "both"):
            summed = per_position.new_zeros(len(lengths)).index_add(0, rows, per_position)
            terms.append(summed[answered] / lengths[answered])
        return sum((term - args.ivg_kl_hinge).clamp(min=0) for term in terms).mean()

    def card_text(self) -> str:
        args = self.trainer.args
        tasks = ", ".join(self.instruction_vector.tasks) if args.ivg_task is None else args.ivg_task
        source = f", extracted from `{public_name(args.ivg_tasks)}`" if args.ivg_tasks else ""
        mean = "the mean vector" if args.ivg_task is None and len(self.instruction_vector.tasks) > 1 else "the vector"
        return (
            f"Instruction-vector guidance: {mean} of {tasks}{source} (layer {self.layer}, "
            f"{len(self.instruction_vector.heads)} heads) added at the last prompt token with a scale from "
            f"{args.ivg_scale_start:g} to {args.ivg_scale_end:g} over training, and a KL term (weight "
            f"{args.ivg_kl_weight:g}, {args.ivg_kl_positions} positions, temperature {args.ivg_kl_temperature:g}, "
            f"hinge {args.ivg_kl_hinge:g}) to the model before training with the vector added."
        )
