"""Train a tiny TKI model for a few steps and save its adapter and logs; run by test_distributed.py with one process
(``python``) and with two (``accelerate launch --num_processes 2``)."""

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset

from conftest import KEY_DIM, tiny_llama, tiny_tokenizer, tki_config
from test_trainer import common, rows
from tki_trainer import TKIConfig, TKITrainer


FLASHBACKS = ["Is the capital", "Paris is the capital of France", "The island", "Is the land an island of land"]
"""Prompts of different lengths: the divergence is a mean per flashback, so two processes' mean of means is the one
process's mean however long each process's flashbacks are."""


def flashback_rows() -> Dataset:
    queries = torch.randn(len(FLASHBACKS), KEY_DIM, generator=torch.Generator().manual_seed(11))
    return Dataset.from_dict({"prompt": FLASHBACKS, "query_embedding": queries.tolist()})


def main(output_dir: str, store_dir: str, batch: int, accumulation: int, kr: bool, pcgrad: bool, flashbacks: str,
         target: str = "easier", vector: str | None = None):  # fmt: skip
    """``flashbacks``: "no-flashbacks", "flashbacks", "continued-flashbacks" (over 3 tokens of the reference's
    continuation too), or "silent-flashbacks" (drawn and measured, weight 0); ``target``: the reading of eq. 6;
    ``vector``: an instruction vector's directory, for instruction-vector guidance."""
    guidance = {} if vector is None else {"ivg_vector": vector, "ivg_kl_weight": 1.0, "ivg_kl_hinge": 0.0}
    with_flashbacks = flashbacks != "no-flashbacks"
    settings = common(
        Path(output_dir), "run", max_steps=3 if with_flashbacks else 2, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, learning_rate=1e-2 if with_flashbacks else 1e-3,
        train_sampling_strategy="sequential",
    )  # fmt: skip
    args = TKIConfig(
        **settings, prior_inputs_dir=store_dir if kr else None, prior_inputs_learning_rate=0.0, kr=kr, pcgrad=pcgrad,
        flashbacks_per_step=batch, flashback_weight=0.0 if flashbacks == "silent-flashbacks" else 1.0,
        flashback_continuation_tokens=3 if flashbacks == "continued-flashbacks" else 0, reinstatement_target=target,
        **guidance,
    )  # fmt: skip
    trainer = TKITrainer(tiny_llama(), args=args, train_dataset=rows(), processing_class=tiny_tokenizer(),
                         peft_config=tki_config(), flashback_dataset=flashback_rows() if with_flashbacks else None)  # fmt: skip
    if with_flashbacks:
        drawn = next(o for o in trainer.objectives if o.name == "flashback").flashbacks
        assert len({len(ids) for ids in drawn.token_ids}) > 1, "the flashbacks must differ in length"
    trainer.train()
    if trainer.accelerator.is_main_process:
        trainer.model.save_pretrained(f"{output_dir}/adapter")
        Path(output_dir, "logs.json").write_text(json.dumps(trainer.state.log_history))


if __name__ == "__main__":
    output, store, batch, accumulation, kr, pcgrad, flashbacks, target, *vector = sys.argv[1:]
    main(output, store, int(batch), int(accumulation), kr == "kr", pcgrad == "pcgrad", flashbacks, target, *vector)
