"""`TKITrainer`: `trl.SFTTrainer` with latent task adaptation, knowledge reinstatement and PCGrad.

The trainer wires the package's parts together: dataset preparation (`preparation`), the TKI tuner and its
routing (`tuner`), the reinstatement objective (`reinstatement`), the backward plan and the per-objective
gradient projection (`backward_plan`, `pcgrad`), the card and the push (`hub`). With ``lta``, ``kr`` and
``pcgrad`` off it is `SFTTrainer`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from peft import PeftConfig, PeftModel
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedModel, TrainingArguments
from trl import SFTTrainer
from trl.data_utils import get_dataset_column_names

from . import preparation
from .backward_plan import choose_plan, run_plan
from .capture import SubsetGradients
from .collator import EXAMPLE_IDS, GROUP_IDS, QUERY_EMBEDDINGS, TKICollator
from .config import TKIConfig
from .flashback import (
    Flashbacks,
    Reference,
    end_of_sequence_ids,
    evaluation_mode,
    extend_with_continuations,
    load_flashback_rows,
    starts_as_identity,
    token_divergence,
    tokenize_flashbacks,
)
from .hub import evaluation_table, push_adapter, render_model_card, training_summary, write_model_card
from .logits import log_probabilities, logits_at
from .optim import LazyAdamW, clip_grad_norm
from .pcgrad import PCGradAccumulator
from .reinstatement import PriorInputStore
from .reinstatement.fingerprint import model_fingerprint, tokenizer_fingerprint
from .reinstatement.objective import Objectives, reinstatement_objectives
from .reinstatement.stage1 import adapters_disabled, on_the_fly_deltas, trl_pad_token_id
from .retrieval import usage_entropy
from .tuner import export_lora, route
from .tuner.model import find_tuner


CACHE_DIR = "_tki_cache"
"""Under ``output_dir``: computed query embeddings, prior inputs and flashback continuations. ``push_to_hub``
skips ``_*`` paths."""


class TKITrainer(SFTTrainer):
    """A drop-in `SFTTrainer` for Task Knowledge Injection.

    Takes what `SFTTrainer` takes, every row format included; with ``lta``, ``kr`` and ``pcgrad`` off it is
    `SFTTrainer` (no ``peft_config``: every parameter trains). ``kr=None`` is decided from the training rows and
    settings before anything reads it (`preparation.resolve_kr`). Rows without an ``id`` get a hash of their
    columns; missing query embeddings are computed with ``args.query_encoder`` from the text the model reads and
    missing group ids hashed from the id; with ``kr``, ``messages`` rows are split at their last assistant turn and
    missing prior inputs are computed at construction (``prior_inputs_mode="store"``) or per batch
    (``"on_the_fly"``). With ``lta`` a `peft.LoraConfig` becomes the TKI adapter built from it. A
    ``flashback_dataset`` (here or in ``args``) adds Joint Flashback Adaptation's divergence to the model before
    training on old tasks' prompts. Everything that can be checked is checked before the expensive work starts.
    """

    _tag_names = ["trl", "sft", "tki"]

    def __init__(
        self,
        model: str | PreTrainedModel | PeftModel,
        args: TKIConfig | TrainingArguments | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: Any = None,
        peft_config: PeftConfig | None = None,
        flashback_dataset: Dataset | str | None = None,
        **kwargs: Any,
    ) -> None:
        formatting_func = kwargs.get("formatting_func")
        args = preparation.resolve_kr(
            _as_tki_config(args),
            train_dataset,
            model,
            formatting_func=formatting_func,
            compute_loss_func=kwargs.get("compute_loss_func"),
        )
        if (args.lta or args.kr) and args.n_gpu > 1:
            raise ValueError(
                f"This process sees {args.n_gpu} GPUs, so the Trainer would split each batch with "
                "torch.nn.DataParallel, which TKI's per-example routing and reinstatement do not follow: run one "
                "process per GPU with `accelerate launch` (DDP), or set CUDA_VISIBLE_DEVICES to one GPU."
            )
        self._cache_dir = Path(args.output_dir) / CACHE_DIR
        peft_config = preparation.adapter_config(model, args, peft_config, [train_dataset, eval_dataset])
        if args.lta and processing_class is None:  # loaded here, as SFTTrainer would, to read pretokenized rows
            processing_class = preparation.default_processing_class(model, args)
        self._query_text = preparation.query_text_of(args, processing_class, formatting_func)
        train_dataset = self._prepare_rows(train_dataset, args, peft_config, model, "train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                n: self._prepare_rows(d, args, peft_config, model, f"eval_{n}") for n, d in eval_dataset.items()
            }
        else:
            eval_dataset = self._prepare_rows(eval_dataset, args, peft_config, model, "eval")
        flashback_source = flashback_dataset if flashback_dataset is not None else args.flashback_dataset
        if flashback_dataset is not None:
            args.check_flashback_engine()
        flashback_rows = (
            None if flashback_source is None else self._flashback_rows(flashback_source, args, peft_config, model)
        )
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            **kwargs,
        )
        self._reference: Reference | None = None
        self._flashbacks = None if flashback_rows is None else self._flashback_set(flashback_rows, peft_config)
        self._flashback_source = flashback_source if isinstance(flashback_source, str) else None
        self._flashback_micro_batch = 0
        """Flashback micro-batches drawn in the current optimizer step."""
        self._store = self._prior_input_store(train_dataset) if args.kr and args.prior_inputs_mode == "store" else None
        self.data_collator = TKICollator(
            base=self.data_collator,
            query_column=args.query_embedding_column if args.lta else None,
            group_column=args.group_id_column if args.lta else None,
            id_column=args.id_column if self._store is not None else None,
        )
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        objectives = 1 + args.kr + (self._flashbacks is not None)
        self._pcgrad = PCGradAccumulator(trainable, objectives) if args.pcgrad and objectives > 1 else None
        self._capture = SubsetGradients(self.model, trainable) if self._pcgrad is not None and args.kr else None
        self._reducer = None
        if self._pcgrad is None and (args.lta or self._flashbacks is not None) and self.accelerator.num_processes > 1:
            # DDP's buckets cannot take the bank's row-sparse gradients, nor a second backward per micro-batch (the
            # flashbacks'): gradients are reduced here, once per step.
            self._reducer = PCGradAccumulator(trainable, num_objectives=1)
        self._recording: SubsetGradients | None = None
        self._objectives: Objectives | None = None
        if args.lta and self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            _, adamw_kwargs = self.get_optimizer_cls_and_kwargs(args, self.model)
            self.optimizer_cls_and_kwargs = (LazyAdamW, adamw_kwargs)

    # Construction -------------------------------------------------------------------------------------------------

    def _prepare_rows(
        self,
        dataset: Dataset | IterableDataset | None,
        args: TKIConfig,
        config: PeftConfig | None,
        model: Any,
        name: str,
    ) -> Dataset | IterableDataset | None:
        """Ids, prompt/completion rows for KR (training rows only need them; evaluation rows in a conversation are
        split as training rows are), and the routing columns."""
        if dataset is None or not (args.lta or args.kr):
            return dataset
        preparation.check_rows(dataset, name)
        dataset = preparation.with_ids(dataset, args.id_column, (args.query_embedding_column, args.group_id_column))
        conversation = {"messages", "conversations"} & set(get_dataset_column_names(dataset))
        if args.kr and (name == "train" or conversation):
            dataset = preparation.as_prompt_completion(dataset, name, args.id_column)
        if args.lta:
            config = config or find_tuner(model).peft_config[find_tuner(model).active_adapters[0]]
            dataset = preparation.with_routing_columns(
                dataset,
                config,
                encoder=args.query_encoder,
                query_column=args.query_embedding_column,
                group_column=args.group_id_column,
                id_column=args.id_column,
                cache_dir=self._cache_dir / "queries",
                text_of=self._query_text,
            )
        return dataset

    def _flashback_rows(
        self, source: Dataset | str, args: TKIConfig, config: PeftConfig | None, model: Any
    ) -> Dataset:
        """The flashback prompts; routed through the bank, with ids, query embeddings and group ids."""
        rows = load_flashback_rows(source)
        if not (args.lta and args.flashback_routing):
            return rows
        return self._prepare_rows(rows, args, config, model, "flashback")

    def _flashback_set(self, rows: Dataset, peft_config: PeftConfig | None) -> Flashbacks:
        """Tokenized flashbacks and their reference (the model before training: adapters off when the trainer built
        an adapter that starts as the identity, else the adapter as it arrived or was initialised), extended by the
        reference's continuations (generated by the main process, read by the others)."""
        args, tokenizer = self.args, self.processing_class
        model = self.accelerator.unwrap_model(self.model)
        built_as_identity = peft_config is not None and starts_as_identity(peft_config)
        self._reference = Reference(model, snapshot=not built_as_identity)
        routed = args.lta and args.flashback_routing
        length = None if args.max_length is None else args.max_length - args.flashback_continuation_tokens
        flashbacks = Flashbacks(
            tokenize_flashbacks(tokenizer, rows["prompt"], length),
            pad_token_id=trl_pad_token_id(tokenizer),
            per_step=args.flashbacks_per_step,
            seed=args.seed,
            query_embeddings=torch.tensor(rows[args.query_embedding_column]) if routed else None,
            group_ids=torch.tensor(rows[args.group_id_column]) if routed else None,
            bank=args.lta,
        )
        if args.flashback_continuation_tokens:
            with args.main_process_first(desc="flashback continuations"):
                extend_with_continuations(
                    flashbacks,
                    self._reference,
                    tokens=args.flashback_continuation_tokens,
                    eos_token_ids=end_of_sequence_ids(model, tokenizer),
                    cache_dir=self._cache_dir / "flashbacks",
                    key={"model": model_fingerprint(model), "tokenizer": tokenizer_fingerprint(tokenizer)},
                )
        return flashbacks

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        extra = [c for c in preparation.routing_columns(self.args) if c not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *extra]

    def _prior_input_store(self, rows: Dataset) -> PriorInputStore:
        """The training rows' prior inputs, computed with the base model (adapters off) if no store was given."""
        model = self.accelerator.unwrap_model(self.model)
        with adapters_disabled(model):
            return preparation.prior_input_store(
                model,
                self.processing_class,
                rows,
                self.train_dataset,
                config=self.args.prior_input_config,
                store_dir=self.args.prior_inputs_dir,
                compute_dir=self._cache_dir / "prior_inputs",
                max_length=self.args.max_length,
                id_column=self.args.id_column,
                chat_template=self.chat_template,
            )

    # Training ------------------------------------------------------------------------------------------------------

    def _routing(self, model: torch.nn.Module, inputs: dict[str, Any]) -> contextlib.AbstractContextManager:
        if QUERY_EMBEDDINGS not in inputs:
            return contextlib.nullcontext()
        return route(model, inputs.pop(QUERY_EMBEDDINGS), inputs.pop(GROUP_IDS))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """SFTTrainer's loss under routing; in training with ``kr``, ``L_sft + alpha L_reinst``, with ``L_sft``
        SFTTrainer's own (its loss type, its metrics)."""
        mode = "train" if self.model.training else "eval"
        example_ids = inputs.pop(EXAMPLE_IDS, None)
        with self._routing(model, inputs):
            self._observe_routing(model, mode)
            if not (self.args.kr and mode == "train"):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            with _output_of(model) as prompt_outputs, self._recording_context():
                loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            self._objectives = reinstatement_objectives(
                model,
                inputs,
                prompt_outputs[0],
                self._prior_deltas(model, inputs, example_ids),
                self.accelerator.unwrap_model(model).get_input_embeddings(),
                self._divisor(prompt_outputs[0], num_items_in_batch),
                self.args.loss_type,
                self.args.reinstatement_target,
            )
            self._log_objectives(self._objectives, num_items_in_batch)
            loss = loss + self.args.reinstatement_alpha * self._objectives.reinstatement
        return (loss, prompt_outputs[0]) if return_outputs else loss

    def _recording_context(self) -> contextlib.AbstractContextManager:
        return self._recording.recording() if self._recording is not None else contextlib.nullcontext()

    def _divisor(self, outputs: Any, num_items_in_batch: Any) -> torch.Tensor:
        """What SFTTrainer divides a micro-batch's summed token loss by (its ``compute_loss``, step by step)."""
        tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        divisor = torch.as_tensor(tokens, device=outputs.log_probs.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            divisor = divisor / (self.accelerator.num_processes // self.get_tp_size())
        return divisor

    def _prior_deltas(self, model: torch.nn.Module, inputs: dict[str, Any], example_ids: list[str] | None):
        """``q - e`` of the batch's examples, [batch, prompt_tokens, hidden]: from the store, or stage 1 on this
        batch with the base model (adapters off) in ``on_the_fly`` mode."""
        device = inputs["input_ids"].device
        if self._store is not None:
            return pad_sequence([self._store.load_delta(i) for i in example_ids], batch_first=True).to(device)
        return on_the_fly_deltas(self.accelerator.unwrap_model(model), inputs, self.args.prior_input_config)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """The Trainer's loading, after refusing a checkpoint of another adapter type (``lta`` or the adapter
        switched between the runs), whose optimizer state would otherwise fail to load deep inside torch."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        peft_type = unwrapped.active_peft_config.peft_type if isinstance(unwrapped, PeftModel) else "full-model"
        now = getattr(peft_type, "value", peft_type)
        name = unwrapped.active_adapter if isinstance(unwrapped, PeftModel) else ""
        # PEFT saves an adapter not named "default" in a folder of its name
        saved = [
            p
            for p in (Path(resume_from_checkpoint), Path(resume_from_checkpoint, name))
            if (p / "adapter_config.json").is_file()
        ]
        then = json.loads((saved[0] / "adapter_config.json").read_text())["peft_type"] if saved else "full-model"
        if then != now:
            raise ValueError(
                f"{resume_from_checkpoint} holds a {then} checkpoint, but this run trains a {now} one (lta="
                f"{self.args.lta}): resume with the settings that wrote it, or start a new run in another output_dir."
            )
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Route the micro-batch for its forward and backward passes (activation checkpointing recomputes layers
        during backward), then take a flashback micro-batch under its own routing. With PCGrad each objective's
        gradient is accumulated on its own and projected once per optimizer step; with LTA or flashbacks on several
        processes the gradients are reduced here, not by DDP."""
        own_reduction = self._pcgrad is not None or self._reducer is not None
        reduction = self.accelerator.no_sync(model) if own_reduction else contextlib.nullcontext()
        with reduction:
            with self._routing(model, inputs):
                if self._pcgrad is None:
                    loss = super().training_step(model, inputs, num_items_in_batch)
                else:
                    loss = self._pcgrad_step(model, inputs, num_items_in_batch)
            if self._flashbacks is not None:
                loss = loss + self._flashback_step(model)
        if self.accelerator.sync_gradients:
            self._flashback_micro_batch = 0
            if own_reduction:
                self._reduce_gradients()
        return loss

    def _pcgrad_step(self, model, inputs, num_items_in_batch):
        """`Trainer.training_step` with the backward passes of the micro-batch's `BackwardPlan`, scaled as the
        Trainer scales its one backward."""
        model.train()
        if callable(getattr(self.optimizer, "train", None)):  # schedule-free optimizers, as the Trainer does
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        scale = self._gradient_scale(num_items_in_batch)
        capture = self._capture
        if capture is not None and not (capture.supported and inputs["input_ids"].shape[0] > 1):
            capture = None
        self._recording = capture
        try:
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        finally:
            self._recording = None

        def backward(objective: torch.Tensor, retain_graph: bool = False) -> None:
            self.accelerator.backward(objective * scale, retain_graph=retain_graph)

        if self._objectives is None:  # no reinstatement: the SFT objective is the loss
            backward(loss)
            self._pcgrad.add(0, self._pcgrad.take_gradients())
            return loss.detach() * scale
        plan = choose_plan(self._objectives.through_prior, capture)
        self._metrics["train"]["pcgrad_backward_passes"].append(plan.backward_passes)
        run_plan(plan, self._objectives, self.args.reinstatement_alpha, self._pcgrad, backward, capture)
        self._objectives = None
        return loss.detach() * scale

    def _flashback_step(self, model: torch.nn.Module) -> torch.Tensor:
        """One flashback micro-batch: the reference's next-token distributions at its positions (no grad), the
        model's, and their divergence averaged per flashback, whose backward (scaled as the Trainer scales a
        per-micro-batch mean) runs inside the flashbacks' own routing and, with PCGrad, goes to the flashback
        objective. At weight 0 the model's forward only measures (eval mode, no graph): training is TKI's, dropout's
        random draws included. Returns the weighted term on the scale of the Trainer's ``loss``."""
        # Draws are numbered by optimizer step, so a resumed run draws what the interrupted one would have.
        draw = self.state.global_step * self.args.gradient_accumulation_steps + self._flashback_micro_batch
        self._flashback_micro_batch += 1
        process = self.accelerator.process_index, self.accelerator.num_processes
        batch = self._flashbacks.draw(draw, *process, self.args.device)
        unwrapped = self.accelerator.unwrap_model(model)
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        weight = self.args.flashback_weight / self._accumulation_steps
        measure_only = contextlib.nullcontext() if weight > 0 else evaluation_mode(unwrapped)
        with batch.routing(unwrapped):
            with self.compute_loss_context_manager():
                with torch.no_grad(), self._reference.active():
                    reference = log_probabilities(logits_at(unwrapped, batch.keep, **inputs))
                with torch.set_grad_enabled(weight > 0), measure_only:
                    log_probs = log_probabilities(logits_at(model, batch.keep, **inputs))
                    per_position = token_divergence(log_probs, reference, self.args.flashback_divergence)
                    divergence = batch.mean_per_flashback(per_position)
                del reference, log_probs, per_position
            if weight > 0:
                self.accelerator.backward(weight * divergence)
        if weight > 0 and self._pcgrad is not None:
            self._pcgrad.add(self._pcgrad.num_objectives - 1, self._pcgrad.take_gradients())
        divergence = divergence.detach()
        self._metrics["train"]["loss_flashback"].append(self.accelerator.gather_for_metrics(divergence).mean().item())
        return weight * divergence

    def _gradient_scale(self, num_items_in_batch: Any) -> float:
        """The factor `Trainer.training_step` applies to the loss before its backward: ``1 / accumulation steps``
        unless the loss is already normalised over the effective batch."""
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        return 1.0 if scaled else 1.0 / self._accumulation_steps

    @property
    def _accumulation_steps(self) -> int:
        """Micro-batches in the current optimizer step (the Trainer's count, set by its loop; else the argument)."""
        return getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

    def _reduce_gradients(self) -> None:
        """At the end of an effective batch: all-reduce (and with PCGrad project) the accumulated gradients."""
        if self._pcgrad is None:
            self._reducer.add(0, self._reducer.take_gradients())
            self._reducer.apply()
            return
        projection = self._pcgrad.apply()
        metrics = self._metrics["train"]
        metrics["pcgrad_conflict_rate"].append(float(projection.conflict))
        flashback = self._pcgrad.num_objectives - 1
        pairs = {"pcgrad_cosine": (0, 1)} if self.args.kr else {}
        if self._flashbacks is not None:
            pairs["pcgrad_cosine_flashback"] = (0, flashback)
            if self.args.kr:
                pairs["pcgrad_cosine_reinst_flashback"] = (1, flashback)
        for name, (i, j) in pairs.items():
            metrics[name].append(projection.cosine(i, j))

    def _clip_grad_norm(self, model):
        """The Trainer's clipping, for gradients that include the bank's sparse ones."""
        if not self.args.lta:
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()
        return clip_grad_norm(list(model.parameters()), self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None and self.args.lta:
            grad_norm = clip_grad_norm(list(model.parameters()), float("inf"))
        return super()._get_grad_norm(model, grad_norm)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """SFTTrainer's evaluation; a dataset passed here gets the ids and routing columns that construction gives
        ``eval_dataset``."""
        if isinstance(eval_dataset, (Dataset, IterableDataset)):
            eval_dataset = self._prepare_rows(eval_dataset, self.args, None, self.model, metric_key_prefix)
        elif isinstance(eval_dataset, dict):
            eval_dataset = {
                name: self._prepare_rows(d, self.args, None, self.model, f"{metric_key_prefix}_{name}")
                for name, d in eval_dataset.items()
            }
        return super().evaluate(
            eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )

    # Metrics -------------------------------------------------------------------------------------------------------

    def _log_objectives(self, objectives: Objectives, num_items_in_batch: Any) -> None:
        """Log the objectives on the scale of the Trainer's ``loss``: a micro-batch's share times the number of
        micro-batches when the loss is normalised over the effective batch, so that the average over a step is the
        effective batch's value."""
        gather = self.accelerator.gather_for_metrics
        share = self._accumulation_steps * self._gradient_scale(num_items_in_batch)
        metrics = self._metrics["train"]
        sft = gather(objectives.sft.detach()).mean().item() * share
        reinstatement = gather(objectives.reinstatement.detach()).mean().item() * share
        metrics["loss_sft"].append(sft)
        metrics["loss_reinst"].append(reinstatement)
        metrics["reinst_gap"].append(reinstatement - sft)
        metrics["reinst_q_win_rate"].append(gather(objectives.through_prior.float()).mean().item())

    @property
    def _adapter(self) -> str:
        return find_tuner(self.model).active_adapters[0]

    def _observe_routing(self, model: torch.nn.Module, mode: str) -> None:
        """Log how evenly the batch uses the bank (entropy of the blend weights per latent task)."""
        if not self.args.lta:
            return
        tuner = find_tuner(model)
        routing = tuner.router.require()
        indices, weights = routing.selection(self._adapter, routing.batch_size)
        entropy = usage_entropy(indices, weights, tuner.peft_config[self._adapter].num_latent_tasks)
        self._metrics[mode]["latent_usage_entropy"].append(entropy)

    # Sharing -------------------------------------------------------------------------------------------------------

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: Any = None,
        evaluation: str | None = None,
        **kwargs: Any,
    ) -> None:
        """With ``lta``, the TKI card (`model_card_template.md`) from the adapter config, the arguments and the
        logs: base model, TKI settings, data, the run's last evaluation (or ``evaluation``, Markdown), usage for
        both loading paths. Without, SFTTrainer's card."""
        if not self.args.lta:
            return super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return None
        rows = len(self.train_dataset) if isinstance(self.train_dataset, Dataset) else None
        card = render_model_card(
            find_tuner(self.model).peft_config[self._adapter],
            repo_id=self.hub_model_id or self.args.hub_model_id or model_name or Path(self.args.output_dir).name,
            training_data=training_summary(
                self.args,
                rows,
                dataset_name,
                flashbacks=len(self._flashbacks) if self._flashbacks is not None else 0,
                flashback_source=self._flashback_source,
                epochs=self.state.epoch or None,
            ),
            evaluation=evaluation or evaluation_table(self.state.log_history),
        )
        write_model_card(self.args.output_dir, card)
        return None

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        *,
        prior_inputs: bool = False,
        plain_lora_query: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """Upload ``output_dir`` as the Trainer does, in one commit through `tki_trainer.hub.push_adapter`: the
        adapter, tokenizer files and the model card; never ``_*`` caches, checkpoints or pickled files
        (``training_args.bin``). ``prior_inputs=True`` adds the prior-input store under ``prior_inputs/``;
        ``plain_lora_query`` adds `export_lora`'s plain LoRA for that query under ``plain_lora/``. ``kwargs`` go to
        `create_model_card`. The upload is always blocking."""
        if prior_inputs and self._store is None:
            raise ValueError(
                "prior_inputs=True needs a prior-input store, which this trainer (kr=False or on_the_fly) has not."
            )
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(**kwargs)
        plain_lora = None
        if plain_lora_query is not None:
            plain_lora = self._cache_dir / "plain_lora"
            export_lora(self.accelerator.unwrap_model(self.model), plain_lora_query, plain_lora)
        return push_adapter(
            self.args.output_dir,
            self.hub_model_id or self.args.hub_model_id or Path(self.args.output_dir).name,
            token=token if token is not None else self.args.hub_token,
            revision=revision if revision is not None else self.args.hub_revision,
            private=private if private is not None else self.args.hub_private_repo,
            commit_message=commit_message or "End of training",
            prior_inputs=self._store.path if prior_inputs else None,
            plain_lora=plain_lora,
        )


def _as_tki_config(args: TrainingArguments | None) -> TKIConfig:
    """``args`` as a `TKIConfig`: `TrainingArguments` (or an `SFTConfig`) converted as SFTTrainer converts them, with
    TKI's fields at their defaults."""
    if args is None:
        return TKIConfig(output_dir="tki-output")
    if isinstance(args, TKIConfig):
        return args
    return TKIConfig(**{**args.to_dict(), "hub_token": args.hub_token})


@contextlib.contextmanager
def _output_of(module: torch.nn.Module) -> Iterator[list[Any]]:
    """Record what ``module``'s forward returns inside the block (SFTTrainer's fused outputs, which its
    ``compute_loss`` does not return)."""
    outputs: list[Any] = []
    handle = module.register_forward_hook(lambda _module, _args, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()
