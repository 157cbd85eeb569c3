"""What TKI costs over LoRA SFT on the embedded model, the embedded preset's own `LatentLoraConfig`, in one run.

- Training step (forward, backward(s), PCGrad, AdamW) for LoRA SFT, LTA only, KR only and full TKI under each
  reading of eq. 6 (as written, each example through its easier input: after stage 1 mostly the prior input, so
  both backward passes; and "harder", mostly the prompt, one backward), full TKI on mixed micro-batches (the prior input harder for some rows, the prompt for others; at micro-batch 1, a row
  whose prior input is harder), full TKI with a paper-sized bank (C=16, Q=12), and JFA (LTA with a flashback
  micro-batch as large as the training one per micro-batch, routed, PCGrad over SFT and flashbacks), at
  micro-batch 1 and 4.
  Every configuration steps on the same real P3 rows (<= 256 tokens): the first batch on which the mixed store
  mixes, rows in dataset order. Timed interleaved, round by round with rotating order; ratios are of medians.
  Each step's backward passes are reported (the route it took).
- Peak memory of each configuration's steps on those rows over SFT's, each measured in a fresh process.
- KR stage 1 (the embedded preset's 3 steps) per example, over an SFT step per example.
- Greedy generation throughput: the TKI adapter routed by query, plain PEFT LoRA with the same shared LoRA,
  and the plain LoRA that `export_lora` writes for one query.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python bench/speed.py
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from common import P3, STAGE1, write_results
from tki_trainer import (
    TKIConfig,
    TKITrainer,
    compute_prior_inputs,
    embedded_lora_config,
    export_lora,
    load_embedded_model,
    route,
)
from tki_trainer.config import prior_input_arguments
from tki_trainer.data import add_query_embeddings, as_conversational, fit_prompts, group_references, load_p3
from tki_trainer.ivg import InstructionVector
from tki_trainer.reinstatement import PriorInputConfig


HARDER = dict(reinstatement_target="harder")
CONFIGS = {
    "sft": dict(lta=False, kr=False, pcgrad=False),
    "lta": dict(lta=True, kr=False, pcgrad=False),
    "kr": dict(lta=False, kr=True, pcgrad=True),
    "tki": dict(lta=True, kr=True, pcgrad=True),
    "kr_harder": dict(lta=False, kr=True, pcgrad=True, **HARDER),
    "tki_harder": dict(lta=True, kr=True, pcgrad=True, **HARDER),
    "tki_mixed": dict(lta=True, kr=True, pcgrad=True, **HARDER),
    "tki_m192": dict(lta=True, kr=True, pcgrad=True),
    "jfa": dict(lta=True, kr=False, pcgrad=True),
    "ivg": dict(lta=True, kr=False, pcgrad=True),
}
FLASHBACKS = {"jfa"}
"""Configurations that take a flashback micro-batch (the training rows' prompts) per training micro-batch."""
GUIDED = {"ivg"}
"""Configurations with instruction-vector guidance: a random vector of the model's hidden size at layer
num_hidden_layers // 3 (a step's cost does not depend on the vector's values), the paper's schedule and KL weight."""


def instruction_vector(work: Path) -> Path:
    model, _ = load_embedded_model()
    config = model.config
    vector = torch.randn(1, config.hidden_size, generator=torch.Generator().manual_seed(0))
    InstructionVector(vector, ["speed"], config.num_hidden_layers // 3, [(0, 0)]).save(work / "iv")
    return work / "iv"


def shared_lora() -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")


MIXED = PriorInputConfig(learning_rate=0.0)
"""Stage 1 that leaves q = e: the base of the mixed store, whose deltas are then overwritten."""


def training_rows():
    _, tokenizer = load_embedded_model()
    dataset, _ = fit_prompts(load_p3(P3 / "train.jsonl.gz", limit=8, seed=2, conversational=True), tokenizer, 256)
    return add_query_embeddings(dataset)


def stores(work: Path, dataset) -> dict[str, Path]:
    """The stage-1 store of the preset's setting, and a mixed one: the prior input of every other example is its
    prompt plus noise (harder), of the others the prompt itself (never harder), so every micro-batch of 4 mixes."""
    model, tokenizer = load_embedded_model()
    store = compute_prior_inputs(model, tokenizer, dataset, work / "store", config=STAGE1, max_length=256)
    mixed = compute_prior_inputs(model, tokenizer, dataset, work / "mixed", config=MIXED, max_length=256)
    generator = torch.Generator().manual_seed(0)
    ids = sorted(mixed.examples)
    deltas = {
        i: torch.randn(mixed.load_delta(i).shape, generator=generator) * (0.05 if n % 2 else 0.0)
        for n, i in enumerate(ids)
    }
    entries = {i: {k: v for k, v in asdict(e).items() if k != "shard"} for i, e in mixed.examples.items()}
    mixed.write_shard("999-00000", deltas, entries)
    return {"store": store.path, "mixed": mixed.path, "iv": instruction_vector(work)}


def build(name: str, batch: int, dataset, store_dirs: dict[str, Path], output_dir: str) -> TKITrainer:
    model, tokenizer = load_embedded_model()
    switches = CONFIGS[name]
    bank = {"num_groups": 16, "keys_per_group": 12} if name == "tki_m192" else {}
    peft_config = embedded_lora_config(**bank) if switches["lta"] else shared_lora()
    store = store_dirs["mixed" if name == "tki_mixed" else "store"] if switches["kr"] else None
    guidance = {"ivg_vector": str(store_dirs["iv"])} if name in GUIDED else {}
    stage1 = prior_input_arguments(MIXED if name == "tki_mixed" else STAGE1)
    args = TKIConfig(
        output_dir=f"{output_dir}/{name}-{batch}",
        per_device_train_batch_size=batch,
        bf16=False,
        use_cpu=True,
        report_to="none",
        max_length=256,
        prior_inputs_dir=str(store) if store else None,
        activation_checkpointing=False,
        dataset_num_proc=None,
        train_sampling_strategy="sequential",
        flashbacks_per_step=batch,
        **switches,
        **stage1,
        **guidance,
    )
    trainer = TKITrainer(
        model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        flashback_dataset=dataset if name in FLASHBACKS else None,
    )
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


def _mixes(trainer: TKITrainer, batch) -> bool:
    """A batch of the mixed store holding a row whose prior input is harder (noised), and, beyond one row, one
    whose is not."""
    store = next(o.store for o in trainer.objectives if o.name == "reinst")
    noised = torch.tensor([bool(store.load_delta(i).abs().sum() > 0) for i in batch["example_ids"]])
    return bool(noised.any()) and (len(noised) == 1 or not bool(noised.all()))


def mixing_position(batch: int, dataset, store_dirs: dict[str, Path], work: Path) -> int:
    """Where the mixed store's (sequential) loader first yields a mixing batch: every configuration steps on the
    batch at this position, the same rows, so each ratio is row for row."""
    trainer = build("tki_mixed", batch, dataset, store_dirs, str(work))
    return next(n for n, b in enumerate(trainer.get_train_dataloader()) if _mixes(trainer, b))


def batch_at(trainer: TKITrainer, position: int) -> dict:
    return next(itertools.islice(trainer.get_train_dataloader(), position, None))


def mean_metric(trainer: TKITrainer, key: str) -> float | None:
    values = trainer._metrics["train"].get(key, [])
    return sum(values) / len(values) if values else None


def training_steps(dataset, store_dirs, rounds: int, positions: dict[int, int], work: Path) -> dict:
    results = {}
    for batch, position in positions.items():
        trainers = {name: build(name, batch, dataset, store_dirs, str(work)) for name in CONFIGS}
        first = {name: batch_at(t, position) for name, t in trainers.items()}
        if any(not torch.equal(b["input_ids"], first["sft"]["input_ids"]) for b in first.values()):
            raise RuntimeError("the configurations' loaders gave different rows; the ratios would not be row for row")
        for name, trainer in trainers.items():
            step(trainer, first[name])
            trainer._metrics["train"].clear()
        times = {name: [] for name in CONFIGS}
        names = list(CONFIGS)
        for number in range(rounds):
            for name in names[number % len(names) :] + names[: number % len(names)]:
                times[name].append(step(trainers[name], first[name]))
        median = {name: statistics.median(values) for name, values in times.items()}
        results[batch] = {
            "median_seconds": median,
            "seconds": times,
            "over_sft": {name: median[name] / median["sft"] for name in CONFIGS},
            "m192_over_m32": median["tki_m192"] / median["tki"],
            "jfa_over_lta": median["jfa"] / median["lta"],
            "ivg_over_lta": median["ivg"] / median["lta"],
            "backward_passes": {name: mean_metric(trainers[name], "pcgrad_backward_passes") for name in CONFIGS},
            "reinst_q_win_rate": {name: mean_metric(trainers[name], "reinst_q_win_rate") for name in CONFIGS},
        }
        del trainers
    return results


def _status_mb(field: str) -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 1024


def peak_memory(name: str, batch: int, position: int, work: Path) -> dict:
    """In this fresh process: resident memory once the trainer is built, and its peak over three steps (Linux's
    high-water mark, reset after the build: loading the model peaks higher than a step)."""
    dataset = training_rows()
    store_dirs = {"store": work / "store", "mixed": work / "mixed", "iv": work / "iv"}
    trainer = build(name, batch, dataset, store_dirs, str(work / "memory"))
    inputs = batch_at(trainer, position)
    Path("/proc/self/clear_refs").write_text("5")
    ready = _status_mb("VmRSS")
    for _ in range(3):
        step(trainer, inputs)
    return {"ready_mb": ready, "peak_mb": _status_mb("VmHWM")}


def memory(positions: dict[int, int], work: Path) -> dict:
    results = {}
    for batch, position in positions.items():
        for name in CONFIGS:
            output = (
                subprocess.run(
                    [sys.executable, __file__, "--memory_probe", name, str(batch), str(position), str(work)],
                    capture_output=True,
                    text=True,
                    check=True,
                    env={**os.environ, "TQDM_DISABLE": "1"},
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            results.setdefault(batch, {})[name] = json.loads(output)
        sft = results[batch]["sft"]["peak_mb"] - results[batch]["sft"]["ready_mb"]
        for values in results[batch].values():
            values["steps_over_sft"] = (values["peak_mb"] - values["ready_mb"]) / sft
    return results


def stage1_cost(dataset, sft_step_seconds: float, batch: int) -> dict:
    """Stage 1 at the preset's setting per example (fresh store), over an SFT step's share per example."""
    model, tokenizer = load_embedded_model()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        compute_prior_inputs(model, tokenizer, dataset, Path(tmp) / "store", config=STAGE1, max_length=256)
        per_example = (time.perf_counter() - start) / len(dataset)
    return {
        "seconds_per_example": per_example,
        "over_sft_step_per_example": per_example / (sft_step_seconds / batch),
        "steps": STAGE1.steps,
    }


def generation(rounds: int, work: Path, new_tokens: int = 32, batch: int = 8) -> dict:
    """Tokens per second of greedy generation (a fixed number of new tokens) for the three loading paths."""
    model, tokenizer = load_embedded_model()
    held = as_conversational(group_references(load_p3(P3 / "heldout.jsonl.gz", limit=200, seed=0)))
    held, _ = fit_prompts(held, tokenizer, 256)
    held = add_query_embeddings(held.select(range(batch)))
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in held["prompt"]]
    tokenizer.padding_side = "left"
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    queries = torch.tensor(held["query_embedding"])

    tki = get_peft_model(model, embedded_lora_config()).eval()
    export_lora(tki, queries[0], work / "exported")
    lora_model, _ = load_embedded_model()
    lora = get_peft_model(lora_model, shared_lora()).eval()
    exported_model, _ = load_embedded_model()
    exported = PeftModel.from_pretrained(exported_model, str(work / "exported")).eval()

    def run(model, routed: bool) -> float:
        start = time.perf_counter()
        with torch.no_grad(), route(model, queries) if routed else contextlib.nullcontext():
            model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        return batch * new_tokens / (time.perf_counter() - start)

    paths = {"tki_routed": (tki, True), "lora": (lora, False), "exported_lora": (exported, False)}
    for model, routed in paths.values():
        run(model, routed)
    speeds = {name: [] for name in paths}
    for number in range(rounds):
        names = list(paths)
        for name in names[number % 3 :] + names[: number % 3]:
            speeds[name].append(run(*paths[name]))
    median = {name: statistics.median(values) for name, values in speeds.items()}
    return {
        "tokens_per_second": median,
        "samples": speeds,
        "routed_over_lora": median["tki_routed"] / median["lora"],
        "exported_over_lora": median["exported_lora"] / median["lora"],
        "batch": batch,
        "new_tokens": new_tokens,
    }


def table(steps: dict, memory_results: dict, stage1: dict, generate: dict, rounds: int) -> str:
    lines = [
        "TKI over LoRA SFT, embedded SmolLM2-135M, the embedded preset's bank (C=4, Q=8, k=2, r=8 on q/v), P3 rows <= 256",
        f"tokens; step = forward, backward(s), PCGrad, AdamW; medians of {rounds} interleaved rounds. Targets: LTA <= 1.10,",
        "full TKI <= 2.2, M=192 / M=32 <= 1.05, routed generation >= 0.9 x LoRA. JFA: a flashback micro-batch as large as",
        "the training one (one more forward and backward through the adapted model, one no-grad forward through the",
        "reference) and PCGrad over SFT and flashbacks; JFA / LTA is what the two add to the LTA step. IVG: LTA with",
        "instruction-vector guidance (the vector added at the last prompt token; its KL term: one more forward and",
        "backward through the adapted model, one no-grad forward through the reference) and PCGrad over SFT and IVG.",
        "",
        "KR and TKI read eq. 6 as written (each example through its easier input); 'harder' is the other reading.",
        "",
        "| micro-batch | LTA / SFT | KR / SFT | TKI / SFT | KR harder / SFT | TKI harder / SFT | TKI mixed / SFT | TKI M=192 / M=32 | JFA / SFT | JFA / LTA | IVG / SFT | IVG / LTA | SFT s/step | backward passes KR, TKI, KR harder, TKI harder, mixed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for batch, r in steps.items():
        ratio, passes = r["over_sft"], r["backward_passes"]
        lines.append(
            f"| {batch} | {ratio['lta']:.3f} | {ratio['kr']:.3f} | {ratio['tki']:.3f} | {ratio['kr_harder']:.3f} | "
            f"{ratio['tki_harder']:.3f} | {ratio['tki_mixed']:.3f} | {r['m192_over_m32']:.3f} | "
            f"{ratio['jfa']:.3f} | {r['jfa_over_lta']:.3f} | {ratio['ivg']:.3f} | {r['ivg_over_lta']:.3f} | "
            f"{r['median_seconds']['sft']:.2f} | "
            + ", ".join(f"{passes[n]:.2f}" for n in ("kr", "tki", "kr_harder", "tki_harder", "tki_mixed"))
            + " |"
        )
    lines += [
        "",
        "Peak memory of three steps over SFT's (fresh process each; MB above the built trainer):",
        "",
        "| micro-batch | " + " | ".join(CONFIGS) + " |",
        "|---|" + "---|" * len(CONFIGS),
    ]
    for batch, values in memory_results.items():
        lines.append(
            f"| {batch} | "
            + " | ".join(f"{v['steps_over_sft']:.2f} ({v['peak_mb'] - v['ready_mb']:.0f})" for v in values.values())
            + " |"
        )
    g = generate
    lines += [
        "",
        f"KR stage 1 ({stage1['steps']} steps): {stage1['seconds_per_example']:.2f} s per example = "
        f"{stage1['over_sft_step_per_example']:.2f} x an SFT step's share per example (once per dataset).",
        "",
        f"Greedy generation, {g['batch']} prompts x {g['new_tokens']} new tokens: routed TKI / LoRA {g['routed_over_lora']:.3f}, "
        f"exported plain LoRA / LoRA {g['exported_over_lora']:.3f} (tokens/s: "
        + ", ".join(f"{k} {v:.1f}" for k, v in g["tokens_per_second"].items())
        + ").",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--memory_probe", nargs=4, metavar=("CONFIG", "BATCH", "POSITION", "WORK"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.memory_probe:
        name, batch, position, work = args.memory_probe
        print(json.dumps(peak_memory(name, int(batch), int(position), Path(work))))
        return
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dataset = training_rows()
        store_dirs = stores(work, dataset)
        positions = {batch: mixing_position(batch, dataset, store_dirs, work) for batch in args.batches}
        memory_results = memory(positions, work)
        steps = training_steps(dataset, store_dirs, args.rounds, positions, work)
        batch = max(args.batches)
        stage1 = stage1_cost(dataset, steps[batch]["median_seconds"]["sft"], batch)
        generate = generation(args.rounds, work)
    payload = {
        "training_steps": steps,
        "peak_memory": memory_results,
        "stage1": stage1,
        "generation": generate,
        "config": {
            "rounds": args.rounds,
            "batches": args.batches,
            "batch_positions": positions,
            "tki": embedded_lora_config().to_dict(),
            "stage1": STAGE1.to_dict(),
            "max_length": 256,
        },
    }
    text = table(steps, memory_results, stage1, generate, args.rounds)
    write_results("speed", payload, text)
    print(text)


if __name__ == "__main__":
    main()
