"""Cost and effect of TKI's data preparation on the embedded model and real P3 rows.

- KR stage 1 per stage epoch (one optimisation step over every example) over one LoRA-SFT epoch (forward,
  backward and AdamW step) on the same examples, batch and token budget; target <= 1.2.
- The CE reduction and |q-e|/|e| that the default `PriorInputConfig` reaches.
- Bytes stored per example against the floor prompt_tokens x hidden x 2, and the reconstruction error of the
  two storage forms (bf16 delta to e, bf16 q).
- Query-embedding throughput of the embedded encoder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from common import write_results
from tki_trainer import load_embedded_encoder, load_embedded_model
from tki_trainer.data import add_query_embeddings, fit_prompts, load_p3, tokenize_row
from tki_trainer.reinstatement import PriorInputConfig, compute_prior_inputs, optimize_prior_inputs


P3_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "p3" / "train.jsonl.gz"


def sft_epoch_seconds(rows, tokenizer, batch_size: int) -> float:
    model, _ = load_embedded_model()
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    ).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    start = time.perf_counter()
    for offset in range(0, len(rows), batch_size):
        batch = collator(
            [
                {"input_ids": r.input_ids, "labels": [-100] * r.prompt_length + r.input_ids[r.prompt_length :]}
                for r in rows[offset : offset + batch_size]
            ]
        )
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return time.perf_counter() - start


def storage_errors(model, tokenizer, rows, config) -> dict[str, float]:
    """Relative error |stored - q| / |q - e| of each storage form, over one batch."""
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    batch = collator(
        [{"input_ids": r.input_ids, "labels": [-100] * r.prompt_length + r.input_ids[r.prompt_length :]} for r in rows]
    )
    lengths = torch.tensor([r.prompt_length for r in rows])
    result = optimize_prior_inputs(
        model.eval(), batch["input_ids"], batch["attention_mask"], batch["labels"], lengths, config
    )
    change = (result.embeddings - result.initial).norm()
    delta = result.initial + (result.embeddings - result.initial).bfloat16().float()
    absolute = result.embeddings.bfloat16().float()
    return {
        "delta_bf16": float((delta - result.embeddings).norm() / change),
        "absolute_bf16": float((absolute - result.embeddings).norm() / change),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_embedded_model()
    dataset = load_p3(P3_TRAIN, limit=args.examples, seed=0, conversational=True)
    dataset, report = fit_prompts(dataset, tokenizer, args.max_length)
    rows = [tokenize_row(tokenizer, r["prompt"], r["completion"]) for r in dataset]

    encoder = load_embedded_encoder()
    texts = load_p3(P3_TRAIN, limit=512, seed=1)
    start = time.perf_counter()
    add_query_embeddings(texts, encoder)
    encode_rate = len(texts) / (time.perf_counter() - start)

    config = PriorInputConfig(batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        store = compute_prior_inputs(
            model, tokenizer, dataset, Path(tmp) / "store", config=config, max_length=args.max_length
        )
        stage1 = time.perf_counter() - start
        stored_bytes = sum(p.stat().st_size for p in store.path.glob("shard-*"))
        summary = store.summary()
    sft = sft_epoch_seconds(rows, tokenizer, args.batch_size)
    floor = sum(r.prompt_length for r in rows) * model.config.hidden_size * 2
    errors = storage_errors(model, tokenizer, rows[: args.batch_size], config)

    ratios = {
        "stage1_per_stage_epoch_over_sft_epoch": stage1 / config.steps / sft,
        "stored_bytes_over_floor": stored_bytes / floor,
    }
    table = "\n".join(
        [
            f"KR preparation, embedded SmolLM2-135M, {len(rows)} P3 rows (chat format, <= {args.max_length} tokens; {report}), batch {args.batch_size}.",
            "",
            "| measure | value | target |",
            "|---|---|---|",
            f"| stage-1 epoch / SFT epoch | {ratios['stage1_per_stage_epoch_over_sft_epoch']:.2f} | <= 1.2 |",
            f"| mean CE with e -> with q | {summary['ce_initial']:.3f} -> {summary['ce_final']:.3f} ({summary['ce_reduction']:.1%} lower) | >= 10% |",
            f"| mean \\|q-e\\|/\\|e\\| | {summary['relative_change']:.2e} | |",
            f"| bytes stored / floor (prompt tokens x hidden x 2) | {ratios['stored_bytes_over_floor']:.3f} | |",
            f"| bf16 error / \\|q-e\\|: delta form, absolute form | {errors['delta_bf16']:.4f}, {errors['absolute_bf16']:.2f} | |",
            f"| query embeddings (all-MiniLM-L6-v2) | {encode_rate:.0f} prompts/s | |",
            "",
            f"Stage 1: {config.steps} steps at lr {config.learning_rate}, {stage1:.1f} s in all; one SFT epoch (LoRA r=8 all-linear, AdamW): {sft:.1f} s.",
        ]
    )
    payload = {
        "ratios": ratios,
        "stage1_seconds": stage1,
        "sft_epoch_seconds": sft,
        "summary": summary,
        "storage_errors": errors,
        "stored_bytes": stored_bytes,
        "floor_bytes": floor,
        "encode_prompts_per_second": encode_rate,
        "config": {**config.to_dict(), "examples": len(rows), "max_length": args.max_length, "fit": str(report)},
    }
    write_results("prepare_speed", payload, table)
    print(table)


if __name__ == "__main__":
    main()
