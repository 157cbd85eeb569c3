"""Extracting instruction vectors from a dataset of tasks (rows with a task name, an input and an output).

Per task: N-shot prompts built from the task's own examples give the task-conditioned head activations (mean
over the prompts answered correctly); counterfactual prompts give every head's causal effect. Over tasks: the
heads with the largest mean effect are kept, and each task's IV is the sum of its kept heads' activations
projected into the residual stream. Per-task results are stored as they finish (see `results`), so a rerun
into the same ``output_dir`` resumes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..modes import evaluation_mode
from .activations import task_activations
from .config import ACTIVATION_SETTINGS, EFFECT_SETTINGS, IVConfig
from .effects import causal_effects
from .heads import AttentionHeads
from .prompts import EncodedPrompt, encode_prompt, n_shot_prompts, task_generator
from .results import TaskResults, result_key
from .vector import InstructionVector


logger = logging.getLogger(__name__)


def group_tasks(rows: Iterable[Mapping[str, Any]], config: IVConfig) -> dict[str, list[tuple[str, str]]]:
    """The rows' ``(input, output)`` pairs per task, tasks in order of first appearance."""
    columns = (config.task_column, config.input_column, config.output_column)
    tasks: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        missing = [c for c in columns if c not in row]
        if missing:
            raise ValueError(
                f"Rows need the columns {columns}; a row lacks {missing}: rename the columns or set IVConfig's "
                "task_column / input_column / output_column."
            )
        tasks.setdefault(str(row[config.task_column]), []).append(
            (str(row[config.input_column]), str(row[config.output_column]))
        )
    if not tasks:
        raise ValueError("The dataset has no rows: give at least one task with more examples than IVConfig.shots.")
    empty = sorted({task for task, examples in tasks.items() if any(not output.strip() for _, output in examples)})
    if empty:
        raise ValueError(
            f"Tasks {empty} have rows with an empty output, which no prompt can be answered with: drop those rows."
        )
    small = {task: len(examples) for task, examples in tasks.items() if len(examples) <= config.shots}
    if small:
        raise ValueError(
            f"Each task needs more than shots={config.shots} examples (the demonstrations of a query are the task's "
            f"other examples); too few: {small}. Lower IVConfig.shots or give these tasks more examples."
        )
    return tasks


def _check_model_settings(heads: AttentionHeads, config: IVConfig) -> int:
    """The intervention layer, after refusing settings this model cannot have."""
    layers, per_layer, _ = heads.shape
    layer = layers // 3 if config.layer is None else config.layer
    if not 0 <= layer < layers:
        raise ValueError(f"layer={config.layer}: the model has {layers} decoder layers; pass 0..{layers - 1} or None.")
    if config.heads is None and config.top_heads > layers * per_layer:
        raise ValueError(f"top_heads={config.top_heads}: the model has only {layers * per_layer} heads.")
    outside = [pair for pair in config.heads or () if not (0 <= pair[0] < layers and 0 <= pair[1] < per_layer)]
    if outside:
        raise ValueError(f"heads {outside} are not in this model ({layers} layers of {per_layer} heads).")
    return layer


def _check_answers(task: str, prompts: list[EncodedPrompt]) -> None:
    empty = [p.query for p in prompts if not p.answer_ids]
    if empty:
        raise ValueError(
            f"Task {task!r}: the outputs of examples {empty[:5]} tokenize to no token: drop those rows or give them "
            "an output."
        )


def _activation_prompts(
    tokenizer: PreTrainedTokenizerBase, task: str, examples: list[tuple[str, str]], config: IVConfig
) -> list[EncodedPrompt]:
    order = torch.randperm(len(examples), generator=task_generator(config.seed, task, "queries"))
    queries = order[: config.activation_prompts].tolist()
    generator = task_generator(config.seed, task, "shots")
    return n_shot_prompts(tokenizer, config.format, examples, queries, config.shots, generator)


def _counterfactual_prompts(
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    examples: list[tuple[str, str]],
    queries: list[int],
    config: IVConfig,
) -> list[EncodedPrompt]:
    if config.counterfactual == "zero_shot":
        return [encode_prompt(tokenizer, config.format, [], examples[q], q) for q in queries]
    generator = task_generator(config.seed, task, "counterfactual")
    return n_shot_prompts(tokenizer, config.format, examples, queries, config.shots, generator, shuffle_labels=True)


def extract_instruction_vector(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Iterable[Mapping[str, Any]],
    config: IVConfig | None = None,
    output_dir: str | os.PathLike | None = None,
) -> InstructionVector:
    """Instruction vectors of every task of ``dataset`` (a `datasets.Dataset` or any iterable of rows with the
    columns named in ``config``), from one set of heads, for ``model`` (a transformers decoder or a PEFT model).

    With ``output_dir``, per-task results are written there as each task finishes and reused by a rerun (same
    model, adapter and tokenizer; a task whose examples or settings changed is recomputed), and the result is
    saved there too (`InstructionVector.load` reads it). Tasks without a correctly answered prompt have no
    task-conditioned activation: they are left out, with a warning, and listed in the provenance.
    """
    config = config or IVConfig()
    tasks = group_tasks(dataset, config)
    heads = AttentionHeads.of(model)
    layer = _check_model_settings(heads, config)
    prompts = {task: _activation_prompts(tokenizer, task, examples, config) for task, examples in tasks.items()}
    for task, task_prompts in prompts.items():
        _check_answers(task, task_prompts)
    results = TaskResults(output_dir, model, tokenizer)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0

    means: dict[str, torch.Tensor] = {}
    effects: dict[str, torch.Tensor] = {}
    counts: dict[str, dict[str, int]] = {}
    with evaluation_mode(model):
        for task in tqdm(tasks, desc="IV: tasks"):
            key = result_key(task, tasks[task], config.settings(ACTIVATION_SETTINGS))
            stored = results.get("activations", key)
            if stored is None:
                mean, correct = task_activations(
                    model,
                    heads,
                    prompts[task],
                    pad_token_id=pad_token_id,
                    batch_size=config.batch_size,
                    correct_top_k=config.correct_top_k,
                    desc=f"IV: {task}: activations",
                )
                stored = {"mean": mean, "correct": correct}
                results.put("activations", key, stored, {"task": task, "correct": int(correct.sum())})
            correct_queries = [p.query for p, right in zip(prompts[task], stored["correct"].tolist()) if right]
            counts[task] = {"prompts": len(prompts[task]), "correct": len(correct_queries)}
            if not correct_queries:
                logger.warning("IV: task %r: no prompt answered correctly; it is left out.", task)
                continue
            means[task] = stored["mean"]
            if config.heads is not None:
                continue
            key = result_key(task, tasks[task], config.settings(EFFECT_SETTINGS))
            stored = results.get("effects", key)
            if stored is None:
                counterfactual = _counterfactual_prompts(
                    tokenizer, task, tasks[task], correct_queries[: config.effect_prompts], config
                )
                stored = {
                    "effects": causal_effects(
                        model,
                        heads,
                        counterfactual,
                        means[task],
                        metric=config.effect_metric,
                        add=config.patch == "add",
                        heads_per_batch=config.heads_per_batch,
                        reuse_prefix=config.reuse_prefix,
                        desc=f"IV: {task}: causal effects",
                    )
                }
                results.put("effects", key, stored, {"task": task})
            effects[task] = stored["effects"].mean(0)
            counts[task]["effect_prompts"] = len(stored["effects"])
        if not means:
            raise ValueError(
                f"No task had a prompt answered correctly (correct_top_k={config.correct_top_k}): raise "
                "correct_top_k, pass None to keep every prompt, or use a model that can do these tasks in context."
            )
        chosen, head_effects = _top_heads(effects, heads, config)
        vectors = torch.stack([_vector(heads, means[task], chosen) for task in means])

    vector = InstructionVector(
        vectors=vectors,
        tasks=list(means),
        layer=layer,
        heads=chosen,
        head_effects=head_effects,
        provenance={
            "model": getattr(model.config, "_name_or_path", None) or type(model).__name__,
            "settings": config.to_dict(),
            "tasks": counts,
            "left_out": [task for task in tasks if task not in means],
        },
    )
    if output_dir is not None:
        vector.save(output_dir)
    return vector


def _top_heads(
    effects: dict[str, torch.Tensor], heads: AttentionHeads, config: IVConfig
) -> tuple[list[tuple[int, int]], list[float] | None]:
    """The given heads, or the ``top_heads`` with the largest causal effect averaged over tasks."""
    if config.heads is not None:
        return list(config.heads), None
    mean = torch.stack(list(effects.values())).mean(0)
    values, flat = mean.flatten().topk(config.top_heads)
    per_layer = heads.num_heads
    return [(i // per_layer, i % per_layer) for i in flat.tolist()], values.tolist()


def _vector(heads: AttentionHeads, mean: torch.Tensor, chosen: list[tuple[int, int]]) -> torch.Tensor:
    """Sum over the chosen heads of each one's mean activation through its share of the output projection."""
    vector = torch.zeros(heads.hidden_size)
    for layer in sorted({layer for layer, _ in chosen}):
        projected = heads.project(layer, mean[layer]).cpu()
        vector += projected[[head for head_layer, head in chosen if head_layer == layer]].sum(0)
    return vector
