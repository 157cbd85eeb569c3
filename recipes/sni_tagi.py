"""TAGI end to end: teachers per task category -> hypernetwork fine-tuning -> unseen tasks, instruction read once.

    python recipes/sni_tagi.py                                    # embedded preset: SmolLM2-135M, SNI slice, CPU
    python recipes/sni_tagi.py --demonstrations 2                 # instructions with two positive examples
    python recipes/sni_tagi.py --kl_weight 0 --matching_weight 0  # ablation: prediction loss alone
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/sni_tagi.py --preset paper \\
        --train_data path/to/natural-instructions                 # GPUs

Stages, each resumed from what an earlier run left in ``output_dir``: (1) one LoRA teacher per top-level SNI task
category of the train tasks, trained by `SFTTrainer` on the rows with the instruction in the prompt
(``teachers/<category>``; a teacher saved with other rows or settings is refused); (2) the hypernetwork, trained
by `TAGITrainer` with the student reading the input alone (checkpoints in ``output_dir``); (3) greedy answers on
the test tasks (unseen): the generated adapters reading the input alone, beside the base model reading
instruction + input (predictions saved per system). Every `TAGIConfig` field is a flag; ``resolved_config.json`` records each value and its origin (TAGI's paper or code, our choice, you).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from accelerate import PartialState
from datasets import Dataset
from peft import LoraConfig
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, TrlParser

from tki_trainer._io import staged_file
from tki_trainer.data import add_query_embeddings, fitted_subset, load_sni, sni_splits
from tki_trainer.embedded import load_model
from tki_trainer.evaluation import answer_budgets, generate_answers, saved_answers, score_by, side_by_side
from tki_trainer.hub import public_name
from tki_trainer.preparation import query_encoder
from tki_trainer.presets import TAGI_PRESETS
from tki_trainer.tagi import InstructionLoraConfig, TAGIConfig, TAGITrainer, sni_instruction_rows, train_teachers
from tki_trainer.tagi.rows import teacher_prompt


@dataclass
class RecipeArguments:
    preset: str = field(
        default="embedded",
        metadata={"help": "'embedded' (CPU, SmolLM2-135M, SNI slice) or 'paper'.", "choices": ["embedded", "paper"]},
    )
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "'embedded', a local path or a Hub id."})
    train_data: Optional[str] = field(default=None, metadata={"help": "A natural-instructions checkout."})
    num_train_rows: Optional[int] = field(default=None, metadata={"help": "Seeded subset of training rows."})
    num_eval_prompts: Optional[int] = field(default=None, metadata={"help": "Seeded subset of test prompts."})
    max_instances_per_task: int = field(default=100, metadata={"help": "Instances sampled per task."})
    num_validation_tasks: int = field(default=0, metadata={"help": "Validation tasks cut from the train list."})
    demonstrations: int = field(default=0, metadata={"help": "Positive examples in the instruction (0 or 2)."})
    r: int = field(default=8, metadata={"help": "Rank of the teachers and of the generated LoRAs."})
    lora_alpha: int = field(default=16, metadata={"help": "Alpha of the teachers and of the generated LoRAs."})
    lora_target: str = field(default="q_proj,v_proj", metadata={"help": "Comma list of adapted modules."})
    teacher_epochs: float = field(default=2, metadata={"help": "Epochs of each teacher's training."})
    teacher_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of the teachers."})
    eval_batch_size: int = field(default=8, metadata={"help": "Prompts generated together in evaluation."})


def parse(argv: list[str]) -> tuple[RecipeArguments, TAGIConfig, dict[str, dict]]:
    """Flags and YAML over the preset's defaults, and the resolved-config record (value and origin of each)."""
    preset = argv[argv.index("--preset") + 1] if "--preset" in argv else "embedded"
    if preset not in TAGI_PRESETS:
        raise SystemExit(f"sni_tagi.py: unknown preset {preset!r}; choose one of {sorted(TAGI_PRESETS)}.")
    defaults = TAGI_PRESETS[preset]
    parser = TrlParser((RecipeArguments, TAGIConfig))
    parser.set_defaults(**{key: value for key, (value, _) in defaults.items()})
    if "--output_dir" not in argv:
        parser.set_defaults(output_dir=f"outputs/tagi-{preset}")
    parser.set_defaults(teachers={})  # filled by stage 1
    recipe, config = parser.parse_args_and_config(argv)
    given = {arg.lstrip("-").split("=")[0] for arg in argv if arg.startswith("--")}
    resolved = {
        key: {"value": public_name(value) if isinstance(value, str) else value,
              "origin": "user" if key in given else defaults[key][1]}
        for source in (recipe, config) for key, value in vars(source).items() if key in given or key in defaults
    }  # fmt: skip
    if recipe.preset == "paper" and not recipe.train_data:
        raise SystemExit("sni_tagi.py: the paper preset needs --train_data (a natural-instructions checkout).")
    if recipe.train_data and not Path(recipe.train_data).expanduser().is_dir():
        raise SystemExit(f"sni_tagi.py: --train_data {recipe.train_data} is not a natural-instructions checkout.")
    return recipe, config, resolved


def load_rows(recipe: RecipeArguments, config: TAGIConfig, tokenizer) -> tuple[Dataset, Dataset]:
    """Train and test rows fitted into max_length with the instruction in the prompt, then split (the instruction
    in its own column, the prompt the instance alone, the teacher the task's top-level category)."""
    source = Path(recipe.train_data).expanduser()
    splits = sni_splits(source, recipe.num_validation_tasks, seed=config.seed)
    rows = []
    for split, total in (("train", recipe.num_train_rows), ("test", recipe.num_eval_prompts)):
        loaded = load_sni(source, splits[split], max_instances=recipe.max_instances_per_task,
                          num_positive=recipe.demonstrations, seed=config.seed)  # fmt: skip
        fitted, report = fitted_subset(
            loaded, tokenizer, config.max_length, column="task", total=total, seed=config.seed
        )
        print(f"{split}: {report}; {len(fitted)} of them used")
        rows.append(sni_instruction_rows(fitted, config.teacher_separator))
    return rows[0], rows[1]


def teachers(recipe: RecipeArguments, config: TAGIConfig, train: Dataset, tokenizer) -> dict[str, str]:
    """Stage 1: one LoRA per category of the train rows in ``output_dir/teachers`` (`train_teachers`)."""
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    args = SFTConfig(
        output_dir=str(Path(config.output_dir) / "teacher-run"),
        num_train_epochs=recipe.teacher_epochs,
        learning_rate=recipe.teacher_learning_rate,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_length=config.max_length,
        bf16=config.bf16,
        use_cpu=config.use_cpu,
        seed=config.seed,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    return train_teachers(
        lambda: load_model(recipe.model_name_or_path, dtype)[0], train, args, lora_config(recipe),
        Path(config.output_dir) / "teachers", tokenizer, separator=config.teacher_separator,
    )  # fmt: skip


def target_modules(recipe: RecipeArguments) -> str | list[str]:
    return recipe.lora_target if recipe.lora_target == "all-linear" else recipe.lora_target.split(",")


def lora_config(recipe: RecipeArguments) -> LoraConfig:
    return LoraConfig(r=recipe.r, lora_alpha=recipe.lora_alpha, target_modules=target_modules(recipe),
                      task_type="CAUSAL_LM")  # fmt: skip


def evaluate(trainer: TAGITrainer, test: Dataset, recipe: RecipeArguments, output_dir: Path) -> dict[str, list[str]]:
    """Greedy answers of the generated adapters (input alone) and of the base model (instruction + input), saved
    per system and reused on a rerun."""
    model, tokenizer = trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class
    budgets = answer_budgets(tokenizer, test["references"], test["category"])
    separator = trainer.args.teacher_separator
    with_instruction = test.map(lambda row: {"prompt": teacher_prompt(row["prompt"], row["instruction"], separator)})
    answers = {}
    for name, rows, adapters_off in (("tagi", test, False), ("base, instruction in prompt", with_instruction, True)):
        path = output_dir / f"predictions_{re.sub(r'[^a-z]+', '_', name).strip('_')}.jsonl"

        def answer(rows: Dataset = rows, adapters_off: bool = adapters_off) -> list[str]:
            with model.disable_adapter() if adapters_off else contextlib.nullcontext():
                return generate_answers(model, tokenizer, rows, max_new_tokens=budgets, group_column="category",
                                        batch_size=recipe.eval_batch_size)  # fmt: skip

        answers[name] = saved_answers(path, test, "category", answer)
    return answers


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    start = time.time()
    recipe, config, resolved = parse(argv)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with staged_file(output_dir / "resolved_config.json") as staging:
        staging.write_text(json.dumps(resolved, indent=2, default=str))

    dtype = torch.bfloat16 if config.bf16 else torch.float32
    _, tokenizer = load_model(recipe.model_name_or_path, dtype)
    train, test = load_rows(recipe, config, tokenizer)
    config.teachers = teachers(recipe, config, train, tokenizer)

    encoder = query_encoder(config.instruction_encoder)
    model, _ = load_model(recipe.model_name_or_path, dtype)
    adapter = InstructionLoraConfig(r=recipe.r, lora_alpha=recipe.lora_alpha, target_modules=target_modules(recipe),
                                    key_dim=encoder.get_embedding_dimension(), encoder_name=config.instruction_encoder,
                                    encoder_dim=encoder.get_embedding_dimension())  # fmt: skip
    trainer = TAGITrainer(model, args=config, train_dataset=train, processing_class=tokenizer, peft_config=adapter)
    trainer.train(resume_from_checkpoint=get_last_checkpoint(str(output_dir)))
    trainer.save_model()
    if not PartialState().is_main_process:
        return {}

    test = add_query_embeddings(test, encoder, column=config.instruction_embedding_column,
                                text_of=lambda row: row["instruction"])  # fmt: skip
    answers = evaluate(trainer, test, recipe, output_dir)
    results = {name: score_by(values, test["references"], test["category"]) for name, values in answers.items()}
    prompt_tokens = {
        name: sum(len(tokenizer(text)["input_ids"]) for text in texts)
        for name, texts in (
            ("input alone", [turns[-1]["content"] for turns in test["prompt"]]),
            ("instruction + input", [i + config.teacher_separator + t[-1]["content"]
                                     for i, t in zip(test["instruction"], test["prompt"])]),
        )
    }  # fmt: skip
    rouge = side_by_side(results, metric="rougeL", group="category")
    metrics = {"metrics": results, "prompt_tokens": prompt_tokens, "preset": recipe.preset,
               "seconds": time.time() - start}  # fmt: skip
    with staged_file(output_dir / "metrics.json") as staging:
        staging.write_text(json.dumps(metrics, indent=2))
    trainer.create_model_card(dataset_name=recipe.train_data)
    print(f"\nadapter, teachers, predictions and metrics: {output_dir}")
    print(f"\nROUGE-L on {len(test)} prompts of unseen tasks:\n{rouge}\n\nprompt tokens: {prompt_tokens}")
    print(f"\ntotal {time.time() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
