"""TKI end to end: data -> query embeddings -> KR stage 1 -> training -> evaluation on unseen tasks -> adapter.

    python recipes/sni_llama.py                                   # embedded preset: SmolLM2-135M on a P3 slice, CPU
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/sni_llama.py --preset paper \\
        --train_data path/to/natural-instructions                 # the paper: Llama-3.1-8B on SNI, GPUs

Every `TKIConfig` field is a flag (or a key of a YAML file given with ``--config``); a preset only sets
defaults. Each stage resumes from what an earlier run left in ``output_dir``: cached query embeddings and
prior inputs, the last checkpoint, the predictions. ``resolved_config.json`` records every value and where it
came from (the paper, our choice, or you).
"""

from __future__ import annotations

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
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint
from trl import TrlParser

from tki_trainer import (
    LatentLoraConfig,
    TKIConfig,
    TKITrainer,
    add_query_embeddings,
    load_embedded_model,
)
from tki_trainer.data import (
    as_conversational,
    fit_prompts,
    group_references,
    load_p3,
    load_sni,
    sni_from_hub_rows,
    sni_splits,
)
from tki_trainer.embedded import load_query_encoder
from tki_trainer.evaluation import answer_budgets, generate_answers, score_by
from tki_trainer.hub import push_adapter, render_model_card, write_model_card


HERE = Path(__file__).parent
PAPER, OURS = "paper", "ours"

PRESETS: dict[str, dict[str, tuple[object, str]]] = {
    "paper": {
        "model_name_or_path": ("meta-llama/Llama-3.1-8B-Instruct", PAPER),
        "encoder": ("FacebookAI/roberta-base", PAPER),
        "num_groups": (16, PAPER),
        "keys_per_group": (12, PAPER),
        "top_k": (2, PAPER),
        "r": (8, PAPER),
        "lora_target": ("all-linear", PAPER),
        "lora_alpha": (16, OURS),
        "latent_r": (8, OURS),
        "latent_alpha": (16, OURS),
        "latent_target_modules": ("q_proj,v_proj", OURS),
        "max_instances_per_task": (100, PAPER),
        "num_validation_tasks": (128, OURS),
        "per_device_train_batch_size": (1, PAPER),
        "gradient_accumulation_steps": (4, PAPER),
        "learning_rate": (1e-5, PAPER),
        "num_train_epochs": (3, PAPER),
        "reinstatement_alpha": (1.0, PAPER),
        "prior_inputs_steps": (3, PAPER),
        "prior_inputs_learning_rate": (5e-6, PAPER),
        "prior_inputs_wasserstein_weight": (1.0, OURS),
        "max_length": (512, OURS),
        "bf16": (True, OURS),
    },
    "embedded": {
        "model_name_or_path": ("embedded", OURS),
        "encoder": ("embedded", OURS),
        "train_data": (str(HERE / "data" / "p3_slice" / "train.jsonl.gz"), OURS),
        "eval_data": (str(HERE / "data" / "p3_slice" / "heldout.jsonl.gz"), OURS),
        "num_train_rows": (128, OURS),
        "num_eval_prompts": (96, OURS),
        "num_groups": (4, OURS),
        "keys_per_group": (8, OURS),
        "top_k": (2, OURS),
        "r": (8, OURS),
        "lora_target": ("all-linear", OURS),
        "lora_alpha": (16, OURS),
        "latent_r": (8, OURS),
        "latent_alpha": (16, OURS),
        "latent_target_modules": ("q_proj,v_proj", OURS),
        "per_device_train_batch_size": (4, OURS),
        "gradient_accumulation_steps": (1, OURS),
        "learning_rate": (2e-4, OURS),
        "num_train_epochs": (1, OURS),
        "max_length": (256, OURS),
        "prior_inputs_steps": (3, OURS),
        "prior_inputs_learning_rate": (1e-3, OURS),
        "use_cpu": (True, OURS),
        "bf16": (False, OURS),
        "activation_checkpointing": (False, OURS),
        "save_steps": (10, OURS),
        "save_total_limit": (1, OURS),
    },
}


@dataclass
class RecipeArguments:
    preset: str = field(default="embedded", metadata={"help": "'embedded' (CPU, SmolLM2-135M, P3 slice) or 'paper'.", "choices": ["embedded", "paper"]})
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "'embedded', a local path or a Hub id."})
    encoder: Optional[str] = field(default=None, metadata={"help": "Query encoder: 'embedded' or a sentence-transformers name."})
    train_data: Optional[str] = field(
        default=None, metadata={"help": "P3 .jsonl.gz, a natural-instructions checkout (paper), or an SNI Hub dataset id."}
    )
    eval_data: Optional[str] = field(default=None, metadata={"help": "P3 held-out .jsonl.gz (embedded preset)."})
    num_train_rows: Optional[int] = field(default=None, metadata={"help": "Seeded subset of training rows."})
    num_eval_prompts: Optional[int] = field(default=None, metadata={"help": "Seeded subset of held-out prompts, equal per cluster."})
    max_instances_per_task: int = field(default=100, metadata={"help": "SNI: instances sampled per task."})
    num_validation_tasks: int = field(default=128, metadata={"help": "SNI: validation tasks cut from the train list."})
    num_groups: Optional[int] = field(default=None, metadata={"help": "C, latent-task groups."})
    keys_per_group: Optional[int] = field(default=None, metadata={"help": "Q, latent tasks per group."})
    top_k: Optional[int] = field(default=None, metadata={"help": "k, latent tasks blended per example."})
    r: Optional[int] = field(default=None, metadata={"help": "Shared LoRA rank."})
    lora_alpha: Optional[int] = field(default=None, metadata={"help": "Shared LoRA alpha."})
    lora_target: Optional[str] = field(default=None, metadata={"help": "Shared LoRA modules ('all-linear' or comma list)."})
    latent_r: Optional[int] = field(default=None, metadata={"help": "Rank of each latent increment."})
    latent_alpha: Optional[float] = field(default=None, metadata={"help": "Latent bank alpha."})
    latent_target_modules: Optional[str] = field(default=None, metadata={"help": "Comma list of modules holding the bank."})
    eval_batch_size: int = field(default=8, metadata={"help": "Prompts generated together in evaluation."})


RECIPE_FIELDS = {f for f in RecipeArguments.__dataclass_fields__}


def preset_defaults(argv: list[str]) -> tuple[str, dict[str, tuple[object, str]]]:
    """The preset named on the command line (or the default) and its values."""
    preset = argv[argv.index("--preset") + 1] if "--preset" in argv else "embedded"
    if preset not in PRESETS:
        raise SystemExit(f"sni_llama.py: unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    return preset, PRESETS[preset]


def parse(argv: list[str]) -> tuple[RecipeArguments, TKIConfig, dict[str, dict]]:
    """Parse flags and YAML over the preset's defaults; return the arguments and the resolved-config record."""
    preset, defaults = preset_defaults(argv)
    parser = TrlParser((RecipeArguments, TKIConfig))
    parser.set_defaults(**{key: value for key, (value, _) in defaults.items()})
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
            resolved[key] = {"value": "<redacted>" if key.endswith("_token") and value else value, "origin": origin}
    return recipe, config, resolved


def check_invocation(recipe: RecipeArguments, config: TKIConfig) -> None:
    """Refuse in the first seconds what would fail later: missing data, no Hub token, a model the memory cannot hold."""
    for name in ("train_data", "eval_data"):
        path = getattr(recipe, name)
        if path and (path.startswith(("/", ".", "~")) or os.sep in path) and not Path(path).expanduser().exists():
            raise SystemExit(f"sni_llama.py: --{name} {path} does not exist.")
    if recipe.preset == "paper" and not recipe.train_data:
        raise SystemExit("sni_llama.py: the paper preset needs --train_data (a natural-instructions checkout or an SNI Hub dataset id).")
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


def load_model(recipe: RecipeArguments, config: TKIConfig):
    if recipe.model_name_or_path == "embedded":
        return load_embedded_model()
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(recipe.model_name_or_path, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(recipe.model_name_or_path)


def load_data(recipe: RecipeArguments, config: TKIConfig, tokenizer) -> tuple[Dataset, Dataset, str]:
    """Training rows and evaluation rows (one per prompt, with ``references``), fitted into max_length."""
    if recipe.preset == "paper":
        source = Path(recipe.train_data)
        if source.is_dir():
            splits = sni_splits(source, recipe.num_validation_tasks, seed=config.seed)
            train = load_sni(source, splits["train"], max_instances=recipe.max_instances_per_task, seed=config.seed, conversational=True)
            evaluation = load_sni(source, splits["test"], max_instances=recipe.max_instances_per_task, seed=config.seed, conversational=True)
        else:
            from datasets import load_dataset

            train = sni_from_hub_rows(load_dataset(recipe.train_data, split="train"), conversational=True)
            evaluation = sni_from_hub_rows(load_dataset(recipe.train_data, split="test"), conversational=True)
        group = "task"
    else:
        train = load_p3(recipe.train_data, limit=recipe.num_train_rows, seed=config.seed, conversational=True)
        held = group_references(load_p3(recipe.eval_data, seed=config.seed))
        if recipe.num_eval_prompts:
            per_cluster = recipe.num_eval_prompts // len(held.unique("cluster"))
            keep = []
            for cluster in sorted(held.unique("cluster")):
                keep += [i for i, c in enumerate(held["cluster"]) if c == cluster][:per_cluster]
            held = held.select(sorted(keep))
        evaluation = as_conversational(held)
        group = "cluster"
    train, train_fit = fit_prompts(train, tokenizer, config.max_length)
    evaluation, eval_fit = fit_prompts(evaluation, tokenizer, config.max_length)
    print(f"train rows: {len(train)} ({train_fit}); evaluation prompts: {len(evaluation)} ({eval_fit})")
    return train, evaluation, group


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    start = time.time()
    recipe, config, resolved = parse(argv)
    check_invocation(recipe, config)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "resolved_config.json").write_text(json.dumps(resolved, indent=2, default=str))

    model, tokenizer = load_model(recipe, config)
    train, evaluation, group = load_data(recipe, config, tokenizer)
    encoder = load_query_encoder(recipe.encoder)
    cache = output_dir / "_tki_cache" / "queries"
    train = add_query_embeddings(train, encoder, cache_dir=cache)
    evaluation = add_query_embeddings(evaluation, encoder, cache_dir=cache)

    peft_config = LatentLoraConfig(
        r=recipe.r,
        lora_alpha=recipe.lora_alpha,
        target_modules=recipe.lora_target if recipe.lora_target == "all-linear" else recipe.lora_target.split(","),
        latent_r=recipe.latent_r,
        latent_alpha=recipe.latent_alpha,
        latent_target_modules=recipe.latent_target_modules.split(","),
        num_groups=recipe.num_groups,
        keys_per_group=recipe.keys_per_group,
        top_k=recipe.top_k,
        key_dim=len(train[0]["query_embedding"]),
        encoder_name=recipe.encoder if recipe.encoder != "embedded" else "sentence-transformers/all-MiniLM-L6-v2",
        encoder_dim=len(train[0]["query_embedding"]),
    )
    adapter_dir = output_dir / "adapter"
    if (adapter_dir / "adapter_model.safetensors").is_file():
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    else:
        trainer = TKITrainer(model, args=config, train_dataset=train, processing_class=tokenizer, peft_config=peft_config)
        trainer.train(resume_from_checkpoint=get_last_checkpoint(str(output_dir)))
        model = trainer.accelerator.unwrap_model(trainer.model)
        if trainer.accelerator.is_main_process:
            model.save_pretrained(str(adapter_dir))
    state = PartialState()
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}

    metrics_file = output_dir / "metrics.json"
    predictions_file = output_dir / "predictions.jsonl"
    if predictions_file.is_file():
        answers = [json.loads(line)["prediction"] for line in predictions_file.read_text().splitlines()]
    else:
        budgets = answer_budgets(tokenizer, evaluation["references"], evaluation[group])
        answers = generate_answers(model, tokenizer, evaluation, max_new_tokens=budgets, group_column=group,
                                   batch_size=recipe.eval_batch_size)
        predictions_file.write_text("".join(
            json.dumps({"id": row["id"], group: row[group], "prediction": answer, "references": row["references"]}) + "\n"
            for row, answer in zip(evaluation, answers)
        ))
    metrics = score_by(answers, evaluation["references"], evaluation[group])
    metrics_file.write_text(json.dumps({"metrics": metrics, "preset": recipe.preset, "seconds": time.time() - start}, indent=2))
    table = results_table(metrics, group)
    repo_id = config.hub_model_id or output_dir.name
    card_config = model.peft_config["default"]
    write_model_card(adapter_dir, render_model_card(
        card_config,
        repo_id=repo_id,
        training_data=f"{len(train)} prompt/completion rows from `{recipe.train_data}` (preset `{recipe.preset}`), "
        f"at most {config.max_length} tokens, {config.num_train_epochs:g} epoch(s).",
        evaluation=f"Greedy answers on {len(evaluation)} prompts of unseen tasks (`{recipe.eval_data or recipe.train_data}`), "
        f"x100, best over each prompt's references:\n\n{table}",
    ))
    if config.push_to_hub:
        push_adapter(adapter_dir, repo_id, token=config.hub_token, revision=config.hub_revision, private=config.hub_private_repo)

    print(f"\nadapter: {adapter_dir}\npredictions: {predictions_file}\nmetrics: {metrics_file}\nresolved config: {output_dir / 'resolved_config.json'}")
    print(f"\n{table}\n\ntotal {time.time() - start:.0f} s")
    return metrics


def results_table(metrics: dict[str, dict[str, float]], group: str) -> str:
    lines = [f"| {group} | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-L | EM |", "|---|---|---|---|---|---|"]
    for name, values in metrics.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[k]:.1f}" for k in ("bleu", "rouge1", "rouge2", "rougeL", "exact_match")) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
