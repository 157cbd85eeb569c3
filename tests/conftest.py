"""Shared fixtures: a tiny random Llama built from a config (no download) and a TKI config sized for it."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tki_trainer import LatentLoraConfig


KEY_DIM = 16


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def tki_config(**overrides) -> LatentLoraConfig:
    """Small bank (C=3, Q=4, k=2) on q/v, shared LoRA on all linear layers."""
    values = dict(r=4, lora_alpha=8, latent_r=2, latent_alpha=4, num_groups=3, keys_per_group=4, top_k=2, key_dim=KEY_DIM)
    values.update(overrides)
    return LatentLoraConfig(**values)


def trained_like(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give every adapter weight a random value, so that zero-initialised factors do not hide mistakes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "tki_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


@pytest.fixture
def queries() -> torch.Tensor:
    return torch.randn(3, KEY_DIM, generator=torch.Generator().manual_seed(7))
