"""Train TAGI's two tiny teachers with `train_teachers`; run by test_distributed.py with one process (``python``)
and with two (``accelerate launch``), every process calling it as the recipe does."""

import sys
from pathlib import Path

from peft import LoraConfig
from trl import SFTConfig

from conftest import tiny_llama, tiny_tokenizer
from test_tagi_trainer import rows
from test_trainer import common
from tki_trainer.tagi import train_teachers


def main(output_dir: str, batch: int) -> None:
    settings = common(Path(output_dir), "run", max_steps=2, per_device_train_batch_size=batch,
                      train_sampling_strategy="sequential")  # fmt: skip
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    train_teachers(tiny_llama, rows(), SFTConfig(**settings), config, Path(output_dir) / "teachers", tiny_tokenizer())


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
