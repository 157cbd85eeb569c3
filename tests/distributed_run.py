"""Train a tiny TKI model for a few steps and save its adapter; run by test_distributed.py with one process
(``python``) and with two (``accelerate launch --num_processes 2``)."""

import sys
from pathlib import Path

from conftest import tiny_llama, tiny_tokenizer, tki_config
from test_trainer import common, rows
from tki_trainer import TKIConfig, TKITrainer


def main(output_dir: str, store_dir: str, batch: int, accumulation: int, kr: bool, pcgrad: bool) -> None:
    settings = common(
        Path(output_dir), "run", max_steps=2, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        learning_rate=1e-3, train_sampling_strategy="sequential",
    )  # fmt: skip
    args = TKIConfig(
        **settings, prior_inputs_dir=store_dir if kr else None, prior_inputs_learning_rate=0.0, kr=kr, pcgrad=pcgrad
    )
    trainer = TKITrainer(tiny_llama(), args=args, train_dataset=rows(), processing_class=tiny_tokenizer(),
                         peft_config=tki_config())  # fmt: skip
    trainer.train()
    if trainer.accelerator.is_main_process:
        trainer.model.save_pretrained(f"{output_dir}/adapter")


if __name__ == "__main__":
    output, store, batch, accumulation, kr, pcgrad = sys.argv[1:]
    main(output, store, int(batch), int(accumulation), kr == "kr", pcgrad == "pcgrad")
