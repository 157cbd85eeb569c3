"""Write one task's generated LoRA as a plain PEFT LoRA adapter, loadable without this package."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import LoraConfig
from torch import nn

from ...tuner.export import save_plain_lora
from .model import find_instruction_tuner, generate_lora


def export_instruction_lora(
    model: nn.Module,
    instruction_embedding: torch.Tensor,
    output_dir: str | os.PathLike,
    adapter_name: str | None = None,
) -> Path:
    """Write the LoRA the hypernetwork generates for ``instruction_embedding`` (1-D, ``key_dim``) as a plain PEFT
    LoRA directory: same rank, alpha and modules, so it computes exactly what the tuner applies for that task,
    and any PEFT loads it (and can merge it) without this package."""
    if not isinstance(instruction_embedding, torch.Tensor) or instruction_embedding.ndim != 1:
        raise ValueError(
            "export_instruction_lora takes one instruction embedding as a 1-D tensor of key_dim values; for a "
            "dataset row use torch.tensor(row['instruction_embedding'])."
        )
    tuner = find_instruction_tuner(model)
    adapter_name = adapter_name or tuner.active_adapters[0]
    with torch.no_grad():
        factors = generate_lora(model, instruction_embedding.unsqueeze(0), adapter_name)
    config = tuner.peft_config[adapter_name]
    state_dict = {}
    for name, (lora_a, lora_b) in factors.items():
        state_dict[f"base_model.model.{name}.lora_A.weight"] = lora_a[0].float().contiguous()
        state_dict[f"base_model.model.{name}.lora_B.weight"] = lora_b[0].float().contiguous()
    lora_config = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=sorted(factors),
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
    )
    return save_plain_lora(state_dict, lora_config, output_dir)
