"""Dataset preparation for TKI, shared by the trainer, ``tki-prepare``, the recipe and the benchmarks.

What TKI adds to SFTTrainer's rows, each computed only when the rows lack it: an id per row (a hash of its
content), prompt/completion rows for knowledge reinstatement (``messages`` split at the last assistant turn),
the routing columns (query embeddings, group ids) and the prior-input store of KR stage 1.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, IterableDataset
from peft import LoraConfig, PeftConfig, PeftModel
from torch import nn
from transformers import AutoConfig, AutoProcessor, PreTrainedTokenizerBase
from trl.data_utils import get_dataset_column_names, maybe_convert_to_chatml
from trl.trainer.utils import get_config_model_id

from .data.formats import check_text_ids, messages_to_prompt_completion, turns_text, with_ids
from .data.queries import add_query_embeddings, row_query_text
from .data.tokenization import TEMPLATE_COLUMNS
from .embedded import load_query_encoder, query_encoder_name
from .reinstatement import PriorInputConfig, PriorInputStore, compute_prior_inputs
from .reinstatement.fingerprint import prompt_hash
from .retrieval import hashed_group
from .tuner import LatentLoraConfig, TKIModel
from .tuner.model import find_tuner


logger = logging.getLogger(__name__)


__all__ = [
    "adapter_config",
    "as_prompt_completion",
    "prepare_rows",
    "prior_input_store",
    "prompt_hashes",
    "query_encoder",
    "query_text_of",
    "reinstatement_obstacle",
    "resolve_kr",
    "routing_columns",
    "with_ids",
    "with_routing_columns",
]

CACHE_DIR = "_tki_cache"
"""Under ``output_dir``: computed query embeddings, prior inputs and flashback continuations. ``push_to_hub``
skips ``_*`` paths."""


def cache_dir(args: Any) -> Path:
    """Where a run keeps what it computed (`CACHE_DIR` under ``args.output_dir``)."""
    return Path(args.output_dir) / CACHE_DIR


query_encoder = functools.lru_cache(maxsize=1)(load_query_encoder)
"""A query encoder by name (``"embedded"`` or a sentence-transformers name), loaded once per process."""


def rows_without_prompt(columns: list[str], name: str = "train") -> str | None:
    """Why rows with these columns give knowledge reinstatement no prompt to reinstate (a refusal naming the fix),
    or None for prompt/completion, ``messages`` and ``conversations`` rows."""
    if "input_ids" in columns:
        kind = "pretokenized ('input_ids')"
    elif {"prompt", "completion"} <= set(columns) or {"messages", "conversations"} & set(columns):
        return None
    else:
        kind = "language-modelling ('text')" if "text" in columns else f"{sorted(columns)}"
    return (
        f"Knowledge reinstatement needs a prompt to reinstate, but the {name} rows are {kind} rows: give "
        "prompt/completion or messages rows, or set kr=False."
    )


def as_prompt_completion(
    dataset: Dataset | IterableDataset, name: str = "train", id_column: str = "id"
) -> Dataset | IterableDataset:
    """Rows knowledge reinstatement can use: prompt/completion rows as they are, ``messages`` (or ``conversations``)
    rows split at their last assistant turn (the same tokens under the chat template, with the loss on that turn).
    Rows without a prompt to reinstate, and rows with an empty prompt or completion, are refused. Streamed
    (evaluation) rows are split as they stream."""
    columns = get_dataset_column_names(dataset)
    refusal = rows_without_prompt(columns, name)
    if refusal is not None:
        raise ValueError(refusal)
    if "conversations" in columns:
        dataset = dataset.map(maybe_convert_to_chatml, remove_columns="conversations")
        columns = [*(c for c in columns if c != "conversations"), "messages"]
    if "messages" in columns and "prompt" not in columns:
        dataset = dataset.map(messages_to_prompt_completion, remove_columns="messages")
    if isinstance(dataset, IterableDataset):
        return dataset
    check_text_ids(dataset[id_column], id_column)
    for example_id, prompt, completion in zip(*(dataset[c] for c in (id_column, "prompt", "completion"))):
        for part, value in (("prompt", prompt), ("completion", completion)):
            if not turns_text(value).strip():
                raise ValueError(
                    f"Row {example_id!r} of the {name} dataset has an empty {part}: drop it (knowledge reinstatement "
                    "needs a prompt to optimise and a target to reach), or set kr=False."
                )
    return dataset


def resolve_kr(args: Any, rows: Dataset | IterableDataset | None, model: Any, **settings: Any) -> Any:
    """``args`` with ``kr`` decided, before anything reads it: ``kr=True`` where knowledge reinstatement cannot train
    is refused (`reinstatement_obstacle`); ``kr=None`` becomes True where it can and False (one log line) where it
    cannot, on a copy, so that the caller's arguments stay as given. ``settings``: the trainer's
    ``formatting_func`` and ``compute_loss_func``."""
    if args.kr is False:
        return args
    obstacle = reinstatement_obstacle(args, rows, model, **settings)
    if args.kr and obstacle is not None:
        raise ValueError(obstacle)
    if args.kr is None:
        if obstacle is not None:
            logger.warning("kr unset: knowledge reinstatement is off here (kr=True would be refused: %s)", obstacle)
        args = copy.copy(args)
        args.kr = obstacle is None
    return args


def reinstatement_obstacle(
    args: Any,
    rows: Dataset | IterableDataset | None,
    model: Any,
    *,
    formatting_func: Any = None,
    compute_loss_func: Any = None,
) -> str | None:
    """Why knowledge reinstatement cannot train on these rows with these settings (a refusal naming the fix), or
    None. `TKITrainer` refuses ``kr=True`` with it and resolves ``kr=None`` from it, as SFTTrainer resolves
    ``completion_only_loss=None`` from the rows. Cheap checks first; the model's config is read last."""
    conflict = args.kr_conflict()
    if conflict is not None:
        return conflict
    if compute_loss_func is not None:
        return (
            "compute_loss_func replaces SFTTrainer's token loss, which knowledge reinstatement compares per "
            "example: subclass TKITrainer instead, use loss_type='dft', or set kr=False."
        )
    if rows is None:
        return None  # SFTTrainer refuses a missing train_dataset
    if isinstance(rows, IterableDataset):
        return (
            "Knowledge reinstatement prepares every training row (its prompt span, id and prior input) before "
            "training, which a streaming IterableDataset does not allow: pass a Dataset (load_dataset without "
            "streaming=True), or set kr=False."
        )
    if formatting_func is not None or (args.dataset_kwargs or {}).get("skip_prepare_dataset"):
        how = "formatting_func" if formatting_func is not None else "dataset_kwargs={'skip_prepare_dataset': True}"
        return (
            f"Knowledge reinstatement needs a prompt to reinstate, but with {how} SFTTrainer trains on the rows as "
            "language-modelling text: give prompt/completion or messages rows without it, or set kr=False."
        )
    refusal = rows_without_prompt(rows.column_names)
    if refusal is not None:
        return refusal
    if aux_loss_enabled(model, args):
        return (
            "The MoE auxiliary loss is a batch-level term that knowledge reinstatement cannot compare per example: "
            "set router_aux_loss_coef=0.0, or kr=False."
        )
    return None


def aux_loss_enabled(model: Any, args: Any) -> bool:
    """Whether SFTTrainer will add the MoE load-balancing loss (its own rule), read from the model's config before
    the model is loaded."""
    if isinstance(model, str):
        revision = (args.model_init_kwargs or {}).get("revision")
        config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=args.trust_remote_code)
    else:
        config = model.config
    text_config = config.get_text_config()
    coef = args.router_aux_loss_coef
    coef = getattr(text_config, "router_aux_loss_coef", 0.0) if coef is None else coef
    return hasattr(text_config, "output_router_logits") and coef != 0.0


def default_processing_class(model: Any, args: Any) -> Any:
    """The processing class SFTTrainer loads when none is given (the same call)."""
    if isinstance(model, str):
        model_id, revision = model, (args.model_init_kwargs or {}).get("revision")
    else:
        model_id, revision = get_config_model_id(model.config), None
    return AutoProcessor.from_pretrained(model_id, revision=revision, trust_remote_code=args.trust_remote_code)


def query_text_of(args: Any, processing_class: Any, formatting_func: Any = None) -> Callable[[dict[str, Any]], str]:
    """The text each row's query is encoded from, as SFTTrainer has the model read the row: ``formatting_func``'s
    text when one is given (SFTTrainer ignores it for pretokenized rows), else `row_query_text` with the config's
    ``dataset_text_field`` and the tokenizer (which decodes pretokenized rows). Rows without a prompt/completion
    split (a ``formatting_func``'s text, ``text``, pretokenized ids) are encoded whole, answer included: at
    inference such a model should be queried with the same kind of text."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)

    def text_of(row: dict[str, Any]) -> str:
        if formatting_func is not None and "input_ids" not in row:
            return formatting_func(row)
        return row_query_text(row, args.dataset_text_field, tokenizer)

    return text_of


def adapter_config(
    model: Any, args: Any, peft_config: PeftConfig | None, datasets: list[Any], **bank: Any
) -> PeftConfig | None:
    """The adapter the trainer builds (None: ``model`` already holds one, or no adapter: every parameter trains, as
    in SFTTrainer). With ``lta`` a TKI adapter: the given one, or one built from a `LoraConfig` (logged) with the
    ``bank`` fields of `LatentLoraConfig` given here, its ``key_dim`` from the query embeddings the ``datasets`` hold
    or from the encoder; without, the given config."""
    if isinstance(model, PeftModel):
        if args.lta and not any(isinstance(m, TKIModel) for m in model.modules()):
            raise ValueError(
                "lta=True needs a model holding the TKI tuner; this PeftModel holds another adapter type: pass "
                "the base model with a peft_config, or set lta=False."
            )
        return None
    if not args.lta:
        if isinstance(peft_config, LatentLoraConfig):
            raise ValueError(
                "lta=False with a LatentLoraConfig leaves its bank without routing: pass a peft.LoraConfig, or "
                "leave peft_config unset to train every parameter as SFTTrainer does."
            )
        return peft_config
    if peft_config is None:
        raise ValueError(
            "lta=True builds the TKI adapter from a LoraConfig or a LatentLoraConfig, and no peft_config was given: "
            "pass peft_config=LatentLoraConfig(...) or a peft.LoraConfig (the TKI adapter is built from it), or set "
            "lta=False to train every parameter as SFTTrainer does (a PEFT adapter directory cannot carry "
            "full-parameter updates)."
        )
    if not isinstance(peft_config, (LatentLoraConfig, LoraConfig)):
        raise ValueError(
            f"lta=True builds the TKI adapter from a LoraConfig or a LatentLoraConfig, not a "
            f"{type(peft_config).__name__}: pass one of those, or set lta=False."
        )
    if isinstance(peft_config, LatentLoraConfig):
        return peft_config
    datasets = [d for ds in datasets for d in (ds.values() if isinstance(ds, dict) else [ds]) if d is not None]
    given = [d for d in datasets if args.query_embedding_column in get_dataset_column_names(d)]
    if given:
        key_dim, encoder = len(next(iter(given[0]))[args.query_embedding_column]), None
    else:
        key_dim = query_encoder(args.query_encoder).get_embedding_dimension()
        encoder = query_encoder_name(args.query_encoder)
    bank.update(key_dim=key_dim, encoder_name=encoder, encoder_dim=key_dim if encoder else None)
    built = LatentLoraConfig.from_lora_config(peft_config, **bank)
    logger.info(
        "lta=True: training a TKI adapter with the shared LoRA (r=%d, alpha=%g, on %s) and a bank of C=%d x Q=%d "
        "latent tasks (k=%d, rank %d on %s), key_dim %d",
        built.r, built.lora_alpha, built.target_modules, built.num_groups, built.keys_per_group, built.top_k,
        built.latent_r, sorted(built.latent_target_modules), built.key_dim,
    )  # fmt: skip
    return built


def with_routing_columns(
    dataset: Dataset | IterableDataset,
    config: LatentLoraConfig,
    *,
    encoder: str,
    query_column: str = "query_embedding",
    group_column: str = "group_id",
    id_column: str = "id",
    cache_dir: str | os.PathLike | None = None,
    text_of: Callable[[dict[str, Any]], str] = row_query_text,
) -> Dataset | IterableDataset:
    """Add what routing needs: query embeddings of the text each row's model reads before its answer (``text_of``;
    encoded with ``encoder`` when absent, cached) and group ids (a seeded hash of the id when absent). Given
    embeddings are checked against ``config.key_dim``. Streamed rows get both as they stream."""
    columns = get_dataset_column_names(dataset)
    if group_column in columns:
        check_group_column(dataset, group_column, config.num_groups)
    if query_column in columns:
        check_query_column(dataset, query_column, config.key_dim)
    else:
        text_of(next(iter(dataset)))  # a row with no text to encode is refused before the encoder loads
        dataset = add_query_embeddings(
            dataset,
            query_encoder(encoder),
            column=query_column,
            cache_dir=cache_dir,
            key_dim=config.key_dim,
            text_of=text_of,
        )
    if group_column in columns:
        return dataset
    if isinstance(dataset, IterableDataset):
        return dataset.map(
            lambda row: {group_column: hashed_group(str(row[id_column]), config.num_groups, config.seed)}
        )
    groups = [hashed_group(str(i), config.num_groups, config.seed) for i in dataset[id_column]]
    return dataset.add_column(group_column, groups)


def prepare_rows(
    dataset: Dataset | IterableDataset | None,
    args: Any,
    *,
    model: Any = None,
    peft_config: PeftConfig | None = None,
    name: str = "train",
    text_of: Callable[[dict[str, Any]], str] = row_query_text,
) -> Dataset | IterableDataset | None:
    """What `TKITrainer` adds to rows named ``name`` (``"train"``, ``"eval"``, ...) under ``args``: ids,
    prompt/completion rows for KR (training rows only need them; evaluation rows in a conversation are split as
    training rows are), and with ``lta`` the routing columns for ``peft_config`` (else the adapter of ``model``).
    Rows are unchanged with ``lta`` and ``kr`` off. The recipe, ``tki-prepare`` and the benchmarks call this to
    prepare rows as the trainer will."""
    if dataset is None or not (args.lta or args.kr):
        return dataset
    check_rows(dataset, name)
    dataset = with_ids(dataset, args.id_column, (args.query_embedding_column, args.group_id_column))
    conversation = {"messages", "conversations"} & set(get_dataset_column_names(dataset))
    if args.kr and (name == "train" or conversation):
        dataset = as_prompt_completion(dataset, name, args.id_column)
    if not args.lta:
        return dataset
    if peft_config is None:
        tuner = find_tuner(model)
        peft_config = tuner.peft_config[tuner.active_adapters[0]]
    return with_routing_columns(
        dataset,
        peft_config,
        encoder=args.query_encoder,
        query_column=args.query_embedding_column,
        group_column=args.group_id_column,
        id_column=args.id_column,
        cache_dir=cache_dir(args) / "queries",
        text_of=text_of,
    )


def check_query_column(dataset: Dataset | IterableDataset, column: str, key_dim: int) -> None:
    """Refuse given query embeddings that routing would fail on or be poisoned by (another dimension on any row,
    NaN or inf), before stage 1 and the first step. Streamed rows: the first here, every batch at routing."""
    queries = [next(iter(dataset))[column]] if isinstance(dataset, IterableDataset) else dataset[column]
    dims = sorted({len(query) for query in queries})
    if dims != [key_dim]:
        raise ValueError(
            f"The '{column}' column holds {'/'.join(map(str, dims))}-dimensional embeddings but the adapter has "
            f"key_dim={key_dim}: build the adapter with key_dim matching your encoder, or re-encode the prompts "
            "(tki_trainer.add_query_embeddings)."
        )
    bad = np.flatnonzero(~np.isfinite(np.asarray(queries, dtype=np.float32)).all(axis=1))
    if bad.size:
        raise ValueError(
            f"Rows {bad[:5].tolist()} of the '{column}' column hold NaN or inf, which would turn the adapter NaN: "
            "re-encode their prompts (tki_trainer.add_query_embeddings) or drop them."
        )


def check_group_column(dataset: Dataset | IterableDataset, column: str, num_groups: int) -> None:
    """Refuse given group ids that are not integers in ``[0, num_groups)``, before stage 1 and the first step."""
    values = [next(iter(dataset))[column]] if isinstance(dataset, IterableDataset) else dataset[column]
    groups = np.asarray(values)
    if not np.issubdtype(groups.dtype, np.integer):
        raise ValueError(
            f"The '{column}' column holds {groups.dtype} values (e.g. {values[0]!r}); group ids are integers in "
            f"[0, {num_groups}): cast the column to int, or drop it to have ids hashed from each row's id."
        )
    if groups.size and (groups.min() < 0 or groups.max() >= num_groups):
        raise ValueError(
            f"The '{column}' column holds group ids from {groups.min()} to {groups.max()}, but the adapter has "
            f"num_groups={num_groups}: use ids in [0, {num_groups}), or build the adapter with more groups."
        )


def check_rows(dataset: Dataset | IterableDataset, name: str) -> None:
    """Refuse, before any work, a dataset TKI cannot prepare: one without rows, or one whose rows mix the
    prompt/completion and conversational formats (SFTTrainer takes one format per dataset)."""
    if isinstance(dataset, Dataset) and not len(dataset):
        raise ValueError(f"The {name} dataset has no rows: pass a dataset with at least one row.")
    columns = set(get_dataset_column_names(dataset))
    conversation = next(iter({"messages", "conversations"} & columns), None)
    if isinstance(dataset, Dataset) and conversation and "prompt" in columns:
        prompts, turns = dataset["prompt"], dataset[conversation]
        if any(p is None for p in prompts) and any(t is None for t in turns):
            raise ValueError(
                f"The {name} dataset mixes prompt/completion rows and '{conversation}' rows: SFTTrainer takes one "
                "format per dataset; convert one kind into the other first (e.g. "
                "tki_trainer.data.messages_to_prompt_completion)."
            )


def prompt_hashes(tokenized: Dataset, id_column: str = "id") -> dict[str, str]:
    """``{id: hash of the prompt tokens}`` of rows as SFTTrainer tokenised them (the prompt ends where the labels
    start)."""
    hashes = {}
    for row in tokenized.select_columns([id_column, "input_ids", "labels"]):
        prompt_length = next(i for i, label in enumerate(row["labels"]) if label != -100)
        hashes[row[id_column]] = prompt_hash(row["input_ids"][:prompt_length])
    return hashes


def prior_input_store(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: Dataset,
    tokenized: Dataset,
    *,
    config: PriorInputConfig,
    store_dir: str | os.PathLike | None,
    compute_dir: str | os.PathLike,
    max_length: int | None,
    id_column: str = "id",
    chat_template: str | None = None,
) -> PriorInputStore:
    """The prior inputs of ``rows``: read from ``store_dir``, or computed into ``compute_dir`` (resumably) when
    ``store_dir`` is None, each row under ``chat_template`` (SFTTrainer's, None: the tokenizer's) with its own
    tools and chat-template arguments; then checked against this model, tokenizer, stage-1 settings and the prompt
    spans of ``tokenized`` (the trainer's own tokenisation of the same rows)."""
    if store_dir is not None:
        store = PriorInputStore(store_dir)
    else:
        template_columns = [c for c in TEMPLATE_COLUMNS if c in rows.column_names]
        rows = rows.select_columns([id_column, "prompt", "completion", *template_columns])
        if id_column != "id":
            rows = rows.rename_column(id_column, "id")
        store = compute_prior_inputs(
            model, tokenizer, rows, compute_dir, config=config, max_length=max_length, chat_template=chat_template
        )
    store.check(model, tokenizer, prompt_hashes(tokenized, id_column), settings=config)
    return store


def routing_columns(args: Any) -> list[str]:
    """The columns TKI reads from a prepared dataset, to keep through ``remove_unused_columns``."""
    return [args.query_embedding_column, args.group_id_column, args.id_column]
