"""Shared fixtures: a tiny random Llama built from a config (no download) and a TKI config sized for it."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tki_trainer import LatentLoraConfig


KEY_DIM = 16
VOCAB_SIZE = 300


TINY_DECODER = dict(
    vocab_size=VOCAB_SIZE,
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
"""The tiny decoder's sizes, for any Llama-like architecture of transformers."""


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY_DECODER)).eval()


def tki_config(**overrides) -> LatentLoraConfig:
    """Small bank (C=3, Q=4, k=2) on q/v, shared LoRA on all linear layers."""
    values = dict(
        r=4, lora_alpha=8, latent_r=2, latent_alpha=4, num_groups=3, keys_per_group=4, top_k=2, key_dim=KEY_DIM
    )
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


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """A byte-level BPE tokenizer of 300 tokens trained on a few sentences, with a chat template; its merges
    join tokens across a prompt/completion boundary (``"... is"`` + ``"land"``), as real tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["The island is an island of land.", "Paris is the capital of France.", "Answer: yes or no."] * 20
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", chat_template=CHAT_TEMPLATE
    )
