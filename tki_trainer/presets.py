"""The two presets, in one place: the TKI paper's setting (GPUs) and the embedded default (a CPU).

Every value carries its origin: ``paper`` (the TKI paper states it) or ``ours`` (a choice the paper does not
make). The recipe, the benchmarks and the embedded helpers read them from here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from peft import LoraConfig

from .config import PRIOR_INPUTS_PREFIX
from .embedded import ENCODER_DIM, ENCODER_NAME
from .reinstatement import PriorInputConfig
from .tuner import LatentLoraConfig


PAPER, OURS = "paper", "ours"

RECIPE_DATA = Path(__file__).resolve().parent.parent / "recipes" / "data"
"""The data slices a source checkout ships for the embedded preset."""

SHARED_LORA = {"r": (8, PAPER), "lora_alpha": (16, OURS), "lora_target": ("all-linear", PAPER)}
"""The shared LoRA of both presets: the paper's rank 8 on all linear layers."""

PRESETS: dict[str, dict[str, tuple[Any, str]]] = {
    "paper": {
        "model_name_or_path": ("meta-llama/Llama-3.1-8B-Instruct", PAPER),
        "query_encoder": ("FacebookAI/roberta-base", PAPER),
        "num_groups": (16, PAPER),
        "keys_per_group": (12, PAPER),
        "top_k": (2, PAPER),
        **SHARED_LORA,
        "latent_r": (8, OURS),
        "latent_alpha": (16, OURS),
        "latent_target_modules": ("q_proj,v_proj", OURS),
        "max_instances_per_task": (100, PAPER),
        "num_validation_tasks": (128, OURS),
        "per_device_train_batch_size": (1, PAPER),
        "gradient_accumulation_steps": (4, PAPER),
        "learning_rate": (1e-5, PAPER),
        "num_train_epochs": (3, PAPER),
        "reinstatement_alpha": (1.0, PAPER),
        "prior_inputs_steps": (3, PAPER),
        "prior_inputs_learning_rate": (5e-6, PAPER),
        "prior_inputs_wasserstein_weight": (-1.0, PAPER),
        "reinstatement_target": ("easier", PAPER),
        "max_length": (512, OURS),
        "bf16": (True, OURS),
    },
    "embedded": {
        "model_name_or_path": ("embedded", OURS),
        "query_encoder": ("embedded", OURS),
        "train_data": (str(RECIPE_DATA / "sni_slice"), OURS),
        "num_train_rows": (96, OURS),
        "num_eval_prompts": (96, OURS),
        "max_instances_per_task": (100, OURS),
        "num_validation_tasks": (6, OURS),
        "num_groups": (4, OURS),
        "keys_per_group": (8, OURS),
        "top_k": (2, OURS),
        **SHARED_LORA,
        "latent_r": (8, OURS),
        "latent_alpha": (16, OURS),
        "latent_target_modules": ("q_proj,v_proj", OURS),
        "per_device_train_batch_size": (4, OURS),
        "gradient_accumulation_steps": (1, OURS),
        "learning_rate": (2e-4, OURS),
        "num_train_epochs": (1, OURS),
        "max_length": (256, OURS),
        "prior_inputs_steps": (3, OURS),
        "prior_inputs_learning_rate": (1e-3, OURS),
        "prior_inputs_wasserstein_weight": (-1.0, PAPER),
        "reinstatement_target": ("easier", PAPER),
        "use_cpu": (True, OURS),
        "bf16": (False, OURS),
        "activation_checkpointing": (False, OURS),
        "save_steps": (10, OURS),
        "save_total_limit": (1, OURS),
    },
}

TAGI_PRESETS: dict[str, dict[str, tuple[Any, str]]] = {
    "paper": {
        "model_name_or_path": ("meta-llama/Llama-3.1-8B-Instruct", OURS),  # TAGI's paper uses T5-LM and T0
        "instruction_encoder": ("sentence-transformers/all-mpnet-base-v2", OURS),
        "max_instances_per_task": (100, PAPER),
        "num_validation_tasks": (0, OURS),
        "demonstrations": (0, PAPER),  # the paper's two settings: definition only, and + 2 demonstrations
        "r": (8, OURS),
        "lora_alpha": (16, OURS),
        "lora_target": ("q_proj,v_proj", OURS),
        "teacher_epochs": (2, OURS),
        "teacher_learning_rate": (1e-4, OURS),
        "kl_weight": (5.0, PAPER),
        "kl_temperature": (1.0, OURS),
        "matching_weight": (1.0, OURS),
        "matching_gate": ("sigmoid", PAPER),  # the authors' code: sigmoid(d) * d
        "per_device_train_batch_size": (4, OURS),
        "gradient_accumulation_steps": (4, OURS),
        "learning_rate": (1e-4, OURS),
        "num_train_epochs": (2, OURS),
        "max_length": (1024, OURS),
        "bf16": (True, OURS),
    },
    "embedded": {
        "model_name_or_path": ("embedded", OURS),
        "instruction_encoder": ("embedded", OURS),
        "train_data": (str(RECIPE_DATA / "sni_slice"), OURS),
        "num_train_rows": (256, OURS),
        "num_eval_prompts": (96, OURS),
        "max_instances_per_task": (100, OURS),
        "num_validation_tasks": (0, OURS),
        "demonstrations": (0, PAPER),
        "r": (8, OURS),
        "lora_alpha": (16, OURS),
        "lora_target": ("q_proj,v_proj", OURS),
        "teacher_epochs": (2, OURS),
        "teacher_learning_rate": (3e-4, OURS),
        "kl_weight": (5.0, PAPER),
        "kl_temperature": (1.0, OURS),
        "matching_weight": (1.0, OURS),
        "matching_gate": ("sigmoid", PAPER),
        "per_device_train_batch_size": (4, OURS),
        "gradient_accumulation_steps": (1, OURS),
        "learning_rate": (1e-3, OURS),
        "num_train_epochs": (2, OURS),
        "max_length": (384, OURS),
        "use_cpu": (True, OURS),
        "bf16": (False, OURS),
        "activation_checkpointing": (False, OURS),
        "save_steps": (20, OURS),
        "save_total_limit": (1, OURS),
    },
}
"""The TAGI recipe's presets (``recipes/sni_tagi.py``), with the same origins: ``paper`` where TAGI's paper or its
code states the value."""


def _modules(value: str) -> str | list[str]:
    return value if value == "all-linear" else value.split(",")


def shared_lora_config(preset: str = "paper", **overrides: Any) -> LoraConfig:
    """A preset's shared LoRA as a plain `peft.LoraConfig` (what ``lta=False`` trains)."""
    values = {name: value for name, (value, _) in PRESETS[preset].items()}
    return LoraConfig(
        r=overrides.get("r", values["r"]),
        lora_alpha=overrides.get("lora_alpha", values["lora_alpha"]),
        target_modules=_modules(overrides.get("lora_target", values["lora_target"])),
        task_type="CAUSAL_LM",
    )


def latent_bank(preset: str = "paper", **overrides: Any) -> dict[str, Any]:
    """A preset's latent bank as `LatentLoraConfig` fields, without the query width (which the encoder sets)."""
    values = {name: value for name, (value, _) in PRESETS[preset].items()}
    values.update(overrides)
    return {
        "latent_r": values["latent_r"],
        "latent_alpha": values["latent_alpha"],
        "latent_target_modules": _modules(values["latent_target_modules"]),
        "num_groups": values["num_groups"],
        "keys_per_group": values["keys_per_group"],
        "top_k": values["top_k"],
    }


def latent_lora_config(preset: str = "paper", *, key_dim: int, **overrides: Any) -> LatentLoraConfig:
    """A preset's TKI adapter: its shared LoRA plus its bank, keyed by ``key_dim``-dimensional queries."""
    encoder = overrides.get("encoder_name")
    return LatentLoraConfig.from_lora_config(
        shared_lora_config(preset, **overrides),
        **latent_bank(preset, **overrides),
        key_dim=key_dim,
        encoder_name=encoder,
        encoder_dim=key_dim if encoder else None,
    )


def prior_input_config(preset: str = "paper") -> PriorInputConfig:
    """A preset's KR stage-1 settings (`PriorInputConfig`'s defaults where the preset sets none)."""
    values = {name.removeprefix(PRIOR_INPUTS_PREFIX): value for name, (value, _) in PRESETS[preset].items()}
    return PriorInputConfig(**{f: values[f] for f in PriorInputConfig.__dataclass_fields__ if f in values})


def embedded_lora_config(**overrides: Any) -> LatentLoraConfig:
    """The embedded preset's adapter: shared LoRA r=8 on all linear layers, a C=4 x Q=8 bank (k=2, rank 8) on
    q_proj/v_proj keyed by all-MiniLM-L6-v2 embeddings. ``overrides`` are `LatentLoraConfig` fields."""
    config = latent_lora_config("embedded", key_dim=ENCODER_DIM, encoder_name=ENCODER_NAME)
    return dataclasses.replace(config, **overrides)
