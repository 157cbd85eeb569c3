"""Step time and peak memory of TKITrainer configurations over LoRA SFT, on the embedded model.

One training step (forward, backward(s), PCGrad, AdamW) on the same real P3 micro-batch (<= 256 tokens per
row) for: LoRA SFT, LTA only, KR only, full TKI, and full TKI with a paper-sized bank (C=16, Q=12), at
micro-batch 1 and 4. Configurations are timed interleaved, round by round with rotating order; ratios are of
medians from this one run. The bank is the embedded preset's `LatentLoraConfig`.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig

from common import write_results
from tki_trainer import TKIConfig, TKITrainer, compute_prior_inputs, embedded_lora_config, load_embedded_model
from tki_trainer.data import add_query_embeddings, fit_prompts, load_p3
from tki_trainer.reinstatement import PriorInputConfig


P3_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "p3" / "train.jsonl.gz"
CONFIGS = {
    "sft": dict(lta=False, kr=False, pcgrad=False),
    "lta": dict(lta=True, kr=False, pcgrad=False),
    "kr": dict(lta=False, kr=True, pcgrad=True),
    "tki": dict(lta=True, kr=True, pcgrad=True),
    "tki_m192": dict(lta=True, kr=True, pcgrad=True),
}


def build(name: str, batch: int, dataset, store_dir: str, output_dir: str) -> TKITrainer:
    model, tokenizer = load_embedded_model()
    switches = CONFIGS[name]
    peft_config = (
        embedded_lora_config(**({"num_groups": 16, "keys_per_group": 12} if name == "tki_m192" else {}))
        if switches["lta"]
        else LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    args = TKIConfig(
        output_dir=f"{output_dir}/{name}-{batch}", per_device_train_batch_size=batch, bf16=False, use_cpu=True,
        report_to="none", max_length=256, prior_inputs_dir=store_dir if switches["kr"] else None,
        activation_checkpointing=False, dataset_num_proc=None, **switches,
    )
    trainer = TKITrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    trainer.model.train()
    return trainer


def step(trainer: TKITrainer, batch) -> float:
    inputs = dict(batch)
    num_items = (inputs["labels"][:, 1:] != -100).sum()
    start = time.perf_counter()
    trainer.training_step(trainer.model, inputs, num_items)
    trainer.optimizer.step()
    trainer.model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def mean_metric(trainer: TKITrainer, key: str) -> float:
    """Mean of a metric the trainer recorded over the timed steps."""
    values = trainer._metrics["train"][key]
    return sum(values) / max(len(values), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_embedded_model()
    dataset, _ = fit_prompts(load_p3(P3_TRAIN, limit=8, seed=2, conversational=True), tokenizer, 256)
    dataset = add_query_embeddings(dataset)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = compute_prior_inputs(model, tokenizer, dataset, f"{tmp}/store", config=PriorInputConfig(), max_length=256)
        for batch in args.batches:
            trainers = {name: build(name, batch, dataset, str(store.path), tmp) for name in CONFIGS}
            batches = {name: next(iter(t.get_train_dataloader())) for name, t in trainers.items()}
            for name, trainer in trainers.items():
                step(trainer, batches[name])
            times = {name: [] for name in CONFIGS}
            names = list(CONFIGS)
            for round_number in range(args.rounds):
                for name in names[round_number % len(names):] + names[: round_number % len(names)]:
                    times[name].append(step(trainers[name], batches[name]))
            median = {name: statistics.median(v) for name, v in times.items()}
            results[f"micro_batch_{batch}"] = {
                "median_seconds": median,
                "seconds": times,
                "ratios": {name: median[name] / median["sft"] for name in CONFIGS},
                "m192_over_m32": median["tki_m192"] / median["tki"],
                "reinst_q_win_rate": {name: mean_metric(trainers[name], "reinst_q_win_rate") for name in ("kr", "tki")},
                "backward_passes": {name: mean_metric(trainers[name], "pcgrad_backward_passes") for name in ("kr", "tki")},
            }
            del trainers
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = [
        "TKITrainer step (forward, backward, PCGrad, AdamW) over LoRA SFT, embedded SmolLM2-135M, P3 rows <= 256 tokens,",
        f"median of {args.rounds} interleaved rounds. Targets: LTA-only <= 1.10, full TKI <= 2.2, M=192 / M=32 <= 1.05.",
        "Backward passes per micro-batch: 1 when the real prompt is harder for every example, 2 when the prior input",
        "is for every example, 3 for a mixed micro-batch (prior inputs from the default stage 1).",
        "",
        "| micro-batch | LTA / SFT | KR / SFT | TKI / SFT | TKI M=192 / M=32 | SFT s/step | backward passes KR, TKI | q-win rate KR, TKI |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        lines.append(
            f"| {key.rsplit('_', 1)[1]} | {r['ratios']['lta']:.3f} | {r['ratios']['kr']:.3f} | {r['ratios']['tki']:.3f} | "
            f"{r['m192_over_m32']:.3f} | {r['median_seconds']['sft']:.2f} | "
            f"{r['backward_passes']['kr']:.2f}, {r['backward_passes']['tki']:.2f} | "
            f"{r['reinst_q_win_rate']['kr']:.2f}, {r['reinst_q_win_rate']['tki']:.2f} |"
        )
    lines += ["", f"Peak resident memory of the whole run: {peak_mb:.0f} MB."]
    table = "\n".join(lines)
    write_results("trainer_speed", {"results": results, "peak_rss_mb": peak_mb, "config": {"rounds": args.rounds, "tki": embedded_lora_config().to_dict()}}, table)
    print(table)


if __name__ == "__main__":
    main()
