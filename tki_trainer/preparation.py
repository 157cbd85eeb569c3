"""Dataset preparation for TKI, shared by the trainer, ``tki-prepare``, the recipe and the benchmarks.

What TKI adds to SFTTrainer's rows, each computed only when the rows lack it: an id per row (a hash of its
content), prompt/completion rows for knowledge reinstatement (``messages`` split at the last assistant turn),
the routing columns (query embeddings, group ids) and the prior-input store of KR stage 1.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from datasets import Dataset
from peft import LoraConfig, PeftConfig, PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from .data.formats import CONTENT_COLUMNS, messages_to_prompt_completion, with_ids
from .data.queries import add_query_embeddings
from .embedded import load_query_encoder
from .presets import shared_lora_config
from .reinstatement import PriorInputConfig, PriorInputStore, compute_prior_inputs
from .reinstatement.fingerprint import prompt_hash
from .retrieval import hashed_group
from .tuner import LatentLoraConfig, TKIModel


logger = logging.getLogger(__name__)


__all__ = [
    "adapter_config",
    "as_prompt_completion",
    "prior_input_store",
    "prompt_hashes",
    "query_encoder",
    "routing_columns",
    "with_ids",
    "with_routing_columns",
]

query_encoder = functools.lru_cache(maxsize=1)(load_query_encoder)
"""A query encoder by name (``"embedded"`` or a sentence-transformers name), loaded once per process."""


def as_prompt_completion(dataset: Dataset, name: str = "train", id_column: str = "id") -> Dataset:
    """Rows knowledge reinstatement can use: prompt/completion rows as they are, ``messages`` rows split at their
    last assistant turn (the same tokens under the chat template, with the loss on that turn). Language-modelling
    rows, which have no prompt to reinstate, are refused."""
    columns = set(dataset.column_names)
    if "messages" in columns and "prompt" not in columns:
        dataset = dataset.map(messages_to_prompt_completion, remove_columns="messages", desc="Splitting messages")
    elif not {"prompt", "completion"} <= columns:
        kind = "language-modelling ('text')" if "text" in columns else f"{sorted(columns)}"
        raise ValueError(
            f"Knowledge reinstatement needs a prompt to reinstate, but the {name} rows are {kind} rows: give "
            "prompt/completion or messages rows, or set kr=False."
        )
    for example_id, prompt, completion in zip(*(dataset[c] for c in (id_column, "prompt", "completion"))):
        for part, value in (("prompt", prompt), ("completion", completion)):
            text = value if isinstance(value, str) else "".join(m["content"] for m in value)
            if not text.strip():
                raise ValueError(
                    f"Row {example_id!r} of the {name} dataset has an empty {part}: drop it (knowledge reinstatement "
                    "needs a prompt to optimise and a target to reach), or set kr=False."
                )
    return dataset


def adapter_config(model: Any, args: Any, peft_config: PeftConfig | None, datasets: list[Any]) -> PeftConfig | None:
    """The adapter the trainer builds (None: ``model`` already holds one). With ``lta`` a TKI adapter: the given
    one, one built from a `LoraConfig` (logged), or the paper's, its ``key_dim`` from the query embeddings the
    ``datasets`` hold or from the encoder; without, the given LoRA or the paper's."""
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
                "leave peft_config unset for the paper's LoRA."
            )
        return peft_config or shared_lora_config()
    if peft_config is not None and not isinstance(peft_config, (LatentLoraConfig, LoraConfig)):
        raise ValueError(
            f"lta=True builds the TKI adapter from a LoraConfig or a LatentLoraConfig, not a "
            f"{type(peft_config).__name__}: pass one of those, or set lta=False."
        )
    if isinstance(peft_config, LatentLoraConfig):
        return peft_config
    datasets = [d for ds in datasets for d in (ds.values() if isinstance(ds, dict) else [ds]) if d is not None]
    given = [d for d in datasets if args.query_embedding_column in d.column_names]
    if given:
        key_dim, encoder = len(given[0][0][args.query_embedding_column]), None
    else:
        key_dim, encoder = query_encoder(args.query_encoder).get_embedding_dimension(), args.query_encoder
    bank = dict(key_dim=key_dim, encoder_name=encoder, encoder_dim=key_dim if encoder else None)
    built = LatentLoraConfig.from_lora_config(peft_config or shared_lora_config(), **bank)
    logger.info(
        "lta=True: training a TKI adapter with the shared LoRA (r=%d, alpha=%g, on %s) and a bank of C=%d x Q=%d "
        "latent tasks (k=%d, rank %d on %s), key_dim %d",
        built.r, built.lora_alpha, built.target_modules, built.num_groups, built.keys_per_group, built.top_k,
        built.latent_r, sorted(built.latent_target_modules), built.key_dim,
    )  # fmt: skip
    return built


def with_routing_columns(
    dataset: Dataset,
    config: LatentLoraConfig,
    *,
    encoder: str,
    query_column: str = "query_embedding",
    group_column: str = "group_id",
    id_column: str = "id",
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Add what routing needs: query embeddings of the prompts (encoded with ``encoder`` when absent, cached) and
    group ids (a seeded hash of the id when absent). Given embeddings are checked against ``config.key_dim``."""
    if query_column in dataset.column_names:
        dim = len(dataset[0][query_column])
        if dim != config.key_dim:
            raise ValueError(
                f"The '{query_column}' column holds {dim}-dimensional embeddings but the adapter has "
                f"key_dim={config.key_dim}: build the adapter with key_dim={dim}, or re-encode the prompts."
            )
    elif not set(CONTENT_COLUMNS) & set(dataset.column_names) - {"completion"}:
        raise ValueError(
            f"The dataset has no '{query_column}' column and no 'prompt', 'messages' or 'text' column to encode one "
            "from: add query embeddings with tki_trainer.add_query_embeddings."
        )
    else:
        dataset = add_query_embeddings(
            dataset, query_encoder(encoder), column=query_column, cache_dir=cache_dir, key_dim=config.key_dim
        )
    if group_column not in dataset.column_names:
        groups = [hashed_group(str(i), config.num_groups, config.seed) for i in dataset[id_column]]
        dataset = dataset.add_column(group_column, groups)
    return dataset


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
) -> PriorInputStore:
    """The prior inputs of ``rows``: read from ``store_dir``, or computed into ``compute_dir`` (resumably) when
    ``store_dir`` is None; then checked against this model, tokenizer, stage-1 settings and the prompt spans of
    ``tokenized`` (the trainer's own tokenisation of the same rows)."""
    if store_dir is not None:
        store = PriorInputStore(store_dir)
    else:
        rows = rows.select_columns([id_column, "prompt", "completion"])
        if id_column != "id":
            rows = rows.rename_column(id_column, "id")
        store = compute_prior_inputs(model, tokenizer, rows, compute_dir, config=config, max_length=max_length)
    store.check(model, tokenizer, prompt_hashes(tokenized, id_column), settings=config)
    return store


def routing_columns(args: Any) -> list[str]:
    """The columns TKI reads from a prepared dataset, to keep through ``remove_unused_columns``."""
    return [args.query_embedding_column, args.group_id_column, args.id_column]
