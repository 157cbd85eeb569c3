"""Fingerprints that tie stored prior inputs to the model, tokenizer and prompt tokens they were computed for.

Only architecture fields of the model config enter the fingerprint: `SFTTrainer` edits others (``use_cache``,
``pad_token_id``, ``eos_token_id``) without changing what the model computes.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase


ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "vocab_size", "num_hidden_layers")


def _sha256(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def embedding_checksum(model: nn.Module, rows_per_chunk: int = 4096) -> str:
    """SHA-256 of the input-embedding matrix as float32, hashed in row chunks to bound memory."""
    weight = model.get_input_embeddings().weight.detach()
    digest = hashlib.sha256()
    for start in range(0, weight.shape[0], rows_per_chunk):
        digest.update(weight[start : start + rows_per_chunk].to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model: nn.Module) -> dict:
    config = model.config
    return {
        **{field: getattr(config, field, None) for field in ARCHITECTURE_FIELDS},
        "embedding_sha256": embedding_checksum(model),
    }


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the vocabulary (token string to id)."""
    return _sha256(sorted(tokenizer.get_vocab().items()))


def prompt_hash(prompt_ids: list[int]) -> str:
    return _sha256(list(prompt_ids))[:16]
