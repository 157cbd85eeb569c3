"""Do Joint Flashback Adaptation and instruction-vector guidance keep what earlier stages taught while the model
learns new tasks?

Three stages, each a P3 train cluster (STAGES), learned one after the other by the embedded model: each stage trains
TRAIN_ROWS rows for EPOCHS epochs starting from the previous stage's adapter. Before the first stage and after each,
every method is scored (greedy answers, ROUGE-L) on the held-out rows of every stage and on P3's held-out clusters
(unseen tasks), which fills the accuracy matrix R[i, j] = score on stage j after training stage i.

Rows:

- sequential LoRA SFT (`trl.SFTTrainer`, the adapter carried from stage to stage);
- SFT with replay: the old stages' flashback rows *with* their targets mixed into each later stage's training rows
  (the upper reference JFA claims to approach, with data JFA does not have);
- sequential LTA: TKI's latent bank without flashbacks (the model JFA is built on; it separates what the bank does
  from what the flashbacks do);
- JFA: LTA plus flashbacks (FLASHBACKS_PER_STAGE prompts of each old stage; the symmetric KL to the model as it was
  before the stage over each prompt and the first FLASHBACK_CONTINUATION tokens of that model's answer; routed
  through the bank with the new rows), PCGrad over SFT and flashbacks;
- JFA without joint latent learning: the flashbacks bypass the bank;
- IVG: sequential LoRA trained with instruction-vector guidance (progressive intervention and the IV-based KL term);
  each stage's vector is extracted from the model as the stage starts, on the stage's own training rows;
- IVG + JFA: JFA with that guidance as a third objective under PCGrad.

Before the first stage and after the last, the rows IVG is compared with are also scored on in-context ability:
N-shot prompts of held-out P3 tasks (`ivg_check.TASKS`), accuracy of the greedy answer's first token.

Stage 1 has no old stage, so SFT and replay share one stage-1 run, and LTA and both JFA rows another (the guided
rows train their own). Every row runs at the same 3 seeds; the report pairs differences by seed and by example
(`paired_bootstrap`). The learning rate is the one the quality benchmark's search chose for LoRA SFT and for TKI
(3e-4).

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python bench/continual.py [--methods sft jfa ...]

Each finished piece (a stage's training, its evaluation) is saved at once under ``bench/results/continual/``, so the
command resumes where it stopped; ``--report`` only rebuilds the tables and the plot. Adapters live under
``--work_dir``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets
from peft import PeftModel
from trl import SFTConfig, SFTTrainer

import ivg_check
from common import (
    P3,
    RESULTS,
    as_json,
    evaluate,
    mean_sd,
    read_record,
    saved_figure,
    training_arguments,
    write_record,
    write_results,
)
from tki_trainer import TKIConfig, TKITrainer, embedded_lora_config, load_embedded_model
from tki_trainer._io import staged_directory, staged_file
from tki_trainer.data import add_query_embeddings, balanced_subset, fitted_subset, group_references, load_p3
from tki_trainer.embedded import load_embedded_encoder
from tki_trainer.evaluation.comparison import paired_bootstrap
from tki_trainer.ivg import answered_correctly
from tki_trainer.presets import shared_lora_config


RUNS = RESULTS / "continual"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STAGES = ("sentiment", "multiple_choice_qa", "summarization")
"""P3 train clusters, in the order they are learned. The first two answer in a few words, summarization in
sentences: a sequence of short-answer clusters alone (closed-book QA third, commit 463912c) made no method forget."""
MAX_LENGTH = 192
TRAIN_ROWS = 64
EVAL_ROWS = 32
"""Held-out prompts per stage, and of P3's held-out clusters."""
FLASHBACKS_PER_STAGE = 16
"""Old-stage prompts JFA keeps (and rows, with targets, replay keeps) of each earlier stage."""
FLASHBACKS_PER_STEP = 2
FLASHBACK_CONTINUATION = 8
FLASHBACK_OBJECTIVE = {"divergence": "symmetric_kl", "averaged": "per flashback"}
"""The paper's divergence, averaged over each flashback's positions, then over flashbacks (pieces of flashback rows
record it: those trained with KL(reference || model) averaged over tokens are redone)."""
"""Tokens of the reference's own answer to each flashback that the divergence also covers: the prompt's positions
alone constrain only an answer's first token, not its length or form."""
ANSWER_TOKENS = 24
"""Generation budget per answer: answers to long references (reviews, wiki answers, bios) are cut there, which
bounds their ROUGE-L recall alike for every method."""
SHINGLE_WORDS = 5
TEMPLATE_TEXT = 20
"""A word n-gram (or an answer) that more rows of a file share than this is a template's wording (or a label), not
one example's text."""
PER_TEMPLATE = 16
"""Rows read per prompt template before the subsets are drawn (every template stays represented)."""
BATCH = 4
EPOCHS = 2
LEARNING_RATE = 3e-4
SEEDS = (0, 1, 2)
IN_CONTEXT_ROWS = ("sft", "jfa", "ivg", "ivg_jfa")
"""The rows scored on in-context ability after the last stage (the guided ones and those they are compared with)."""
TESTS = (*(f"stage{stage}" for stage in range(1, len(STAGES) + 1)), "unseen")
SETTINGS = {
    "stages": STAGES,
    "max_length": MAX_LENGTH,
    "train_rows": TRAIN_ROWS,
    "eval_rows": EVAL_ROWS,
    "flashbacks_per_stage": FLASHBACKS_PER_STAGE,
    "flashbacks_per_step": FLASHBACKS_PER_STEP,
    "flashback_continuation": FLASHBACK_CONTINUATION,
    "answer_tokens": ANSWER_TOKENS,
    "shingle_words": SHINGLE_WORDS,
    "template_text": TEMPLATE_TEXT,
    "per_template": PER_TEMPLATE,
    "batch": BATCH,
    "epochs": EPOCHS,
    "learning_rate": LEARNING_RATE,
}
"""What a saved piece was made with: a piece saved under other settings is redone."""


@dataclass(frozen=True)
class Method:
    """One row: its trainer, what it keeps of the old stages (nothing, their rows, their prompts as flashbacks) and
    whether flashbacks are routed through the bank."""

    label: str
    trainer: str
    old_rows: str | None = None
    routing: bool = True
    guided: bool = False
    """Instruction-vector guidance (IVG): each stage extracts its cluster's vector from the model as that stage
    starts, on the stage's training rows, and trains with it (`IVG_EXTRACTION`, `IVG_GUIDANCE`)."""


METHODS = {
    "sft": Method("sequential LoRA SFT", "sft"),
    "jfa": Method("JFA", "tki", "flashbacks"),
    "replay": Method("SFT + replay (old rows with targets)", "sft", "replay"),
    "jfa_no_jtl": Method("JFA without joint latent learning", "tki", "flashbacks", routing=False),
    "lta": Method("sequential LTA (no flashbacks)", "tki"),
    "ivg": Method("IVG (sequential LoRA + instruction-vector guidance)", "tki", guided=True),
    "ivg_jfa": Method("IVG + JFA", "tki", "flashbacks", guided=True),
}
"""In the order they run."""


IVG_EXTRACTION = {
    "shots": 5,
    "activation_prompts": 32,
    "effect_prompts": 8,
    "correct_top_k": 10,
    "input_column": "input",
    "output_column": "output",
}
"""`IVConfig` of each stage's extraction: the paper's 10 heads and layer |L|/3; 5 shots, 32 activation and 8 effect
prompts to fit a CPU; a prompt counts as answered when its answer's first token ranks in the top 10 (the authors'
code), as the first token of a summary is rarely the greedy one."""
IVG_GUIDANCE = {"ivg_scale_start": 1.0, "ivg_scale_end": 0.0, "ivg_kl_weight": 0.05}
"""The paper's schedule and KL weight; the KL term's other choices are `TKIConfig`'s defaults (the authors' code)."""
ICL_QUERIES = 48
"""In-context ability: queries per held-out task (`ivg_check.TASKS`), each after `ivg_check.IV_CONFIG.shots`
demonstrations of its task, scored by whether the greedy answer's first token is right; before the first stage and
after the last."""


ICL_SETTINGS = {"queries": ICL_QUERIES, "tasks": list(ivg_check.TASKS), "shots": ivg_check.IV_CONFIG.shots}
"""Saved with each in-context result: one measured under other settings is measured again."""


def has_bank(method: str) -> bool:
    """Whether the method's model holds a TKI latent bank (routed by each row's query): every TKITrainer row except
    IVG alone, which guides plain sequential LoRA."""
    spec = METHODS[method]
    return spec.trainer == "tki" and (not spec.guided or spec.old_rows == "flashbacks")


def trained_as(method: str, stage: int) -> str:
    """The run that holds ``method``'s model after ``stage``: at stage 1 nothing old exists, so every method of the
    same trainer is one model (SFT's, or LTA's), except guided ones, which train stage 1 with their own vector."""
    if stage > 1 or METHODS[method].guided:
        return method
    return {"sft": "sft", "tki": "lta"}[METHODS[method].trainer]


def tests_of(run: str, stage: int) -> tuple[str, ...]:
    """What a piece is scored on: every stage's held-out rows and the unseen ones; in-context ability too before the
    first stage and after the last, for the rows it is compared on."""
    if stage == 0 or (stage == len(STAGES) and run in IN_CONTEXT_ROWS):
        return (*TESTS, "icl")
    return TESTS


def measured(record: dict, test: str) -> bool:
    """Whether a piece's record holds ``test``'s result under the current settings."""
    result = record.get("eval", {}).get(test)
    return result is not None and (test != "icl" or result.get("settings") == as_json(ICL_SETTINGS))


def piece_name(run: str, seed: int, stage: int) -> str:
    return "base" if stage == 0 else f"{run}-s{seed}-stage{stage}"


def piece_config(run: str, seed: int, stage: int, runs: Path) -> dict:
    """What defines a saved piece: its row's definition, seed and stage, the settings, and (from stage 2) the digest
    of the adapter it started from, so a piece trained from another version of its previous stage is redone. The base
    model (stage 0) is one piece for every seed."""
    seed = seed if stage > 0 else 0
    parent = None
    if stage > 1:
        parent = read_record(runs / f"{piece_name(trained_as(run, stage - 1), seed, stage - 1)}.json")
        parent = parent.get("adapter_sha256")
    method = asdict(METHODS[run]) if stage > 0 else None
    if method is not None and not method["guided"]:
        del method["guided"]  # absent when off: pieces saved before guidance existed stay valid
    config = {"run": run, "seed": seed, "stage": stage, "method": method, "settings": SETTINGS, "parent": parent}
    if stage > 1 and METHODS[run].old_rows == "flashbacks":
        config["flashbacks"] = FLASHBACK_OBJECTIVE
    if stage > 0 and METHODS[run].guided:
        config["guidance"] = {"extraction": IVG_EXTRACTION, **IVG_GUIDANCE}
    return as_json(config)


def example_keys(prompts: list[str], completions: list[str]) -> list[frozenset]:
    """What gives away a row's source example under any of P3's templates (each phrases the same examples): the
    word n-grams of its prompt that few prompts of its file share (the example's own text, not a template's
    wording), and its answer when few rows share it."""
    grams = [frozenset(zip(*(words[i:] for i in range(SHINGLE_WORDS)))) for words in map(_words, prompts)]
    counts = Counter(gram for row in grams for gram in row)
    answers = [completion.strip().lower() for completion in completions]
    answer_counts = Counter(answers)
    return [
        frozenset(gram for gram in row if counts[gram] <= TEMPLATE_TEXT)
        | ({("answer", answer)} if answer_counts[answer] <= TEMPLATE_TEXT else frozenset())
        for row, answer in zip(grams, answers)
    ]


def _words(text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"\w+", text.lower()))


def independent(rows: Dataset, keys: dict[str, frozenset], trained: set[str], seed: int) -> Dataset:
    """The rows, in a seeded order, that are not ``trained`` rows and share no example key with them nor with a row
    kept before them: held-out rows whose examples were not trained on, one row per example."""
    shuffled = rows.shuffle(seed=seed)
    seen, keep = set().union(*(keys[row_id] for row_id in trained)), []
    for index, row_id in enumerate(shuffled["id"]):
        if row_id not in trained and not keys[row_id] & seen:
            keep.append(index)
            seen |= keys[row_id]
    return shuffled.select(keep)


class Data:
    """Per stage: training rows, held-out rows of other source examples, and the flashback rows (a subset of the
    training rows); rows of the unseen clusters; all fitted into MAX_LENGTH tokens, with query embeddings."""

    def __init__(self, tokenizer, work_dir: Path) -> None:
        encoder = load_embedded_encoder()

        def embedded(rows: Dataset) -> Dataset:
            return add_query_embeddings(rows, encoder, cache_dir=work_dir / "queries")

        self.train: dict[int, Dataset] = {}
        self.flashbacks: dict[int, Dataset] = {}
        self.tests: dict[str, Dataset] = {}
        self.selection: dict[str, dict] = {}
        for stage, cluster in enumerate(STAGES, 1):
            rows, keys, fit = self.candidates("train.jsonl.gz", tokenizer, [cluster])
            train = balanced_subset(rows, "dataset", TRAIN_ROWS, seed=0)
            rest = independent(rows, keys, set(train["id"]), seed=0)
            self.train[stage] = embedded(train)
            self.flashbacks[stage] = balanced_subset(self.train[stage], "dataset", FLASHBACKS_PER_STAGE, seed=1)
            self.tests[f"stage{stage}"] = embedded(balanced_subset(rest, "dataset", EVAL_ROWS, seed=0))
            self.selection[cluster] = {**fit, "rows": len(rows), "held_out_candidates": len(rest)}
        rows, keys, fit = self.candidates("heldout.jsonl.gz", tokenizer)
        rest = independent(rows, keys, set(), seed=0)
        self.tests["unseen"] = embedded(balanced_subset(rest, "cluster", EVAL_ROWS, seed=0))
        self.selection["unseen"] = {**fit, "rows": len(rows), "held_out_candidates": len(rest)}
        self.icl = [
            (task, prompt)
            for task, task_rows in ivg_check.task_rows().items()
            for prompt in ivg_check.evaluation_prompts(tokenizer, task, task_rows, ivg_check.IV_CONFIG.shots)[
                :ICL_QUERIES
            ]
        ]
        """In-context prompts of P3's held-out tasks: the first ICL_QUERIES of each task's queries in the IV check."""
        texts = [tokenizer.decode(prompt.prompt_ids, skip_special_tokens=True) for _, prompt in self.icl]
        self.icl_queries = torch.tensor(embedded(Dataset.from_dict({"prompt": texts}))["query_embedding"])
        """Each in-context prompt's query embedding (its text), for models routed by one."""

    def extraction_rows(self, stage: int, path: Path) -> Path:
        """The stage's training rows as the tasks an instruction vector is extracted from (one task: the cluster)."""
        rows = self.train[stage]
        tasks = [
            {"task": STAGES[stage - 1], "input": prompt[-1]["content"], "output": completion[-1]["content"]}
            for prompt, completion in zip(rows["prompt"], rows["completion"])
        ]
        with staged_file(path) as staging:
            staging.write_text("".join(json.dumps(task) + "\n" for task in tasks))
        return path

    @staticmethod
    def candidates(file: str, tokenizer, clusters: list[str] | None = None) -> tuple[Dataset, dict, dict]:
        """PER_TEMPLATE rows of every template of ``clusters`` (each prompt once, its answers as references), fitted,
        with each row's example keys computed over the whole file's rows of those clusters."""
        whole = load_p3(P3 / file, clusters=clusters)
        keys = dict(zip(whole["id"], example_keys(whole["prompt"], whole["completion"])))
        rows = load_p3(P3 / file, clusters=clusters, per_template=PER_TEMPLATE, conversational=True)
        rows, report = fitted_subset(group_references(rows), tokenizer, MAX_LENGTH)
        return rows, keys, asdict(report)

    def old(self, stage: int) -> Dataset | None:
        """The flashback rows of every stage before ``stage``."""
        return concatenate_datasets([self.flashbacks[s] for s in range(1, stage)]) if stage > 1 else None


class Bench:
    def __init__(self, work_dir: Path, runs: Path = RUNS) -> None:
        self.work_dir, self.runs = work_dir, runs
        runs.mkdir(parents=True, exist_ok=True)
        _, tokenizer = load_embedded_model()
        self.data = Data(tokenizer, work_dir)

    def adapter(self, run: str, seed: int, stage: int) -> Path:
        return self.work_dir / "adapters" / piece_name(run, seed, stage)

    def train(self, run: str, seed: int, stage: int) -> dict:
        """Train ``run``'s ``stage`` from its previous stage's adapter; the adapter lands whole or not at all."""
        spec = METHODS[run]
        model, tokenizer = load_embedded_model()
        if stage > 1:
            previous = self.adapter(trained_as(run, stage - 1), seed, stage - 1)
            model = PeftModel.from_pretrained(model, str(previous), is_trainable=True)
        output_dir = self.work_dir / "runs" / piece_name(run, seed, stage)
        shutil.rmtree(output_dir, ignore_errors=True)
        args = training_arguments(
            output_dir,
            learning_rate=LEARNING_RATE,
            seed=seed,
            per_device_train_batch_size=BATCH,
            num_train_epochs=EPOCHS,
            max_length=MAX_LENGTH,
            save_strategy="no",
        )
        rows, old = self.data.train[stage], self.data.old(stage)
        flashbacks = old if spec.old_rows == "flashbacks" else None
        if spec.trainer == "sft":
            if spec.old_rows == "replay" and old is not None:
                rows = concatenate_datasets([rows, old])
            trainer = SFTTrainer(
                model,
                args=SFTConfig(**args),
                train_dataset=rows.select_columns(["prompt", "completion"]),
                processing_class=tokenizer,
                peft_config=shared_lora_config("embedded") if stage == 1 else None,
            )
        else:
            guidance = {}
            if spec.guided:
                tasks = self.data.extraction_rows(
                    stage, self.work_dir / "ivg" / f"{piece_name(run, seed, stage)}.jsonl"
                )
                guidance = {"ivg_tasks": str(tasks), "ivg_extraction": json.dumps(IVG_EXTRACTION), **IVG_GUIDANCE}
            latent = has_bank(run)
            config = TKIConfig(
                **args,
                lta=latent,
                kr=False,
                pcgrad=latent,
                flashbacks_per_step=FLASHBACKS_PER_STEP,
                flashback_continuation_tokens=FLASHBACK_CONTINUATION,
                flashback_divergence=FLASHBACK_OBJECTIVE["divergence"],
                flashback_routing=spec.routing,
                **guidance,
            )
            first = embedded_lora_config() if latent else shared_lora_config("embedded")
            trainer = TKITrainer(
                model,
                args=config,
                train_dataset=rows,
                processing_class=tokenizer,
                peft_config=first if stage == 1 else None,
                flashback_dataset=flashbacks,
            )
        started = time.time()
        trainer.train()
        seconds = time.time() - started
        with staged_directory(self.adapter(run, seed, stage)) as staging:
            trainer.model.save_pretrained(str(staging))
        return {
            "seconds": seconds,
            "steps": trainer.state.global_step,
            "rows": len(rows),
            "flashbacks": 0 if flashbacks is None else len(flashbacks),
            "log_history": trainer.state.log_history,
        }

    def ensure(self, run: str, seed: int, stage: int, adapter_needed: bool = False) -> None:
        """Make this piece and every stage before it complete: train what is missing or was made from another
        version of its previous stage, and run the evaluations it lacks, saving each part as it ends. An adapter
        whose record is complete is only trained again when it is needed (to evaluate, or to train the next
        stage from)."""
        if stage > 1:
            self.ensure(trained_as(run, stage - 1), seed, stage - 1)
        name, path = piece_name(run, seed, stage), self.runs / f"{piece_name(run, seed, stage)}.json"
        config = piece_config(run, seed, stage, self.runs)
        record = read_record(path)
        if record.get("config") != config:
            record = {"config": config}
        adapter = self.adapter(run, seed, stage)
        tests = tests_of(run, stage)
        missing = [test for test in tests if not measured(record, test)]
        if stage > 0 and ("train" not in record or (not adapter.is_dir() and (missing or adapter_needed))):
            if stage > 1:
                self.ensure(trained_as(run, stage - 1), seed, stage - 1, adapter_needed=True)
                config = piece_config(run, seed, stage, self.runs)
            print(f"== training {name}", flush=True)
            train = self.train(run, seed, stage)
            digest = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
            same = record.get("config") == config and record.get("adapter_sha256") == digest
            record = {"config": config, "train": train, "adapter_sha256": digest} | (
                {"eval": record["eval"]} if same and "eval" in record else {}
            )  # an adapter retrained to the same bytes keeps its evaluations
            write_record(path, record)
            missing = [test for test in tests if not measured(record, test)]
        if not missing:
            return
        model, tokenizer = load_embedded_model()
        if stage > 0:
            model = PeftModel.from_pretrained(model, str(adapter))
        model.to(DEVICE).eval()
        for test in missing:
            print(f"== evaluating {name} on {test}", flush=True)
            started = time.time()
            if test == "icl":
                result = self.in_context(model, tokenizer, routed=stage > 0 and has_bank(run))
            else:
                result = evaluate(model, tokenizer, self.data.tests[test], "cluster", cap=ANSWER_TOKENS)
            record.setdefault("eval", {})[test] = {**result, "seconds": time.time() - started}
            write_record(path, record)

    def in_context(self, model, tokenizer, routed: bool) -> dict:
        """Accuracy x100 on the held-out tasks' in-context prompts, overall, per task and per prompt; a model with a
        latent bank routes each prompt by its embedding, as its answers to any prompt are."""
        tasks, prompts = zip(*self.data.icl)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        queries = self.data.icl_queries if routed else None
        right = answered_correctly(model, list(prompts), pad_token_id=pad, query_embeddings=queries, desc="in-context")
        per_example = (100 * right.float()).tolist()
        by_task = {task: float(np.mean([v for t, v in zip(tasks, per_example) if t == task])) for task in set(tasks)}
        return {"all": float(np.mean(per_example)), "by_group": by_task, "per_example": per_example,
                "settings": ICL_SETTINGS}  # fmt: skip

    def run(self, methods: list[str], seeds: list[int]) -> None:
        sizes = {
            **{f"train{stage}": len(rows) for stage, rows in self.data.train.items()},
            **{test: len(rows) for test, rows in self.data.tests.items()},
        }
        write_record(self.runs / "data.json", {"selection": self.data.selection, "sizes": sizes})
        self.ensure("base", 0, 0)
        for seed in seeds:
            for method in methods:
                self.ensure(method, seed, len(STAGES))


# Report ------------------------------------------------------------------------------------------------------------


def matrix(method: str, seed: int, runs: Path = RUNS) -> list[dict] | None:
    """Row ``i`` = the per-test results after stage ``i`` (row 0: the base model); None until every stage of this
    method and seed has every test under the current settings, each trained from the saved previous stage."""
    rows = []
    for stage in range(len(STAGES) + 1):
        run = "base" if stage == 0 else trained_as(method, stage)
        record = read_record(runs / f"{piece_name(run, seed, stage)}.json")
        if record.get("config") != piece_config(run, seed, stage, runs) or not set(TESTS) <= set(
            record.get("eval", {})
        ):
            return None
        rows.append(record["eval"])
    for test in TESTS:
        if any(row[test]["ids"] != rows[0][test]["ids"] for row in rows):
            raise ValueError(f"{method} at seed {seed} was scored on other {test} rows than the base model: rerun it.")
    return rows


def scores(rows: list[dict], test: str, stage: int) -> np.ndarray:
    return np.asarray(rows[stage][test]["per_example"]["rougeL"])


def measures(rows: list[dict]) -> dict[str, np.ndarray]:
    """Per-example vectors of one method and seed. ``bwt`` (backward transfer): the score on each earlier stage's
    held-out rows after the last stage minus right after learning that stage (below 0: forgotten); ``new``: stages
    2 and 3 right after learning them (plasticity; stage 1 is one model for the methods that share it); ``final``:
    every stage after the last; ``unseen``: the unseen clusters after the last stage; ``unseen_change``: that minus
    the base model's (a difference between methods cancels the base, so it is compared as ``unseen``)."""
    last = len(STAGES)
    return {
        "bwt": np.concatenate(
            [scores(rows, f"stage{j}", last) - scores(rows, f"stage{j}", j) for j in range(1, last)]
        ),
        "new": np.concatenate([scores(rows, f"stage{j}", j) for j in range(2, last + 1)]),
        "final": np.concatenate([scores(rows, f"stage{j}", last) for j in range(1, last + 1)]),
        "unseen": scores(rows, "unseen", last),
        "unseen_change": scores(rows, "unseen", last) - scores(rows, "unseen", 0),
    }


MEASURES = ("bwt", "new", "final", "unseen", "unseen_change")
COMPARED_MEASURES = ("bwt", "new", "final", "unseen")
COMPARED = (
    ("jfa", "sft"),
    ("jfa", "replay"),
    ("replay", "sft"),
    ("jfa", "jfa_no_jtl"),
    ("jfa", "lta"),
    ("ivg", "sft"),
    ("ivg_jfa", "jfa"),
    ("ivg_jfa", "ivg"),
)
"""The first pair on ``bwt`` is the benchmark's question; the others are read as secondary (no correction for the
number of comparisons)."""


def replay_share(sft: np.ndarray, replay: np.ndarray, jfa: np.ndarray, resamples: int = 10_000) -> dict:
    """(JFA − SFT) / (replay − SFT) of the mean backward transfer: the part of the forgetting that replay removes
    which JFA removes too, with a bootstrap interval (seeds and examples drawn once for all three, as paired)."""
    rng = np.random.default_rng(0)
    seeds = rng.integers(0, sft.shape[0], size=(resamples, sft.shape[0]))
    examples = rng.integers(0, sft.shape[1], size=(resamples, sft.shape[1]))

    def mean(scores: np.ndarray) -> np.ndarray:
        return np.take_along_axis(scores[seeds].mean(axis=1), examples, axis=1).mean(axis=1)

    ratios = (mean(jfa) - mean(sft)) / (mean(replay) - mean(sft))
    low, high = np.quantile(ratios, [0.025, 0.975])
    share = (jfa.mean() - sft.mean()) / (replay.mean() - sft.mean())
    return {"share": float(share), "low": float(low), "high": float(high)}


def in_context(found: dict, runs: Path) -> tuple[dict, list]:
    """In-context accuracy before the first stage and after the last, per row (mean over seeds), and the rows'
    differences after the last stage, paired by seed and prompt."""
    base = read_record(runs / f"{piece_name('base', 0, 0)}.json")
    base = base["eval"]["icl"] if measured(base, "icl") else None
    after = {}
    for method in IN_CONTEXT_ROWS:
        by_seed = {
            seed: record["eval"]["icl"]["per_example"]
            for seed in found.get(method, {})
            if measured(record := read_record(runs / f"{piece_name(method, seed, len(STAGES))}.json"), "icl")
        }
        if by_seed:
            after[method] = by_seed
    table = {
        method: {"seeds": sorted(v), "after": [float(np.mean(x)) for x in v.values()]} for method, v in after.items()
    }
    if base is not None:
        table["base"] = {"seeds": [0], "after": [base["all"]]}
    comparisons = []
    for a, b in (("ivg", "sft"), ("ivg_jfa", "jfa"), ("jfa", "sft")):
        common = sorted(set(after.get(a, {})) & set(after.get(b, {})))
        if common:
            first, second = (np.array([after[m][s] for s in common]) for m in (a, b))
            result = paired_bootstrap(first, second, paired_seeds=True).to_dict()
            comparisons.append({"a": a, "b": b, "measure": "icl", "seeds": common, **result})
    return table, comparisons


def report(runs: Path = RUNS) -> None:
    found = {
        method: {seed: rows for seed in SEEDS if (rows := matrix(method, seed, runs)) is not None}
        for method in METHODS
    }
    found = {method: by_seed for method, by_seed in found.items() if by_seed}
    per_method = {
        method: {seed: measures(rows) for seed, rows in by_seed.items()} for method, by_seed in found.items()
    }
    table_rows = {
        method: {name: [float(m[name].mean()) for m in by_seed.values()] for name in MEASURES}
        | {"seeds": sorted(by_seed)}
        for method, by_seed in per_method.items()
    }
    comparisons, share = [], None
    for a, b in COMPARED:
        common = sorted(set(per_method.get(a, {})) & set(per_method.get(b, {})))
        if not common:
            continue
        for name in COMPARED_MEASURES:
            first = np.stack([per_method[a][s][name] for s in common])
            second = np.stack([per_method[b][s][name] for s in common])
            result = paired_bootstrap(first, second, paired_seeds=True).to_dict()
            comparisons.append({"a": a, "b": b, "measure": name, "seeds": common, **result})
    replay_gain = next((c for c in comparisons if (c["a"], c["b"], c["measure"]) == ("replay", "sft", "bwt")), None)
    if replay_gain is not None and replay_gain["low"] > 0 and "jfa" in per_method:
        common = sorted(set(per_method["sft"]) & set(per_method["replay"]) & set(per_method["jfa"]))
        stacked = [np.stack([per_method[m][s]["bwt"] for s in common]) for m in ("sft", "replay", "jfa")]
        share = {**replay_share(*stacked), "seeds": common}
    accuracy = {
        method: np.mean(
            [
                [[rows[i][test]["all"]["rougeL"] for test in TESTS] for i in range(len(rows))]
                for rows in by_seed.values()
            ],
            axis=0,
        ).tolist()
        for method, by_seed in found.items()
    }
    data = read_record(runs / "data.json")
    icl_table, icl_comparisons = in_context(found, runs)
    table = markdown(table_rows, comparisons + icl_comparisons, share, replay_gain, accuracy, data, icl_table)
    payload = {
        "rows": table_rows,
        "comparisons": comparisons + icl_comparisons,
        "in_context": icl_table,
        "replay_share": share,
        "accuracy_matrices": accuracy,
        "data": data,
        "settings": {**SETTINGS, "seeds": SEEDS, "tki": embedded_lora_config().to_dict(), "device": DEVICE},
        "training": training_summary(found, runs),
    }
    write_results("continual", payload, table)
    if accuracy:
        plot_matrices(accuracy)
    print(table)


def training_summary(found: dict, runs: Path) -> dict:
    """Per trained piece of the reported rows: its seconds, steps, rows, and the mean of each logged flashback and
    PCGrad quantity."""
    summary = {}
    for method, by_seed in found.items():
        for seed in by_seed:
            for stage in range(1, len(STAGES) + 1):
                name = piece_name(trained_as(method, stage), seed, stage)
                train = read_record(runs / f"{name}.json")["train"]
                logged = {
                    key: float(np.mean(values))
                    for key in ("loss_flashback", "pcgrad_conflict_rate", "pcgrad_cosine_flashback")
                    if (values := [entry[key] for entry in train["log_history"] if key in entry])
                }
                summary[name] = {k: train[k] for k in ("seconds", "steps", "rows", "flashbacks")} | logged
    return summary


def markdown(
    rows: dict, comparisons: list, share: dict | None, replay_gain: dict | None, accuracy, data, icl: dict
) -> str:
    sizes = data.get("sizes", {})
    held = ", ".join(f"{sizes.get(f'stage{s}', EVAL_ROWS)}" for s in range(1, len(STAGES) + 1))
    lines = [
        f"Continual instruction tuning, embedded SmolLM2-135M: three stages of P3 train clusters ({', '.join(STAGES)}), "
        f"{TRAIN_ROWS} rows each, {EPOCHS} epochs per stage at lr {LEARNING_RATE:g}, each stage starting from the "
        f"previous stage's adapter. Held-out rows per stage: {held}, none of them (and no two of them) the same "
        f"source example under another template; unseen = {sizes.get('unseen', EVAL_ROWS)} prompts of P3's held-out "
        f"clusters. JFA keeps {FLASHBACKS_PER_STAGE} prompts of each old stage ({FLASHBACKS_PER_STEP} per "
        f"micro-batch, compared over the prompt and {FLASHBACK_CONTINUATION} tokens of the reference's answer); "
        "replay trains on the same rows with their targets (so it takes 25% more steps at stage 2, 50% "
        f"at stage 3). Greedy answers of at most {ANSWER_TOKENS} tokens, ROUGE-L x100, mean ± sd over seeds. "
        "Produced by `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python bench/continual.py` (resumable; "
        "`--report` rebuilds this page).",
        "",
        "BWT (backward transfer) = score on each earlier stage after the last stage minus right after learning it "
        "(below 0: forgotten); new = stages 2 and 3 right after learning them; final = every stage after the last; "
        "unseen change = unseen clusters after the last stage minus the base model.",
        "",
        "| method | seeds | BWT | new | final | unseen | unseen change |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, row in rows.items():
        cells = [mean_sd(row[name]) for name in MEASURES]
        lines.append(f"| {METHODS[method].label} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    if icl:
        shots, tasks = ivg_check.IV_CONFIG.shots, len(ivg_check.TASKS)
        lines += [
            "",
            f"In-context ability: {shots}-shot prompts of {tasks} held-out P3 tasks ({ICL_QUERIES} each: "
            f"{', '.join(ivg_check.task_name(*t) for t in ivg_check.TASKS)}), accuracy x100 of the greedy answer's "
            "first token, before the first stage (base) and after the last.",
            "",
            "| model | seeds | in-context accuracy |",
            "|---|---|---|",
        ]
        for method, row in icl.items():
            label = "base model" if method == "base" else f"{METHODS[method].label}, after stage {len(STAGES)}"
            lines.append(f"| {label} | {len(row['seeds'])} | {mean_sd(row['after'])} |")
    if comparisons:
        lines += [
            "",
            "Differences a − b, paired by seed and by example, bootstrap 95% intervals; a verdict other than "
            "'unresolved' needs the interval to exclude 0 (for BWT, above 0 means a forgets less). The question is "
            "the first row (JFA − sequential SFT on BWT); the rest are secondary, uncorrected for their number. "
            "With one seed an interval holds only the examples' variance, so a verdict then speaks for that seed.",
            "",
            "| a − b | measure | difference | 95% interval | smallest detectable | seeds | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in comparisons:
            verdict = {"a better": "a higher", "b better": "b higher"}.get(c["verdict"], "unresolved")
            lines.append(
                f"| {METHODS[c['a']].label} − {METHODS[c['b']].label} | {c['measure']} | {c['difference']:+.2f} | "
                f"[{c['low']:+.2f}, {c['high']:+.2f}] | {c['detectable']:.2f} | {', '.join(map(str, c['seeds']))} | "
                f"{verdict} |"
            )
    if share is not None:
        lines += [
            "",
            f"Of the forgetting that replay removes (replay − SFT on BWT), JFA removes {share['share']:.0%} (95% "
            f"[{share['low']:.0%}, {share['high']:.0%}], seeds {', '.join(map(str, share['seeds']))}).",
        ]
    elif replay_gain is not None:
        lines += [
            "",
            "Replay does not forget measurably less than sequential SFT here (its BWT interval holds 0), so no share "
            "of its gain is given for JFA.",
        ]
    for method, values in accuracy.items():
        lines += ["", f"Accuracy matrix, {METHODS[method].label} (rows: after stage; mean ROUGE-L over seeds):", ""]
        lines += ["| after | " + " | ".join(TESTS) + " |", "|---" * (len(TESTS) + 1) + "|"]
        for stage, row in enumerate(values):
            label = "base" if stage == 0 else f"stage {stage} ({STAGES[stage - 1]})"
            lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
    return "\n".join(lines)


def plot_matrices(accuracy: dict[str, list[list[float]]]) -> None:
    """One heat map per method: rows = after which stage, columns = which test set."""
    with saved_figure("continual_matrices.png", ncols=len(accuracy), figsize=(3.6 * len(accuracy), 3.6)) as axes:
        axes = np.atleast_1d(axes)
        high = max(max(max(row) for row in values) for values in accuracy.values())
        for axis, (method, values) in zip(axes, accuracy.items()):
            axis.imshow(np.array(values), vmin=0, vmax=high, cmap="viridis")
            for i, row in enumerate(values):
                for j, value in enumerate(row):
                    axis.text(j, i, f"{value:.0f}", ha="center", va="center", color="white", fontsize=8)
            axis.set(
                title=METHODS[method].label,
                xticks=range(len(TESTS)),
                xticklabels=TESTS,
                yticks=range(len(values)),
                yticklabels=["base", *(f"after {s}" for s in range(1, len(values)))],
            )
            axis.tick_params(axis="x", labelrotation=45, labelsize=7)
            axis.tick_params(axis="y", labelsize=7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="outputs/bench-continual", help="Adapters and query caches.")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="Rows, in order.")
    parser.add_argument("--seeds", nargs="+", type=int, choices=SEEDS, default=list(SEEDS), help="Seeds to run.")
    parser.add_argument("--report", action="store_true", help="Only rebuild the tables and the plot.")
    args = parser.parse_args()
    if not args.report:
        if not (P3 / "train.jsonl.gz").is_file():
            raise SystemExit(f"continual.py: no {P3}: the shared data folder must sit beside the repository.")
        Bench(Path(args.work_dir)).run(args.methods, args.seeds)
    report()


if __name__ == "__main__":
    main()
