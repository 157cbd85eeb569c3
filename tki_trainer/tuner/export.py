"""Fold the latent bank into a plain LoRA adapter for one query, loadable by PEFT without this package."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn

from .._io import staged_directory
from .model import find_tuner, tki_layers


def save_plain_lora(state_dict: dict[str, torch.Tensor], config: LoraConfig, output_dir: str | os.PathLike) -> Path:
    """Write a plain PEFT LoRA directory (``adapter_model.safetensors`` in PEFT's key layout, ``adapter_config.json``)
    under a temporary name, then rename it, so a failed export leaves nothing behind."""
    with staged_directory(output_dir) as staging:
        save_file(state_dict, staging / "adapter_model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(staging)
    return Path(output_dir)


def export_lora(
    model: nn.Module, query_embedding: torch.Tensor, output_dir: str | os.PathLike, adapter_name: str | None = None
) -> Path:
    """Write a plain LoRA adapter equal to the TKI adapter routed with ``query_embedding`` (1-D, ``key_dim``).

    The ``k`` increments retrieved for the query (without a group, per ``inference_retrieval``) are stacked
    under the shared LoRA: rank ``r + k * latent_r`` on the latent modules via ``rank_pattern``, with the
    blend weights and both scalings folded into ``B`` and ``alpha_pattern`` set to the rank (scaling 1), so
    the exported product equals the TKI layer's exactly. Other modules keep the shared LoRA as it is.
    """
    tuner = find_tuner(model)
    adapter_name = adapter_name or tuner.active_adapters[0]
    if adapter_name not in tuner.tki_keys:
        raise ValueError(f"No TKI adapter named {adapter_name!r}; the model holds {sorted(tuner.tki_keys.keys())}.")
    if not isinstance(query_embedding, torch.Tensor) or query_embedding.ndim != 1:
        raise ValueError(
            "export_lora takes one query embedding as a 1-D tensor of key_dim values; for a dataset row use "
            "torch.tensor(row['query_embedding'])."
        )
    config = tuner.peft_config[adapter_name]
    indices, weights = tuner.router.retrieve(adapter_name, query_embedding.unsqueeze(0), None)
    indices, weights = indices[0], weights[0]

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, int] = {}
    for name, layer in tki_layers(model):
        shared = adapter_name in layer.tki_lora_A
        if shared:
            lora_a, lora_b = layer.tki_lora_A[adapter_name].weight, layer.tki_lora_B[adapter_name].weight
            factors[name] = (lora_a, lora_b)
        if adapter_name not in layer.tki_latent_A:
            continue
        rank = layer.latent_r[adapter_name]
        scale = (weights * layer.latent_scaling[adapter_name]).repeat_interleave(rank)
        latent_a = layer.tki_latent_A[adapter_name][indices].reshape(-1, layer.in_features)
        latent_b = layer.tki_latent_B[adapter_name][indices].reshape(-1, layer.out_features).T * scale
        if shared:
            latent_a = torch.cat([lora_a, latent_a])
            latent_b = torch.cat([lora_b * layer.scaling[adapter_name], latent_b], dim=1)
        factors[name] = (latent_a, latent_b)
        rank_pattern[re.escape(name)] = alpha_pattern[re.escape(name)] = latent_a.shape[0]

    state_dict = {}
    for name, (factor_a, factor_b) in factors.items():
        state_dict[f"base_model.model.{name}.lora_A.weight"] = factor_a.detach().float().contiguous()
        state_dict[f"base_model.model.{name}.lora_B.weight"] = factor_b.detach().float().contiguous()
    lora_config = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=sorted(factors),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
    )
    return save_plain_lora(state_dict, lora_config, output_dir)
