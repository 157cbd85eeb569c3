"""A training step of TAGI's hypernetwork against an SFT step of a plain LoRA on the same modules and rows.

Embedded model, SNI-slice rows of the recipe (instruction in its own column, the input as the prompt), batch 4,
rank 8 on q_proj/v_proj. Rows: LoRA SFT (`SFTTrainer`); TAGI on the prediction loss alone (the hypernetwork's
own cost); TAGI with two teachers (one per half of the tasks) and both terms (the teacher's forward without
gradients, the hypernetwork's second call for parameter matching). Configurations step on the same batch,
interleaved round by round, and are compared by the ratio of their medians in this one run.

    python bench/tagi_speed.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from trl import SFTConfig, SFTTrainer

from common import write_results
from speed import step
from tki_trainer import load_embedded_model
from tki_trainer.data import load_sni, sni_splits
from tki_trainer.presets import RECIPE_DATA
from tki_trainer.tagi import InstructionLoraConfig, TAGIConfig, TAGITrainer, sni_instruction_rows


BATCH = 4
MAX_LENGTH = 384
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])


def rows():
    source = RECIPE_DATA / "sni_slice"
    data = load_sni(source, sni_splits(source, 0)["train"][:4], max_instances=2, num_positive=0)
    data = sni_instruction_rows(data)
    tasks = sorted(set(data["task"]))
    return data.map(lambda row: {"teacher": "even" if tasks.index(row["task"]) % 2 == 0 else "odd"})


def teacher(path: Path, seed: int) -> str:
    model, _ = load_embedded_model()
    model = get_peft_model(model, LoraConfig(**LORA, task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    model.save_pretrained(path)
    return str(path)


def build(name: str, work: Path, data, teachers: dict[str, str]):
    model, tokenizer = load_embedded_model()
    common = dict(output_dir=str(work / name), per_device_train_batch_size=BATCH, max_length=MAX_LENGTH, use_cpu=True,
                  bf16=False, report_to="none", dataset_num_proc=None, train_sampling_strategy="sequential")  # fmt: skip
    if name == "sft":
        trainer = SFTTrainer(model, args=SFTConfig(**common), train_dataset=data.select_columns(["prompt", "completion"]),
                             processing_class=tokenizer, peft_config=LoraConfig(**LORA, task_type="CAUSAL_LM"))  # fmt: skip
    else:
        weights = dict(teachers=teachers) if name == "tagi" else dict(kl_weight=0, matching_weight=0)
        trainer = TAGITrainer(model, args=TAGIConfig(**common, **weights), train_dataset=data,
                              processing_class=tokenizer, peft_config=InstructionLoraConfig(**LORA))  # fmt: skip
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    trainer.model.train()
    return trainer, next(iter(trainer.get_train_dataloader()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    names = ["sft", "tagi_prediction", "tagi"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = rows()
        teachers = {"even": teacher(work / "even", 1), "odd": teacher(work / "odd", 2)}
        built = {name: build(name, work, data, teachers) for name in names}
        if any(not torch.equal(b["input_ids"], built["sft"][1]["input_ids"]) for _, b in built.values()):
            raise RuntimeError("the configurations' loaders gave different rows; the ratios would not be row for row")
        for trainer, batch in built.values():
            step(trainer, batch)  # warm-up
        times = {name: [] for name in names}
        for number in range(args.rounds):
            for name in names[number % len(names) :] + names[: number % len(names)]:
                times[name].append(step(*built[name]))
    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = {name: median[name] / median["sft"] for name in names}
    payload = {"median_seconds": median, "seconds": times, "over_sft": ratio,
               "config": {"rounds": args.rounds, "batch": BATCH, "max_length": MAX_LENGTH, "lora": LORA}}  # fmt: skip
    labels = {
        "sft": "LoRA SFT (SFTTrainer)",
        "tagi_prediction": "TAGI, prediction loss alone",
        "tagi": "TAGI, teachers: prediction + KL + parameter matching",
    }
    lines = [
        f"Training step (forward, backward, optimizer), embedded SmolLM2-135M, batch {BATCH} SNI-slice rows, rank 8 "
        f"on q_proj/v_proj, median of {args.rounds} interleaved rounds. Produced by `python bench/tagi_speed.py`.",
        "",
        "| configuration | median s | / SFT step |",
        "|---|---|---|",
        *(f"| {labels[name]} | {median[name]:.3f} | {ratio[name]:.2f} |" for name in names),
    ]
    text = "\n".join(lines)
    write_results("tagi_speed", payload, text)
    print(text)


if __name__ == "__main__":
    main()
