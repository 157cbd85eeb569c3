"""TKI end to end: data -> query embeddings -> KR stage 1 -> training -> evaluation on unseen tasks -> adapter.

    python recipes/sni_llama.py                                   # embedded preset: SmolLM2-135M on an SNI slice, CPU
    python recipes/sni_llama.py --lta false --kr false --pcgrad false   # the same job as plain LoRA SFT
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/sni_llama.py --preset paper \\
        --train_data path/to/natural-instructions                 # the paper: Llama-3.1-8B on SNI, GPUs

Trains on the train tasks of Super-NaturalInstructions' default split and evaluates greedy answers on its test
tasks (unseen), beside the base model and SNI's two copy heuristics on the same prompts. Every `TKIConfig` field is
a flag (or a key of a YAML file given with ``--config``); a preset only sets defaults. Each stage resumes from
what an earlier run left in ``output_dir``: cached query embeddings and prior inputs, the last checkpoint, the
predictions. ``resolved_config.json`` records every value and where it came from (the paper, our choice, or you).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from accelerate import PartialState
from datasets import Dataset
from peft import PeftConfig
from transformers import PreTrainedModel
from transformers.trainer_utils import get_last_checkpoint
from trl import TrlParser

from tki_trainer import TKIConfig, TKITrainer, preparation
from tki_trainer._io import staged_file
from tki_trainer.data import (
    fitted_subset,
    group_references,
    load_p3,
    load_sni,
    sni_from_hub_rows,
    sni_splits,
)
from tki_trainer.embedded import load_model
from tki_trainer.evaluation import (
    answer_budgets,
    generate_answers,
    saved_answers,
    score_by,
    score_heuristics,
    side_by_side,
)
from tki_trainer.hub import public_name
from tki_trainer.presets import PRESETS, latent_bank, shared_lora_config


@dataclass
class RecipeArguments:
    preset: str = field(
        default="embedded",
        metadata={"help": "'embedded' (CPU, SmolLM2-135M, SNI slice) or 'paper'.", "choices": ["embedded", "paper"]},
    )
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "'embedded', a local path or a Hub id."})
    train_data: Optional[str] = field(
        default=None,
        metadata={"help": "A natural-instructions checkout, an SNI Hub dataset id, or P3 rows (.jsonl[.gz])."},
    )
    eval_data: Optional[str] = field(
        default=None,
        metadata={"help": "P3 held-out .jsonl.gz to evaluate on instead of the SNI test tasks (a second unseen set)."},
    )
    num_train_rows: Optional[int] = field(default=None, metadata={"help": "Seeded subset of training rows."})
    num_eval_prompts: Optional[int] = field(
        default=None, metadata={"help": "Seeded subset of evaluation prompts, equal per task (or P3 cluster)."}
    )
    max_instances_per_task: int = field(default=100, metadata={"help": "SNI: instances sampled per task."})
    num_validation_tasks: int = field(default=128, metadata={"help": "SNI: validation tasks cut from the train list."})
    num_groups: Optional[int] = field(default=None, metadata={"help": "C, latent-task groups."})
    keys_per_group: Optional[int] = field(default=None, metadata={"help": "Q, latent tasks per group."})
    top_k: Optional[int] = field(default=None, metadata={"help": "k, latent tasks blended per example."})
    r: Optional[int] = field(default=None, metadata={"help": "Shared LoRA rank."})
    lora_alpha: Optional[int] = field(default=None, metadata={"help": "Shared LoRA alpha."})
    lora_target: Optional[str] = field(
        default=None, metadata={"help": "Shared LoRA modules ('all-linear' or a comma list)."}
    )
    latent_r: Optional[int] = field(default=None, metadata={"help": "Rank of each latent increment."})
    latent_alpha: Optional[float] = field(default=None, metadata={"help": "Latent bank alpha."})
    latent_target_modules: Optional[str] = field(
        default=None, metadata={"help": "Comma list of modules holding the bank."}
    )
    eval_batch_size: int = field(default=8, metadata={"help": "Prompts generated together in evaluation."})
    evaluate_base_model: bool = field(
        default=True, metadata={"help": "Also answer the evaluation prompts with the base model (adapters off)."}
    )


ADAPTER_FIELDS = ("r", "lora_alpha", "lora_target", "latent_r", "latent_alpha", "latent_target_modules", "num_groups",
                  "keys_per_group", "top_k")  # fmt: skip


def parse(argv: list[str]) -> tuple[RecipeArguments, TKIConfig, dict[str, dict]]:
    """Parse flags and YAML over the preset's defaults; return the arguments and the resolved-config record."""
    preset = argv[argv.index("--preset") + 1] if "--preset" in argv else "embedded"
    if preset not in PRESETS:
        raise SystemExit(f"sni_llama.py: unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    defaults = PRESETS[preset]
    parser = TrlParser((RecipeArguments, TKIConfig))
    parser.set_defaults(**{key: value for key, (value, _) in defaults.items()})
    parser.set_defaults(kr=True)  # the paper's job: KR on (refused if it cannot run), not decided from the rows
    if "--output_dir" not in argv:
        parser.set_defaults(output_dir=f"outputs/tki-{preset}")
    recipe, config = parser.parse_args_and_config(argv)
    given = {arg.lstrip("-").split("=")[0] for arg in argv if arg.startswith("--")}
    resolved = {}
    for source in (recipe, config):
        for key, value in vars(source).items():
            if key in given:
                origin = "user"
            elif key in defaults:
                origin = defaults[key][1]
            else:
                continue
            if key.endswith("_token") and value:
                value = "<redacted>"
            elif isinstance(value, str):
                value = public_name(value)  # the record is uploaded with the adapter: no local directories
            resolved[key] = {"value": value, "origin": origin}
    return recipe, config, resolved


def check_invocation(recipe: RecipeArguments, config: TKIConfig) -> None:
    """Refuse in the first seconds what would fail later: missing data, no Hub token, a model the memory cannot hold."""
    for name in ("train_data", "eval_data"):
        path = getattr(recipe, name)
        if path and path.startswith(("/", ".", "~")) and not Path(path).expanduser().exists():
            raise SystemExit(f"sni_llama.py: --{name} {path} does not exist.")
    if recipe.preset == "paper" and not recipe.train_data:
        raise SystemExit(
            "sni_llama.py: the paper preset needs --train_data (a natural-instructions checkout or an SNI Hub dataset id)."
        )
    if config.push_to_hub:
        from huggingface_hub import get_token

        if not (config.hub_token or get_token()):
            raise SystemExit("sni_llama.py: --push_to_hub needs a Hub token: run `hf auth login` or set HF_TOKEN.")
    path = Path(recipe.model_name_or_path or "")
    if path.is_dir():
        weights = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        if config.use_cpu and weights * 3 > available:
            raise SystemExit(
                f"sni_llama.py: {path} holds {weights / 2**30:.1f} GiB of weights; training it needs about three times "
                f"that, more than the {available / 2**30:.1f} GiB free here. Use a smaller model or a GPU machine."
            )


def load_data(recipe: RecipeArguments, config: TKIConfig, tokenizer) -> tuple[Dataset, Dataset, str]:
    """Training rows and evaluation rows (one per prompt, with ``references``), fitted into max_length, and the
    column that results are reported (and generation is batched) by: SNI's task category, or P3's cluster."""
    source = Path(recipe.train_data)
    per_task = {"max_instances": recipe.max_instances_per_task, "seed": config.seed}
    if source.is_dir():
        splits = sni_splits(source, recipe.num_validation_tasks, seed=config.seed)
        train = load_sni(source, splits["train"], **per_task)
        evaluation = load_sni(source, splits["test"], **per_task)
    elif recipe.train_data.endswith((".jsonl", ".jsonl.gz")):
        train = load_p3(recipe.train_data, seed=config.seed)
        evaluation = None
    else:
        from datasets import load_dataset

        train = sni_from_hub_rows(load_dataset(recipe.train_data, split="train"), **per_task)
        evaluation = sni_from_hub_rows(load_dataset(recipe.train_data, split="test"), **per_task)
    if recipe.eval_data:
        evaluation = group_references(load_p3(recipe.eval_data, seed=config.seed))
    elif evaluation is None:
        raise SystemExit("sni_llama.py: P3 training rows need --eval_data (a P3 held-out .jsonl.gz).")
    group = next(column for column in ("category", "cluster", "task") if column in evaluation.column_names)
    fitted = []
    for name, rows, total in (
        ("train", train, recipe.num_train_rows),
        ("evaluation", evaluation, recipe.num_eval_prompts),
    ):
        column = "task" if "task" in rows.column_names else "cluster"
        rows, report = fitted_subset(rows, tokenizer, config.max_length, column=column, total=total, seed=config.seed)
        fitted.append(rows)
        print(f"{name}: {report}; {len(rows)} of them used")
    return fitted[0], fitted[1], group


def adapter_config(
    recipe: RecipeArguments, config: TKIConfig, model: PreTrainedModel, train: Dataset
) -> PeftConfig | None:
    """The preset's adapter with the command line's overrides, built as the trainer builds one: TKI with ``lta``
    (keyed by the query encoder), its shared LoRA alone without."""
    overrides = {name: getattr(recipe, name) for name in ADAPTER_FIELDS}
    lora = shared_lora_config(recipe.preset, **overrides)
    return preparation.adapter_config(model, config, lora, [train], **latent_bank(recipe.preset, **overrides))


def evaluate(trainer: TKITrainer, evaluation: Dataset, group: str, recipe: RecipeArguments, output_dir: Path):
    """Greedy answers of the adapter (and of the base model, adapters off) on the evaluation prompts, ``{system:
    answers}``; each system's predictions are saved (whole or not at all) and reused on a rerun."""
    model, tokenizer = trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class
    budgets = answer_budgets(tokenizer, evaluation["references"], evaluation[group])
    systems = {"adapter": False, "base": True} if recipe.evaluate_base_model else {"adapter": False}
    answers = {}
    for name, adapters_off in systems.items():
        path = output_dir / ("predictions.jsonl" if name == "adapter" else f"predictions_{name}.jsonl")

        def answer(adapters_off: bool = adapters_off) -> list[str]:
            with model.disable_adapter() if adapters_off else contextlib.nullcontext():
                return generate_answers(model, tokenizer, evaluation, max_new_tokens=budgets, group_column=group,
                                        batch_size=recipe.eval_batch_size)  # fmt: skip

        answers[name] = saved_answers(path, evaluation, group, answer)
    return answers


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    start = time.time()
    recipe, config, resolved = parse(argv)
    check_invocation(recipe, config)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with staged_file(output_dir / "resolved_config.json") as staging:
        staging.write_text(json.dumps(resolved, indent=2, default=str))

    model, tokenizer = load_model(recipe.model_name_or_path, torch.bfloat16 if config.bf16 else torch.float32)
    train, evaluation, group = load_data(recipe, config, tokenizer)
    trainer = TKITrainer(model, args=config, train_dataset=train, processing_class=tokenizer,
                         peft_config=adapter_config(recipe, config, model, train))  # fmt: skip
    trainer.train(resume_from_checkpoint=get_last_checkpoint(str(output_dir)))
    trainer.save_model(_internal_call=True)  # the push, if asked, comes once, with the evaluation in the card
    if not PartialState().is_main_process:
        return {}

    evaluation = preparation.prepare_rows(evaluation, config, model=trainer.model, name="eval")
    answers = evaluate(trainer, evaluation, group, recipe, output_dir)
    results = {name: score_by(values, evaluation["references"], evaluation[group]) for name, values in answers.items()}
    if {"instance_input", "demo_output"} <= set(evaluation.column_names):
        results.update(score_heuristics(evaluation, group))
    (output_dir / "metrics.json").write_text(
        json.dumps({"metrics": results, "preset": recipe.preset, "seconds": time.time() - start}, indent=2)
    )
    table = results_table(results["adapter"], group)
    rouge = side_by_side(results, metric="rougeL", group=group)
    source = recipe.eval_data or f"the test tasks of {recipe.train_data}"
    card = (
        f"Greedy answers on {len(evaluation)} prompts of unseen tasks ({source}), x100, best over each prompt's "
        f"references:\n\n{table}\n\nROUGE-L beside the base model and SNI's copy heuristics on the same prompts:"
        f"\n\n{rouge}"
    )
    trainer.create_model_card(dataset_name=recipe.train_data, evaluation=card)
    if config.push_to_hub:
        trainer.push_to_hub(dataset_name=recipe.train_data, evaluation=card)
    print(f"\nadapter, predictions and metrics: {output_dir}\nresolved config: {output_dir / 'resolved_config.json'}")
    print(f"\n{table}\n\nROUGE-L:\n{rouge}\n\ntotal {time.time() - start:.0f} s")
    return results


def results_table(metrics: dict[str, dict[str, float]], group: str) -> str:
    lines = [f"| {group} | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-L | EM |", "|---|---|---|---|---|---|"]
    for name, values in metrics.items():
        scores = " | ".join(f"{values[k]:.1f}" for k in ("bleu", "rouge1", "rouge2", "rougeL", "exact_match"))
        lines.append(f"| {name} | {scores} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
