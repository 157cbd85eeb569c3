"""Knowledge reinstatement as a `TKITrainer` objective: ``alpha * L_reinst`` beside SFTTrainer's loss, on the
Trainer's own micro-batch, with one more forward through the examples' prior inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig
from torch.nn.utils.rnn import pad_sequence

from .. import preparation
from ..gradients import GradientEngine
from ..objective import MicroBatch, TrainingObjective
from .backward import choose_plan, run_plan
from .losses import ReinstatementLosses, reinstatement_losses
from .stage1 import adapters_disabled, on_the_fly_deltas
from .store import PriorInputStore


READINGS = {
    "easier": "the paper's eq. 6 as written: each example trained through whichever of its prompt and its prior input "
    "already produced the target more easily (after stage 1 mostly the prior input, a second form of input for the "
    "same target)",
    "harder": "eq. 6 with its minus sign dropped: each example trained through whichever of its prompt and its prior "
    "input produced the target less easily (after stage 1 rarely the prior input)",
}


def reinstatement_reading(args: Any) -> str:
    """The card's sentence on how knowledge reinstatement was read: eq. 6's target and stage 1's Wasserstein sign."""
    weight = args.prior_inputs_wasserstein_weight
    if weight < 0:
        stage1 = f"pushed away from the prompt (Wasserstein weight {weight:g}, eq. 5 as written)"
    elif weight > 0:
        stage1 = f"kept near the prompt (Wasserstein weight {weight:g})"
    else:
        stage1 = "without the Wasserstein term"
    return f"Knowledge reinstatement: {READINGS[args.reinstatement_target]}; prior inputs from stage 1 {stage1}."


class ReinstatementObjective(TrainingObjective):
    """``alpha * L_reinst`` (`ReinstatementLosses`), its prior inputs from the store that stage 1 wrote before
    training (``prior_inputs_mode="store"``: computed at construction with the base model if not given) or from
    stage 1 on each batch (``"on_the_fly"``). With PCGrad its gradient is taken by the micro-batch's `BackwardPlan`.
    Logs ``loss_sft``, ``loss_reinst``, ``reinst_gap`` (their difference) and ``reinst_q_win_rate`` (the share of
    examples whose term goes through the prior input)."""

    name = "reinst"
    in_batch = True
    shares_examples = True

    def __init__(self, trainer: Any, prepared: Any) -> None:
        super().__init__(trainer, prepared)
        self.store = self._build_store(prepared) if trainer.args.prior_inputs_mode == "store" else None
        self.needs_example_ids = self.store is not None  # the store is read by example id

    @classmethod
    def prepare(
        cls, args: Any, *, model: Any, peft_config: PeftConfig | None, train_dataset: Any, sources: dict[str, Any]
    ) -> Any:
        return train_dataset if args.kr else None

    def _build_store(self, rows: Any) -> PriorInputStore:
        """The training rows' prior inputs, computed with the base model (adapters off) if no store was given."""
        trainer, args = self.trainer, self.trainer.args
        model = trainer.accelerator.unwrap_model(trainer.model)
        with adapters_disabled(model):
            return preparation.prior_input_store(
                model,
                trainer.processing_class,
                rows,
                trainer.train_dataset,
                config=args.prior_input_config,
                store_dir=args.prior_inputs_dir,
                compute_dir=preparation.cache_dir(args) / "prior_inputs",
                max_length=args.max_length,
                id_column=args.id_column,
                chat_template=trainer.chat_template,
            )

    def loss(self, batch: MicroBatch, engine: GradientEngine) -> torch.Tensor:
        args = self.trainer.args
        embedding = self.trainer.accelerator.unwrap_model(batch.model).get_input_embeddings()
        losses = reinstatement_losses(
            batch.model,
            batch.inputs,
            batch.outputs,
            self._prior_deltas(batch),
            embedding,
            self._divisor(batch),
            args.loss_type,
            args.reinstatement_target,
        )
        self._log(losses, engine, batch.num_items_in_batch)
        if engine.projects:
            plan = choose_plan(losses.through_prior, engine.can_share_examples)
            self.trainer.record_metric("pcgrad_backward_passes", plan.backward_passes)
            run_plan(plan, losses, args.reinstatement_alpha, engine.scale(batch.num_items_in_batch), engine, self.name)
        return args.reinstatement_alpha * losses.reinstatement

    def _prior_deltas(self, batch: MicroBatch) -> torch.Tensor:
        """``q - e`` of the batch's examples, [batch, prompt_tokens, hidden]: from the store, or stage 1 on this
        batch with the base model (adapters off) in ``on_the_fly`` mode."""
        if self.store is not None:
            deltas = pad_sequence([self.store.load_delta(i) for i in batch.example_ids], batch_first=True)
            return deltas.to(batch.inputs["input_ids"].device)
        model = self.trainer.accelerator.unwrap_model(batch.model)
        return on_the_fly_deltas(model, batch.inputs, self.trainer.args.prior_input_config)

    def _divisor(self, batch: MicroBatch) -> torch.Tensor:
        """What SFTTrainer divides a micro-batch's summed token loss by (its ``compute_loss``, step by step)."""
        trainer, num_items = self.trainer, batch.num_items_in_batch
        tokens = batch.outputs.label_mask.sum() if num_items is None else num_items
        divisor = torch.as_tensor(tokens, device=batch.outputs.log_probs.device).clamp(min=1)
        if trainer.args.average_tokens_across_devices and num_items is not None:
            divisor = divisor / (trainer.accelerator.num_processes // trainer.get_tp_size())
        return divisor

    def _log(self, losses: ReinstatementLosses, engine: GradientEngine, num_items_in_batch: Any) -> None:
        """Log the losses on the scale of the Trainer's ``loss``: a micro-batch's share times the number of
        micro-batches when the loss is normalised over the effective batch, so that the average over a step is the
        effective batch's value."""
        gather, record = self.trainer.accelerator.gather_for_metrics, self.trainer.record_metric
        share = engine.accumulation_steps * engine.scale(num_items_in_batch)
        sft = gather(losses.sft.detach()).mean().item() * share
        reinstatement = gather(losses.reinstatement.detach()).mean().item() * share
        record("loss_sft", sft)
        record("loss_reinst", reinstatement)
        record("reinst_gap", reinstatement - sft)
        record("reinst_q_win_rate", gather(losses.through_prior.float()).mean().item())

    def card_text(self) -> str:
        return reinstatement_reading(self.trainer.args)

    def uploads(self) -> dict[str, Path]:
        return {} if self.store is None else {"prior_inputs": Path(self.store.path)}
