"""`TKITrainer`: `trl.SFTTrainer` with latent task adaptation, knowledge reinstatement and PCGrad.

The trainer is wiring: dataset preparation (`preparation`), the TKI tuner and its routing (`tuner`), the auxiliary
objectives (`objectives`: knowledge reinstatement, flashbacks), the gradient engine that keeps their gradients apart
for PCGrad and reduces them (`gradients`), the card and the push (`hub`). With ``lta``, ``kr`` and ``pcgrad`` off
it is `SFTTrainer`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from huggingface_hub import CommitInfo
from peft import PeftConfig, PeftModel
from transformers import PreTrainedModel, TrainingArguments
from trl import SFTTrainer

from . import hub, preparation
from .collator import EXAMPLE_IDS, GROUP_IDS, QUERY_EMBEDDINGS, TKICollator
from .config import TKIConfig, as_tki_config
from .gradients import GradientEngine
from .objective import MicroBatch, TrainingObjective
from .objectives import OBJECTIVES
from .optim import LazyAdamW, clip_grad_norm
from .resume import check_resumable
from .retrieval import usage_entropy
from .tuner import route
from .tuner.model import find_tuner


class TKITrainer(SFTTrainer):
    """A drop-in `SFTTrainer` for Task Knowledge Injection.

    Takes what `SFTTrainer` takes, every row format included; with ``lta``, ``kr`` and ``pcgrad`` off it is
    `SFTTrainer` (no ``peft_config``: every parameter trains). ``kr=None`` is decided from the training rows and
    settings before anything reads it (`preparation.resolve_kr`). Rows are prepared by `preparation.prepare_rows`:
    ids, prompt/completion rows for KR, and with ``lta`` the routing columns (query embeddings computed with
    ``args.query_encoder``, group ids hashed from the id). With ``lta`` a `peft.LoraConfig` becomes the TKI adapter
    built from it. The auxiliary objectives (`objectives.OBJECTIVES`: knowledge reinstatement with ``kr``; Joint
    Flashback Adaptation with a ``flashback_dataset``, here or in ``args``) are in ``objectives``, their gradients
    kept apart for PCGrad and reduced by ``gradients``. Everything that can be checked is checked before the
    expensive work starts.
    """

    _tag_names = ["trl", "sft", "tki"]
    _name = "TKI"
    _paper = {
        "title": "Task Knowledge Injection via Interpolations and Reinstatement for Large Language Model Generalization",
        "citation": "@misc{tki,\n  title = {Task Knowledge Injection via Interpolations and Reinstatement for Large "
        "Language Model Generalization},\n  note = {Anonymous ACL submission}\n}",
    }

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
            as_tki_config(args),
            train_dataset,
            model,
            formatting_func=formatting_func,
            compute_loss_func=kwargs.get("compute_loss_func"),
        )
        if (args.lta or args.kr or args.guided) and args.n_gpu > 1:
            raise ValueError(
                f"This process sees {args.n_gpu} GPUs, so the Trainer would split each batch with "
                "torch.nn.DataParallel, which TKI's per-example routing, reinstatement and guidance do not follow: run one "
                "process per GPU with `accelerate launch` (DDP), or set CUDA_VISIBLE_DEVICES to one GPU."
            )
        peft_config = preparation.adapter_config(model, args, peft_config, [train_dataset, eval_dataset])
        if args.lta and processing_class is None:  # loaded here, as SFTTrainer would, to read pretokenized rows
            processing_class = preparation.default_processing_class(model, args)
        self._query_text = preparation.query_text_of(args, processing_class, formatting_func)
        train_dataset = self._prepare(train_dataset, args, peft_config, model, "train")
        eval_dataset = self._prepare_eval(eval_dataset, args, peft_config, model, "eval")
        sources = {"flashback_dataset": flashback_dataset}
        prepared = [
            (objective, objective.prepare(
                args, model=model, peft_config=peft_config, train_dataset=train_dataset, sources=sources
            ))
            for objective in OBJECTIVES
        ]  # fmt: skip
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            **kwargs,
        )
        self.objectives: list[TrainingObjective] = [
            objective(self, inputs) for objective, inputs in prepared if inputs is not None
        ]
        """The auxiliary objectives this run trains, in the order their gradients follow SFT's."""
        self.data_collator = TKICollator(
            base=self.data_collator,
            query_column=args.query_embedding_column if args.lta else None,
            group_column=args.group_id_column if args.lta else None,
            id_column=args.id_column if any(o.needs_example_ids for o in self.objectives) else None,
        )
        own_backward = any(o.own_backward for o in self.objectives)
        self.gradients = GradientEngine(
            self,
            [o.name for o in self.objectives],
            pcgrad=args.pcgrad,
            reduce=(args.lta or own_backward) and self.accelerator.num_processes > 1,
            capture=any(o.shares_examples for o in self.objectives),
        )
        """Where each backward of a step goes: per-objective sums, PCGrad, and the reduction DDP cannot do."""
        if args.lta and self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            _, adamw_kwargs = self.get_optimizer_cls_and_kwargs(args, self.model)
            self.optimizer_cls_and_kwargs = (LazyAdamW, adamw_kwargs)

    # Construction -------------------------------------------------------------------------------------------------

    def _prepare(self, dataset: Any, args: TKIConfig, config: PeftConfig | None, model: Any, name: str) -> Any:
        return preparation.prepare_rows(
            dataset, args, model=model, peft_config=config, name=name, text_of=self._query_text
        )

    def _prepare_eval(self, dataset: Any, args: TKIConfig, config: PeftConfig | None, model: Any, name: str) -> Any:
        """Evaluation rows, one dataset or a dict of them (``eval_<key>``), prepared as the training rows."""
        if isinstance(dataset, dict):
            return {key: self._prepare(d, args, config, model, f"{name}_{key}") for key, d in dataset.items()}
        return self._prepare(dataset, args, config, model, name)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        extra = [c for c in preparation.routing_columns(self.args) if c not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *extra]

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        check_resumable(self.accelerator.unwrap_model(self.model), resume_from_checkpoint, self.args.lta)
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    # Training ------------------------------------------------------------------------------------------------------

    def _routing(self, model: torch.nn.Module, inputs: dict[str, Any]) -> contextlib.AbstractContextManager:
        if QUERY_EMBEDDINGS not in inputs:
            return contextlib.nullcontext()
        return route(model, inputs.pop(QUERY_EMBEDDINGS), inputs.pop(GROUP_IDS))

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """SFTTrainer's loss under routing; in training, plus the in-batch objectives' terms (with PCGrad their
        values only: their gradients go through ``gradients``)."""
        mode = "train" if self.model.training else "eval"
        example_ids = inputs.pop(EXAMPLE_IDS, None)
        in_batch = [o for o in self.objectives if o.in_batch] if self.gradients.in_step else []
        with self._routing(model, inputs):
            self._observe_routing(model, mode)
            if not in_batch:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            with _output_of(model) as outputs, self.gradients.recording(inputs["input_ids"].shape[0]):
                loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            batch = MicroBatch(model, inputs, outputs[0], example_ids, num_items_in_batch)
            for objective in in_batch:
                term = objective.loss(batch, self.gradients)
                loss = loss + (term.detach() if self.gradients.projects else term)
        return (loss, outputs[0]) if return_outputs else loss

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """The Trainer's step under the micro-batch's routing and the objectives' contexts (activation checkpointing
        recomputes layers during backward), then the objectives' own micro-batches; the gradients go where
        ``gradients`` sends them, and are reduced (and projected) once per optimizer step."""
        with self.gradients.step(model):
            with contextlib.ExitStack() as around:
                for objective in self.objectives:
                    around.enter_context(objective.around_step(model, inputs))
                with self._routing(model, inputs):
                    loss = super().training_step(model, inputs, num_items_in_batch)
            self.gradients.after_trainer_backward()
            for objective in self.objectives:
                if not objective.in_batch:
                    loss = loss + objective.own_step(model, self.gradients)
        if self.accelerator.sync_gradients:
            for name, value in self.gradients.end_of_step().items():
                self.record_metric(name, value)
            for objective in self.objectives:
                objective.end_of_step()
        return loss

    def _clip_grad_norm(self, model: torch.nn.Module) -> torch.Tensor:
        """The Trainer's clipping, for gradients that include the bank's sparse ones."""
        if not self.args.lta:
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()
        return clip_grad_norm(list(model.parameters()), self.args.max_grad_norm)

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: torch.Tensor | None = None) -> torch.Tensor:
        if grad_norm is None and self.args.lta:
            grad_norm = clip_grad_norm(list(model.parameters()), float("inf"))
        return super()._get_grad_norm(model, grad_norm)

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """SFTTrainer's evaluation; a dataset passed here gets the ids and routing columns that construction gives
        ``eval_dataset``."""
        if isinstance(eval_dataset, (Dataset, IterableDataset, dict)):
            eval_dataset = self._prepare_eval(eval_dataset, self.args, None, self.model, metric_key_prefix)
        return super().evaluate(
            eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )

    # Metrics -------------------------------------------------------------------------------------------------------

    def record_metric(self, name: str, value: float, mode: str = "train") -> None:
        """Add a value to the metric ``name``, logged (averaged) with SFTTrainer's at the next logging step."""
        self._metrics[mode][name].append(value)

    def _observe_routing(self, model: torch.nn.Module, mode: str) -> None:
        """Log how evenly the batch uses the bank (entropy of the blend weights per latent task)."""
        if not self.args.lta:
            return
        tuner = find_tuner(model)
        adapter = tuner.active_adapters[0]
        routing = tuner.router.require()
        indices, weights = routing.selection(adapter, routing.batch_size)
        self.record_metric(
            "latent_usage_entropy", usage_entropy(indices, weights, tuner.peft_config[adapter].num_latent_tasks), mode
        )

    # Sharing -------------------------------------------------------------------------------------------------------

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: Any = None,
        evaluation: str | None = None,
        **kwargs: Any,
    ) -> None:
        """With ``lta``, the TKI card (`hub.write_trainer_card`); without, SFTTrainer's, with what each objective
        says of its training (`hub.add_objectives`)."""
        citations = [paper["citation"] for paper in (o.paper for o in self.objectives) if paper]
        if not self.args.lta:
            super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
            if self.is_world_process_zero() and self.objectives:
                hub.add_objectives(self.args.output_dir, [o.card_text() for o in self.objectives], citations)
        elif self.is_world_process_zero():
            citations = [self._paper["citation"], *citations]
            hub.write_trainer_card(
                self, citations, model_name=model_name, dataset_name=dataset_name, evaluation=evaluation
            )

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
    ) -> CommitInfo | None:
        """Upload ``output_dir`` as the Trainer does, in one commit (`hub.push_trainer`): the adapter, tokenizer
        files and the model card; never ``_*`` caches, checkpoints or pickled files (``training_args.bin``).
        ``prior_inputs=True`` adds the prior-input store under ``prior_inputs/``; ``plain_lora_query`` adds
        `export_lora`'s plain LoRA for that query under ``plain_lora/``. ``kwargs`` go to `create_model_card`. The
        upload is always blocking."""
        hub_settings = {"token": token, "revision": revision, "private": private}
        return hub.push_trainer(
            self, commit_message or "End of training", hub_settings, prior_inputs, plain_lora_query, kwargs
        )


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
