"""Forward+backward cost of the latent bank over plain PEFT LoRA on the same shared modules.

Embedded model, batch 4 x 256 tokens, the embedded preset's `LatentLoraConfig` (C=4, Q=8) and a paper-sized
bank (C=16, Q=12) to show the step does not grow with M. Configurations are timed interleaved, round by
round, and compared by the ratio of their medians measured in this one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

from common import write_results
from tki_trainer import embedded_lora_config, load_embedded_model, route


def build(kind: str):
    model, _ = load_embedded_model()
    if kind == "lora":
        return get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
        )
    groups, per_group = {"tki_m32": (4, 8), "tki_m192": (16, 12)}[kind]
    return get_peft_model(model, embedded_lora_config(num_groups=groups, keys_per_group=per_group))


def step(model, input_ids, queries, groups) -> float:
    start = time.perf_counter()
    with route(model, queries, groups) if queries is not None else torch.enable_grad():
        model(input_ids=input_ids, labels=input_ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    kinds = ["lora", "tki_m32", "tki_m192"]
    models = {kind: build(kind).train() for kind in kinds}
    input_ids = torch.randint(100, 40000, (args.batch, args.tokens))
    queries = torch.nn.functional.normalize(torch.randn(args.batch, 384), dim=1)
    groups = {"tki_m32": torch.arange(args.batch) % 4, "tki_m192": torch.arange(args.batch) % 16}
    inputs = {kind: (None, None) if kind == "lora" else (queries, groups[kind]) for kind in kinds}
    for kind in kinds:
        step(models[kind], input_ids, *inputs[kind])
    times = {kind: [] for kind in kinds}
    for round_number in range(args.rounds):
        for kind in kinds[round_number % 3 :] + kinds[: round_number % 3]:
            times[kind].append(step(models[kind], input_ids, *inputs[kind]))
    median = {kind: statistics.median(values) for kind, values in times.items()}
    ratios = {
        "tki_m32_over_lora": median["tki_m32"] / median["lora"],
        "tki_m192_over_lora": median["tki_m192"] / median["lora"],
        "tki_m192_over_tki_m32": median["tki_m192"] / median["tki_m32"],
    }
    table = "\n".join(
        [
            f"Forward+backward, embedded SmolLM2-135M, batch {args.batch} x {args.tokens} tokens, median of {args.rounds} interleaved rounds (order rotated each round).",
            "",
            "| ratio | value | target |",
            "|---|---|---|",
            f"| TKI (M=32) / LoRA | {ratios['tki_m32_over_lora']:.3f} | <= 1.10 |",
            f"| TKI (M=192) / LoRA | {ratios['tki_m192_over_lora']:.3f} | |",
            f"| TKI M=192 / M=32 | {ratios['tki_m192_over_tki_m32']:.3f} | |",
            "",
            "| configuration | median s/step |",
            "|---|---|",
            *[f"| {kind} | {median[kind]:.3f} |" for kind in kinds],
        ]
    )
    config = {
        "batch": args.batch,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "lora": "r=8, alpha=16, all-linear",
        "tki": embedded_lora_config().to_dict(),
    }
    write_results(
        "tuner_speed", {"ratios": ratios, "median_seconds": median, "seconds": times, "config": config}, table
    )
    print(table)


if __name__ == "__main__":
    main()
