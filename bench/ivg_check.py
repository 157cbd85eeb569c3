"""Does the embedded model have an instruction vector? The IV paper's Appendix E check, on held-out P3 tasks.

For each task of TASKS (templates of P3's held-out clusters that answer in a word or a few, so the first answer
token says whether an answer is right), the first EXTRACT_ROWS rows give the instruction vector (`IV_CONFIG`: the
paper's 10 heads and Todd et al.'s layer |L|/3; 5 shots and 50 activation prompts, not the paper's 10 and 200, to fit
a CPU's hour) and the next EVAL_ROWS rows are the queries, none of them seen by the extraction:

- sufficiency: zero-shot accuracy (the query alone) without and with the task's IV added at the last prompt token;
- necessity: N-shot accuracy (N demonstrations of the task, then the query) without and with the IV removed;
- control: the same with a random vector of the IV's norm (the paper: random vectors change nothing), and zero-shot
  with the mean of the tasks' vectors (what IV-guided training adds when it is given several tasks);
- specificity: a quarter of the IV removed against a quarter of the random vector (the whole of either is about as
  long as the hidden state it is added to, and wipes out any answer).

A prompt is answered correctly when the greedy answer's first token is the reference's (as extraction counts it).
Differences are paired by query, with bootstrap 95% intervals; the heads table gives the chosen heads' causal
effects with intervals over the effect prompts (the heads were chosen on those prompts, so these intervals lean
high; the accuracy rows, on unseen queries, are the unbiased test).

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python bench/ivg_check.py [--report]

Extraction and each task's accuracies are saved as they finish (``--work_dir``, ``results/ivg_check/``): a rerun
resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from safetensors import safe_open

from common import P3, RESULTS, read_record, write_record, write_results
from tki_trainer import load_embedded_model
from tki_trainer.data import load_p3
from tki_trainer.evaluation.comparison import paired_bootstrap
from tki_trainer.ivg import InstructionVector, IVConfig, answered_correctly, extract_instruction_vector
from tki_trainer.ivg.prompts import encode_prompt, n_shot_prompts, padded_batch, task_generator


TASKS = (
    ("glue_mrpc", "equivalent"),
    ("glue_qqp", "duplicate_or_not"),
    ("paws_labeled_final", "PAWS_ANLI_GPT3"),
    ("common_gen", "topics_from_the_sentence"),
)
"""Paraphrase identification under three templates (labels 'equivalent' / 'not equivalent', 'duplicates' / 'not
duplicates', 'True' / 'False') and concept extraction (the first concept of a sentence)."""
EXTRACT_ROWS = 100
EVAL_ROWS = 100
ACTIVATION_PROMPTS = 50
IV_CONFIG = IVConfig(
    shots=5,
    activation_prompts=ACTIVATION_PROMPTS,
    effect_prompts=20,
    top_heads=10,
    task_column="task",
    input_column="prompt",
    output_column="completion",
)
CONDITIONS = {
    "zero-shot": (0, None, 0.0),
    "zero-shot + IV": (0, "iv", 1.0),
    "zero-shot + random": (0, "random", 1.0),
    "zero-shot + mean IV": (0, "mean", 1.0),
    "N-shot": (IV_CONFIG.shots, None, 0.0),
    "N-shot - IV": (IV_CONFIG.shots, "iv", -1.0),
    "N-shot - random": (IV_CONFIG.shots, "random", -1.0),
    "N-shot - IV/4": (IV_CONFIG.shots, "iv", -0.25),
    "N-shot - random/4": (IV_CONFIG.shots, "random", -0.25),
}
"""Per condition: the demonstrations before the query, the vector, its scale."""
COMPARISONS = (
    ("zero-shot + IV", "zero-shot"),
    ("zero-shot + random", "zero-shot"),
    ("zero-shot + IV", "zero-shot + random"),
    ("zero-shot + mean IV", "zero-shot"),
    ("N-shot - IV", "N-shot"),
    ("N-shot - random", "N-shot"),
    ("N-shot - IV", "N-shot - random"),
    ("N-shot - IV/4", "N-shot"),
    ("N-shot - IV/4", "N-shot - random/4"),
)
RUNS = RESULTS / "ivg_check"
VERDICTS = {"a better": "a higher", "b better": "b higher", "unresolved": "unresolved"}


def task_name(dataset: str, template: str) -> str:
    return f"{dataset}/{template}"


def task_rows() -> dict[str, Dataset]:
    """EXTRACT_ROWS + EVAL_ROWS rows of each task, in a seeded order, with its name in a ``task`` column."""
    rows = load_p3(P3 / "heldout.jsonl.gz")
    tasks = {}
    for dataset, template in TASKS:
        keep = [i for i, key in enumerate(zip(rows["dataset"], rows["template"])) if key == (dataset, template)]
        chosen = rows.select(keep)
        if len(chosen) < EXTRACT_ROWS + EVAL_ROWS:
            raise SystemExit(f"ivg_check.py: {dataset}/{template} has {len(chosen)} rows, fewer than needed.")
        chosen = chosen.select(range(EXTRACT_ROWS + EVAL_ROWS))
        tasks[task_name(dataset, template)] = chosen.add_column("task", [task_name(dataset, template)] * len(chosen))
    return tasks


def random_vector(like: torch.Tensor, task: str) -> torch.Tensor:
    """A Gaussian direction with the IV's norm, seeded by the task."""
    direction = torch.randn(like.shape, generator=task_generator(IV_CONFIG.seed, task, "random vector"))
    return direction * like.norm() / direction.norm()


def evaluation_prompts(tokenizer, task: str, rows: Dataset, shots: int) -> list:
    """The EVAL_ROWS queries, each with ``shots`` demonstrations drawn from the task's other rows."""
    examples = list(zip(rows["prompt"], rows["completion"]))
    queries = list(range(EXTRACT_ROWS, len(examples)))
    template = IV_CONFIG.format
    if shots == 0:
        return [encode_prompt(tokenizer, template, [], examples[q], q) for q in queries]
    return n_shot_prompts(tokenizer, template, examples, queries, shots, task_generator(IV_CONFIG.seed, task, "eval"))


@torch.no_grad()
def hidden_norm(model, prompts: list, layer: int, pad_token_id: int) -> float:
    """Mean norm of decoder layer ``layer``'s output at the prompts' last tokens: what the vector is added to."""
    norms = []
    for start in range(0, len(prompts), 8):
        batch = padded_batch(prompts[start : start + 8], pad_token_id, torch.device("cpu"))
        states = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        ).hidden_states[layer + 1]
        norms.append(states[torch.arange(len(batch["last"])), batch["last"]].norm(dim=-1))
    return float(torch.cat(norms).mean())


def run(work_dir: Path) -> None:
    model, tokenizer = load_embedded_model()
    model.eval()
    tasks = task_rows()
    extraction = [row for rows in tasks.values() for row in rows.select(range(EXTRACT_ROWS))]
    iv = extract_instruction_vector(model, tokenizer, extraction, IV_CONFIG, output_dir=work_dir / "iv")
    RUNS.mkdir(parents=True, exist_ok=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    digest = vector_digest(iv)
    for task, rows in tasks.items():
        path = RUNS / f"{task.replace('/', '--')}.json"
        record = read_record(path)
        if record.get("vector_sha256") != digest:  # measured with another vector: measure again
            record = {"vector_sha256": digest}
        if task not in iv.tasks:
            write_record(path, {"task": task, "left_out": True})
            continue
        vectors = {"iv": iv.vector(task), "random": random_vector(iv.vector(task), task), "mean": iv.vectors.mean(0)}
        if "hidden_norm" not in record:
            record["hidden_norm"] = hidden_norm(model, evaluation_prompts(tokenizer, task, rows, 0), iv.layer, pad)
            write_record(path, record)
        for condition, (shots, which, scale) in CONDITIONS.items():
            if condition in record.get("correct", {}):
                continue
            prompts = evaluation_prompts(tokenizer, task, rows, shots)
            edit = {} if which is None else {"vector": vectors[which], "layer": iv.layer, "scale": scale}
            right = answered_correctly(model, prompts, pad_token_id=pad, desc=f"{task}: {condition}", **edit)
            record.setdefault("correct", {})[condition] = right.int().tolist()
            record["task"] = task
            record["vector_norm"] = float(vectors["iv"].norm())
            record["prompt_tokens"] = {
                **record.get("prompt_tokens", {}),
                str(shots): float(np.mean([len(p.prompt_ids) for p in prompts])),
            }
            write_record(path, record)
            print(f"== {task}: {condition}: {right.float().mean():.3f}", flush=True)


def vector_digest(iv: InstructionVector) -> str:
    """What identifies the vectors a record was measured with (their values, layer and heads)."""
    return hashlib.sha256(iv.vectors.float().numpy().tobytes() + json.dumps([iv.layer, iv.heads]).encode()).hexdigest()


def head_effects(work_dir: Path, iv: InstructionVector) -> list[dict]:
    """The chosen heads' causal effects: mean over every task's effect prompts, with a bootstrap 95% interval."""
    effects = []
    for file in sorted((work_dir / "iv" / "tasks").glob("effects-*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            effects.append(handle.get_tensor("effects"))
    effects = torch.cat(effects).numpy()
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(effects), size=(10_000, len(effects)))
    rows = []
    for layer, head in iv.heads:
        values = effects[:, layer, head]
        low, high = np.quantile(values[draws].mean(1), [0.025, 0.975])
        rows.append({"layer": layer, "head": head, "effect": float(values.mean()), "low": low, "high": high})
    return rows


def report(work_dir: Path) -> None:
    iv = InstructionVector.load(work_dir / "iv")
    records = [read_record(path) for path in sorted(RUNS.glob("*.json"))]
    records = [
        r for r in records if len(r.get("correct", {})) == len(CONDITIONS) and r["vector_sha256"] == vector_digest(iv)
    ]
    accuracy = {r["task"]: {c: 100 * float(np.mean(v)) for c, v in r["correct"].items()} for r in records}
    norms = {r["task"]: {"vector": r["vector_norm"], "hidden": r.get("hidden_norm", float("nan"))} for r in records}
    comparisons = []
    for record in records:
        for a, b in COMPARISONS:
            result = paired_bootstrap(np.array(record["correct"][a]) * 100, np.array(record["correct"][b]) * 100)
            comparisons.append({"task": record["task"], "a": a, "b": b, **result.to_dict()})
    heads = head_effects(work_dir, iv)
    payload = {
        "settings": {
            "tasks": [task_name(*task) for task in TASKS],
            "extract_rows": EXTRACT_ROWS,
            "eval_rows": EVAL_ROWS,
            "iv_config": IV_CONFIG.to_dict(),
        },
        "layer": iv.layer,
        "heads": heads,
        "provenance": iv.provenance,
        "accuracy": accuracy,
        "norms": norms,
        "comparisons": comparisons,
    }
    write_results("ivg_check", payload, markdown(iv, accuracy, norms, comparisons, heads))


def markdown(iv: InstructionVector, accuracy: dict, norms: dict, comparisons: list[dict], heads: list[dict]) -> str:
    lines = [
        "Instruction vector of the embedded SmolLM2-135M (the IV paper's Appendix E check): extracted from the first "
        f"{EXTRACT_ROWS} rows of each task ({IV_CONFIG.shots}-shot prompts, the {len(iv.heads)} heads with the "
        f"largest mean causal effect, added at layer {iv.layer}), tested on the next {EVAL_ROWS} rows. "
        "Accuracy: the greedy answer's first token is the reference's, x100. Produced by `MALLOC_MMAP_MAX_=0 "
        "MALLOC_TRIM_THRESHOLD_=68719476736 python bench/ivg_check.py` (resumable; `--report` rebuilds this page).",
        "",
        "| task | prompts answered right in extraction | IV norm / hidden norm | " + " | ".join(CONDITIONS) + " |",
        "|---|---|---|" + "---|" * len(CONDITIONS),
    ]
    counts = iv.provenance.get("tasks", {})
    for task, values in accuracy.items():
        extracted, norm = counts.get(task, {}), norms.get(task, {})
        lines.append(
            f"| {task} | {extracted.get('correct', '–')} / {extracted.get('prompts', '–')} | "
            f"{norm.get('vector', float('nan')):.0f} / {norm.get('hidden', float('nan')):.0f} | "
            + " | ".join(f"{values[c]:.0f}" for c in CONDITIONS)
            + " |"
        )
    lines += [
        "",
        "Differences a − b in accuracy points, paired by query, bootstrap 95% intervals (one extraction, one seed: the "
        "interval holds the queries' variance only).",
        "",
        "| task | a − b | difference | 95% interval | verdict |",
        "|---|---|---|---|---|",
    ]
    for row in comparisons:
        lines.append(
            f"| {row['task']} | {row['a']} − {row['b']} | {row['difference']:+.1f} | "
            f"[{row['low']:+.1f}, {row['high']:+.1f}] | {VERDICTS[row['verdict']]} |"
        )
    lines += [
        "",
        "Chosen heads: mean causal effect (rise of the answer's first-token probability when the head's task mean is "
        "patched into label-shuffled prompts) over every task's effect prompts, bootstrap 95% interval.",
        "",
        "| layer | head | effect | 95% interval |",
        "|---|---|---|---|",
    ]
    for row in heads:
        lines.append(
            f"| {row['layer']} | {row['head']} | {row['effect']:+.4f} | [{row['low']:+.4f}, {row['high']:+.4f}] |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="outputs/bench-ivg", help="Extraction results (resumable).")
    parser.add_argument("--report", action="store_true", help="Only rebuild the tables.")
    args = parser.parse_args()
    if not args.report:
        if not (P3 / "heldout.jsonl.gz").is_file():
            raise SystemExit(f"ivg_check.py: no {P3}: the shared data folder must sit beside the repository.")
        run(Path(args.work_dir))
    report(Path(args.work_dir))


if __name__ == "__main__":
    main()
