"""Train TAGI's hypernetwork on the tiny model for two steps with two teachers and save it; run by
test_distributed.py with one process (``python``) and with two (``accelerate launch``)."""

import json
import sys
from pathlib import Path

from conftest import tiny_tokenizer
from test_tagi import tagi_model
from test_tagi_trainer import LAYOUT, rows
from test_trainer import common
from tki_trainer.tagi import TAGIConfig, TAGITrainer


def main(output_dir: str, teacher_a: str, teacher_b: str, batch: int, accumulation: int) -> None:
    settings = common(
        Path(output_dir), "run", max_steps=2, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, learning_rate=1e-3, train_sampling_strategy="sequential",
    )  # fmt: skip
    args = TAGIConfig(**settings, teachers={"a": teacher_a, "b": teacher_b}, kl_weight=1.0, matching_weight=1.0)
    trainer = TAGITrainer(tagi_model(), args=args, train_dataset=rows(LAYOUT), processing_class=tiny_tokenizer())
    trainer.train()
    if trainer.accelerator.is_main_process:
        trainer.model.save_pretrained(f"{output_dir}/adapter")
        Path(output_dir, "logs.json").write_text(json.dumps(trainer.state.log_history))


if __name__ == "__main__":
    output, teacher_a, teacher_b, batch, accumulation = sys.argv[1:]
    main(output, teacher_a, teacher_b, int(batch), int(accumulation))
