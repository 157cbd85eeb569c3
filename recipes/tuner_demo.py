"""The TKI tuner on the embedded default, end to end on this machine: route, generate, save, reload, export.

Builds the embedded preset's adapter on SmolLM2-135M-Instruct, gives its bank a few Adam steps on the
prompts below so that routing changes the output, then shows the two ways to share it: the TKI adapter
(`PeftModel.from_pretrained` after `import tki_trainer`) and a plain LoRA exported for one query, which
vanilla PEFT loads. Each reload is checked against the routed model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model

import tki_trainer
from tki_trainer import embedded_lora_config, export_lora, load_embedded_encoder, load_embedded_model, route


EXAMPLES = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Is this review positive or negative? 'A wonderful, moving film.'", "Positive."),
    (
        "Summarize: The council voted to extend the library's opening hours to 9 pm on weekdays.",
        "The library will stay open until 9 pm on weekdays.",
    ),
    ("Add 2 and 3.", "2 + 3 = 5."),
]


def chat(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", default="outputs/tuner_demo")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    output_dir = Path(args.output_dir)
    torch.manual_seed(0)

    model, tokenizer = load_embedded_model()
    tokenizer.padding_side = "left"
    encoder = load_embedded_encoder()
    prompts = [prompt for prompt, _ in EXAMPLES]
    queries = encoder.encode(prompts, convert_to_tensor=True).cpu()
    groups = torch.arange(len(prompts)) % embedded_lora_config().num_groups

    model = get_peft_model(model, embedded_lora_config())
    model.print_trainable_parameters()
    texts = [chat(tokenizer, prompt) + answer + tokenizer.eos_token for prompt, answer in EXAMPLES]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(args.steps):
        with route(model, queries, groups):
            loss = model(**batch, labels=labels).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step + 1}/{args.steps}: loss {loss.item():.3f}")
    model.eval()

    inputs = tokenizer([chat(tokenizer, p) for p in prompts], return_tensors="pt", padding=True)
    generated = model.generate(**inputs, query_embeddings=queries, max_new_tokens=24, do_sample=False)
    for prompt, ids in zip(prompts, generated[:, inputs["input_ids"].shape[1] :]):
        print(f"> {prompt}\n  {tokenizer.decode(ids, skip_special_tokens=True)!r}")

    adapter_dir, plain_dir = output_dir / "adapter", output_dir / "plain_lora_query0"
    model.save_pretrained(adapter_dir)
    routed = model(**inputs, query_embeddings=queries).logits
    reloaded = PeftModel.from_pretrained(load_embedded_model()[0], adapter_dir).eval()
    same = torch.allclose(reloaded(**inputs, query_embeddings=queries).logits, routed)

    export_lora(model, queries[0], plain_dir)
    plain = PeftModel.from_pretrained(load_embedded_model()[0], plain_dir).eval()
    first = {key: value[:1] for key, value in inputs.items()}
    with route(model, queries[:1]):
        exported_same = torch.allclose(plain(**first).logits, model(**first).logits, atol=1e-4)

    print(f"\nTKI adapter ({tki_trainer.__version__}): {adapter_dir}  reloaded logits identical: {same}")
    print(f"plain LoRA for the first prompt's query: {plain_dir}  matches the routed adapter: {exported_same}")
    if not (same and exported_same):
        raise SystemExit("a reloaded adapter differs from the model that saved it")


if __name__ == "__main__":
    main()
