"""`TKITrainer`: `trl.SFTTrainer` with latent task adaptation, knowledge reinstatement and PCGrad.

The trainer composes the package's parts: the TKI tuner and its routing (`tuner`), query embeddings and
groups (`data`, `retrieval`), prior inputs and the reinstatement objective (`reinstatement`), and the
per-objective gradient projection (`pcgrad`). With ``lta``, ``kr`` and ``pcgrad`` off it is `SFTTrainer`.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, PeftConfig, PeftModel
from transformers import PreTrainedModel
from trl import SFTTrainer

from .capture import SubsetGradients
from .collator import GROUP_IDS, PRIOR_DELTAS, QUERY_EMBEDDINGS, TKICollator
from .config import TKIConfig
from .data.formats import check_prompt_completion_rows
from .data.queries import add_query_embeddings
from .embedded import load_query_encoder
from .hub import push_adapter, render_model_card, write_model_card
from .optim import LazyAdamW, clip_grad_norm
from .pcgrad import PCGradAccumulator
from .reinstatement import PriorInputStore, compute_prior_inputs, optimize_prior_inputs
from .reinstatement.fingerprint import prompt_hash
from .reinstatement.objective import Objectives, summed_cross_entropy
from .retrieval import hashed_group, usage_entropy
from .tuner import LatentLoraConfig, TKIModel, export_lora, route
from .tuner.model import find_tuner


CACHE_DIR = "_tki_cache"
"""Under ``output_dir``: computed query embeddings and prior inputs. ``push_to_hub`` skips ``_*`` paths."""


def _paper_lora_config() -> LoraConfig:
    """The paper's LoRA (rank 8 on all linear layers) for ``lta=False`` without a ``peft_config``."""
    return LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")


_sentence_encoder = functools.lru_cache(maxsize=1)(load_query_encoder)
"""The query encoder, loaded once for the key dimension and for every dataset the trainer encodes."""


class TKITrainer(SFTTrainer):
    """A drop-in `SFTTrainer` for Task Knowledge Injection.

    Datasets are SFTTrainer's (prompt/completion, messages or text) plus an ``id`` column; a missing
    ``query_embedding`` column is computed with ``args.query_encoder`` and a missing ``group_id`` is a seeded hash
    of the id. With ``kr`` the rows must be prompt/completion with completion-only loss; missing prior inputs are
    computed at construction (``prior_inputs_mode="store"``) or per batch (``"on_the_fly"``). Everything that
    can be checked is checked before the expensive work starts.
    """

    _tag_names = ["trl", "sft", "tki"]

    def __init__(
        self,
        model: str | PreTrainedModel | PeftModel,
        args: TKIConfig | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: Any = None,
        peft_config: PeftConfig | None = None,
        **kwargs: Any,
    ) -> None:
        args = args or TKIConfig(output_dir="tki-output")
        if not isinstance(args, TKIConfig):
            raise ValueError(f"TKITrainer needs a TKIConfig, got {type(args).__name__}: swap SFTConfig for TKIConfig.")
        datasets = {"train": train_dataset} if train_dataset is not None else {}
        if isinstance(eval_dataset, dict):
            datasets.update({f"eval_{name}": dataset for name, dataset in eval_dataset.items()})
        elif eval_dataset is not None:
            datasets["eval"] = eval_dataset
        self._check_arguments(model, args, peft_config, datasets)

        self._cache_dir = Path(args.output_dir) / CACHE_DIR
        if args.lta:
            peft_config = self._latent_config(model, args, peft_config, datasets)
            latent = peft_config or find_tuner(model).peft_config[find_tuner(model).active_adapters[0]]
            datasets = {name: self._with_routing_columns(dataset, args, latent) for name, dataset in datasets.items()}
        elif peft_config is None and not isinstance(model, PeftModel):
            peft_config = _paper_lora_config()

        eval_datasets = {name.removeprefix("eval_"): d for name, d in datasets.items() if name.startswith("eval")}
        if list(eval_datasets) == ["eval"]:
            eval_datasets = eval_datasets["eval"]
        super().__init__(
            model=model,
            args=args,
            train_dataset=datasets.get("train"),
            eval_dataset=eval_datasets or None,
            processing_class=processing_class,
            peft_config=peft_config,
            **kwargs,
        )
        self._store = self._prior_input_store() if args.kr and args.prior_inputs_mode == "store" else None
        self.data_collator = TKICollator(
            base=self.data_collator,
            query_column=args.query_embedding_column if args.lta else None,
            group_column=args.group_id_column if args.lta else None,
            id_column=args.id_column,
            store=self._store,
        )
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self._pcgrad = PCGradAccumulator(trainable) if args.kr and args.pcgrad else None
        self._capture = SubsetGradients(self.model, trainable) if self._pcgrad is not None else None
        if args.lta and self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            if optimizer_cls is not torch.optim.AdamW:
                raise ValueError(
                    f"lta=True trains the latent bank with row-sparse gradients, which optim={args.optim!r} does not take: "
                    "use optim='adamw_torch' (the bank then gets lazy AdamW updates) or pass an optimizer that accepts "
                    "sparse gradients through `optimizers=`."
                )
            self.optimizer_cls_and_kwargs = (LazyAdamW, optimizer_kwargs)

    # Construction -------------------------------------------------------------------------------------------------

    @staticmethod
    def _check_arguments(model: Any, args: TKIConfig, peft_config: PeftConfig | None, datasets: dict[str, Dataset]) -> None:
        """Every refusal that needs no model work, with the fix in the message."""
        if args.lta and isinstance(peft_config, PeftConfig) and not isinstance(peft_config, LatentLoraConfig):
            raise ValueError(
                f"lta=True needs the TKI tuner but peft_config is a {type(peft_config).__name__}: pass a "
                "tki_trainer.LatentLoraConfig (or None for the paper's), or set lta=False to train the plain adapter."
            )
        if not args.lta and isinstance(peft_config, LatentLoraConfig):
            raise ValueError("lta=False with a LatentLoraConfig leaves its bank without routing: pass a peft.LoraConfig.")
        if args.lta and isinstance(model, PeftModel) and not any(isinstance(m, TKIModel) for m in model.modules()):
            raise ValueError("lta=True needs a model holding the TKI tuner; this PeftModel holds another adapter type.")
        if (args.lta or args.kr) and (args.packing or args.padding_free):
            raise ValueError(
                "packing / padding_free merge examples into one row, but TKI routes and reinstates per example: "
                "set packing=False and padding_free=False."
            )
        if args.kr and args.pcgrad and (args.deepspeed or args.fsdp):
            raise ValueError(
                "PCGrad needs each objective's full gradient, which DeepSpeed and FSDP shard and reduce themselves: "
                "set pcgrad=False (LTA and KR still work) or train with DDP."
            )
        if args.push_to_hub and args.hub_strategy != "end":
            raise ValueError(
                f"hub_strategy={args.hub_strategy!r} pushes during training, which uploads the Trainer's pickled state "
                "(training_args.bin, checkpoints): TKITrainer pushes once, with hub_strategy='end'."
            )
        if args.kr and args.completion_only_loss is False:
            raise ValueError("Knowledge reinstatement acts on the completion span only: set completion_only_loss=True (or leave it unset).")
        if args.kr and args.prior_inputs_dir is not None and not Path(args.prior_inputs_dir, "store.json").is_file():
            raise ValueError(f"prior_inputs_dir={args.prior_inputs_dir} holds no prior-input store (no store.json).")
        for name, dataset in datasets.items():
            columns = set(dataset.column_names)
            if (args.lta or args.kr) and args.id_column not in columns:
                raise ValueError(
                    f"The {name} dataset needs a '{args.id_column}' column of stable, unique ids (TKI keys groups and "
                    "prior inputs by it); the loaders in tki_trainer.data add one."
                )
            if args.lta and args.query_embedding_column not in columns and not columns & {"prompt", "messages", "text"}:
                raise ValueError(
                    f"The {name} dataset has no '{args.query_embedding_column}' column and no 'prompt', 'messages' or "
                    "'text' column to encode one from: add query embeddings with tki_trainer.add_query_embeddings."
                )
            if args.kr and name == "train":
                check_prompt_completion_rows(dataset.rename_column(args.id_column, "id") if args.id_column != "id" else dataset)

    def _latent_config(
        self, model: Any, args: TKIConfig, peft_config: LatentLoraConfig | None, datasets: dict[str, Dataset]
    ) -> LatentLoraConfig | None:
        """The TKI config to build (None when the model already holds the tuner); the paper's when none is given,
        with ``key_dim`` taken from the query embeddings (given, or of ``query_encoder``)."""
        if isinstance(model, PeftModel):
            return None
        given = [d for d in datasets.values() if args.query_embedding_column in d.column_names]
        if peft_config is None:
            key_dim = len(given[0][0][args.query_embedding_column]) if given else _sentence_encoder(args.query_encoder).get_embedding_dimension()
            peft_config = LatentLoraConfig(key_dim=key_dim, encoder_name=None if given else args.query_encoder)
        for dataset in given:
            dim = len(dataset[0][args.query_embedding_column])
            if dim != peft_config.key_dim:
                raise ValueError(
                    f"The '{args.query_embedding_column}' column holds {dim}-dimensional embeddings but the adapter has "
                    f"key_dim={peft_config.key_dim}: build the LatentLoraConfig with key_dim={dim}, or re-encode."
                )
        return peft_config

    def _with_routing_columns(self, dataset: Dataset, args: TKIConfig, config: LatentLoraConfig) -> Dataset:
        """Add what routing needs: query embeddings (computed when absent, cached) and group ids (hashed when absent)."""
        if args.query_embedding_column not in dataset.column_names:
            dataset = add_query_embeddings(
                dataset,
                _sentence_encoder(args.query_encoder),
                column=args.query_embedding_column,
                cache_dir=self._cache_dir / "queries",
                key_dim=config.key_dim,
            )
        if args.group_id_column not in dataset.column_names:
            groups = [hashed_group(str(i), config.num_groups, config.seed) for i in dataset[args.id_column]]
            dataset = dataset.add_column(args.group_id_column, groups)
        return dataset

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        tki_columns = [self.args.query_embedding_column, self.args.group_id_column, self.args.id_column]
        self._signature_columns = [*self._signature_columns, *(c for c in tki_columns if c not in self._signature_columns)]

    def _prior_input_store(self) -> PriorInputStore:
        """The store of prior inputs, computed now if none was given; checked against this model, tokenizer and
        the prompt spans of the trainer's own tokenization."""
        args = self.args
        hashes = {}
        for row in self.train_dataset:
            prompt_length = next(i for i, label in enumerate(row["labels"]) if label != -100)
            hashes[row[args.id_column]] = prompt_hash(row["input_ids"][:prompt_length])
        model = self.accelerator.unwrap_model(self.model)
        if args.prior_inputs_dir is not None:
            store = PriorInputStore(args.prior_inputs_dir)
        else:
            with _adapters_disabled(model):
                store = compute_prior_inputs(
                    model,
                    self.processing_class,
                    self._raw_train_rows(),
                    self._cache_dir / "prior_inputs",
                    config=args.prior_input_config,
                    max_length=args.max_length,
                )
        store.check(model, self.processing_class, hashes)
        return store

    def _raw_train_rows(self) -> Dataset:
        columns = [self.args.id_column, "prompt", "completion"]
        rows = self.train_dataset.select_columns(columns)
        return rows.rename_column(self.args.id_column, "id") if self.args.id_column != "id" else rows

    # Training ------------------------------------------------------------------------------------------------------

    def _routing(self, model: torch.nn.Module, inputs: dict[str, Any]):
        if QUERY_EMBEDDINGS not in inputs:
            return contextlib.nullcontext()
        return route(model, inputs.pop(QUERY_EMBEDDINGS), inputs.pop(GROUP_IDS))

    def _objectives(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any, capture: SubsetGradients | None = None
    ) -> tuple[Objectives, Any]:
        """Both forwards of a micro-batch (real prompt, recorded by ``capture`` if given; then prior input) and
        their per-example terms."""
        deltas = inputs.pop(PRIOR_DELTAS, None)
        inputs["use_cache"] = False
        with capture.recording() if capture is not None else contextlib.nullcontext():
            outputs = model(**inputs, fused_lm_head=True)
        ce_x = summed_cross_entropy(outputs)
        divisor = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        divisor = torch.as_tensor(divisor, device=ce_x.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            divisor = divisor / self.accelerator.num_processes
        embeddings = self.accelerator.unwrap_model(model).get_input_embeddings()(inputs["input_ids"])
        if deltas is None:
            deltas = self._on_the_fly_deltas(model, inputs)
        shifted = embeddings + torch.nn.functional.pad(deltas.to(embeddings.dtype), (0, 0, 0, embeddings.shape[1] - deltas.shape[1]))
        prior = {key: value for key, value in inputs.items() if key != "input_ids"}
        ce_q = summed_cross_entropy(model(**prior, inputs_embeds=shifted, fused_lm_head=True))
        return Objectives(ce_x, ce_q, divisor), outputs

    def _on_the_fly_deltas(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Stage 1 on this batch, with the base model (adapters off), as ``q - e``."""
        labels = inputs["labels"]
        prompt_lengths = (labels != -100).int().argmax(dim=1)
        unwrapped = self.accelerator.unwrap_model(model)
        with _adapters_disabled(unwrapped), torch.enable_grad():
            result = optimize_prior_inputs(
                unwrapped, inputs["input_ids"], inputs["attention_mask"], labels, prompt_lengths, self.args.prior_input_config
            )
        return (result.embeddings - result.initial).detach()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """SFTTrainer's loss under routing; in training with ``kr`` (and without PCGrad) ``L_sft + alpha L_reinst``."""
        mode = "train" if self.model.training else "eval"
        with self._routing(model, inputs):
            self._observe_routing(model, mode)
            if not (self.args.kr and mode == "train"):
                inputs.pop(PRIOR_DELTAS, None)
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            objectives, outputs = self._objectives(model, inputs, num_items_in_batch)
            self._log_objectives(objectives, num_items_in_batch)
            loss = objectives.sft + self.args.reinstatement_alpha * objectives.reinstatement
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Route the micro-batch for its forward and backward passes (activation checkpointing recomputes layers
        during backward), and with PCGrad accumulate each objective's gradient separately.

        PCGrad backward passes: one when the real prompt is the harder input of every example (the reinstatement
        gradient is then ``alpha`` times the SFT one), two otherwise: one through each graph, the floor. In a
        mixed micro-batch the real-prompt backward also yields the reinstatement share of the examples where
        the prompt is harder (`SubsetGradients`); where that capture cannot cover every trainable parameter, a
        mixed micro-batch takes a third backward.
        """
        with self._routing(model, inputs):
            if self._pcgrad is None:
                return super().training_step(model, inputs, num_items_in_batch)
            return self._pcgrad_step(model, inputs, num_items_in_batch)

    def _pcgrad_step(self, model, inputs, num_items_in_batch):
        model.train()
        inputs = self._prepare_inputs(inputs)
        alpha = self.args.reinstatement_alpha
        capture = self._capture if self._capture.supported and inputs["input_ids"].shape[0] > 1 else None
        with self.compute_loss_context_manager(), self.accelerator.no_sync(model):
            self._observe_routing(model, "train")
            objectives, _ = self._objectives(model, inputs, num_items_in_batch, capture)
            self._log_objectives(objectives, num_items_in_batch)
            q_wins = objectives.q_wins
            mixed = bool(q_wins.any()) and not bool(q_wins.all())
            split = mixed and capture is not None and capture.complete
            # Mixed without the capture: the reinstatement backward also runs through the real-prompt graph.
            third = mixed and not split
            self._metrics["train"]["pcgrad_backward_passes"].append(1 + int(bool(q_wins.any())) + int(third))
            if not q_wins.any():
                objectives.ce_q = objectives.ce_q.detach()
            if split:
                capture.weights = (~q_wins).float()
            self.accelerator.backward(objectives.sft, retain_graph=third)
            g1 = self._pcgrad.take_gradients()
            self._pcgrad.add(0, g1)
            if not q_wins.any():
                self._pcgrad.add(1, g1, scale=alpha)
            else:
                if split:
                    self._pcgrad.add(1, capture.take(), scale=alpha)
                through = objectives.reinstatement if third else objectives.reinstatement_through_q
                self.accelerator.backward(alpha * through)
                self._pcgrad.add(1, self._pcgrad.take_gradients())
        if self.accelerator.sync_gradients:
            projection = self._pcgrad.apply()
            self._metrics["train"]["pcgrad_conflict_rate"].append(float(projection.conflict))
            self._metrics["train"]["pcgrad_cosine"].append(projection.cosine)
        return (objectives.sft + alpha * objectives.reinstatement).detach()

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

    # Sharing -------------------------------------------------------------------------------------------------------

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags: Any = None, **kwargs: Any) -> None:
        """With ``lta``, the TKI card (`model_card_template.md`): base model, TKI settings, data, the run's last
        evaluation, usage for both loading paths. Without, SFTTrainer's card."""
        if not self.args.lta:
            return super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return None
        config = find_tuner(self.model).peft_config[self._adapter]
        args = self.args
        source = f" of `{dataset_name}`" if dataset_name else ""
        rows = len(self.train_dataset) if self.train_dataset is not None else 0
        switches = ", ".join(f"{name}={getattr(args, name)}" for name in ("lta", "kr", "pcgrad"))
        training_data = (
            f"{rows} rows{source}, at most {args.max_length} tokens, {args.num_train_epochs:g} epoch(s), learning rate "
            f"{args.learning_rate:g}, effective batch {args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size}; "
            f"{switches}, reinstatement alpha {args.reinstatement_alpha:g}."
        )
        write_model_card(args.output_dir, render_model_card(
            config,
            repo_id=self.hub_model_id or args.hub_model_id or model_name or Path(args.output_dir).name,
            training_data=training_data,
            evaluation=_evaluation_table(self.state.log_history),
        ))
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
        """Upload ``output_dir`` as the Trainer does, in one commit through `tki_trainer.hub.push_adapter`: the adapter,
        tokenizer files and the TKI model card; never ``_*`` caches, checkpoints or pickled files
        (``training_args.bin``). ``prior_inputs=True`` adds the prior-input store under ``prior_inputs/``;
        ``plain_lora_query`` adds `export_lora`'s plain LoRA for that query under ``plain_lora/``. The upload is
        always blocking."""
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(**kwargs)
        repo_id = self.hub_model_id or self.args.hub_model_id or Path(self.args.output_dir).name
        plain_lora = None
        if plain_lora_query is not None:
            plain_lora = self._cache_dir / "plain_lora"
            export_lora(self.accelerator.unwrap_model(self.model), plain_lora_query, plain_lora)
        store = self._store.path if prior_inputs and self._store is not None else None
        if prior_inputs and store is None:
            raise ValueError("prior_inputs=True needs a prior-input store, which this trainer (kr=False or on_the_fly) has not.")
        return push_adapter(
            self.args.output_dir,
            repo_id,
            token=token,
            revision=revision if revision is not None else self.args.hub_revision,
            private=private if private is not None else self.args.hub_private_repo,
            commit_message=commit_message or "End of training",
            prior_inputs=store,
            plain_lora=plain_lora,
        )

    # Metrics -------------------------------------------------------------------------------------------------------

    def _log_objectives(self, objectives: Objectives, num_items_in_batch: Any) -> None:
        """Log the objectives on the scale of the Trainer's ``loss``: a micro-batch's share times the number of
        micro-batches, so that the average over a step is the effective batch's value."""
        gather = self.accelerator.gather_for_metrics
        share = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        share = share if num_items_in_batch is not None else 1
        self._metrics["train"]["loss_sft"].append(gather(objectives.sft.detach()).mean().item() * share)
        self._metrics["train"]["loss_reinst"].append(gather(objectives.reinstatement.detach()).mean().item() * share)
        self._metrics["train"]["reinst_q_win_rate"].append(gather(objectives.q_wins.float()).mean().item())

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


def _evaluation_table(log_history: list[dict[str, Any]]) -> str:
    """The last evaluation the run logged, as a Markdown table (the card's "Evaluation" section)."""
    last = next((entry for entry in reversed(log_history) if any(key.startswith("eval_") for key in entry)), None)
    if last is None:
        return "No evaluation was run during training."
    rows = [f"| {key.removeprefix('eval_')} | {value:.4g} |" for key, value in last.items() if key.startswith("eval_") and isinstance(value, (int, float))]
    return f"At step {last.get('step', '?')}:\n\n| metric | value |\n|---|---|\n" + "\n".join(rows)


@contextlib.contextmanager
def _adapters_disabled(model: torch.nn.Module):
    """The base model's behaviour for stage 1 (prior inputs belong to the model before fine-tuning)."""
    if isinstance(model, PeftModel):
        with model.disable_adapter():
            yield
    else:
        yield
