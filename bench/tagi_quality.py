"""Do adapters generated from instructions (TAGI) answer unseen SNI tasks as well as models that read the instruction?

The quality benchmark's data and test prompts (`quality.Data`: TRAIN_ROWS rows of the SNI slice's train tasks with
Tk-Instruct's definition and two positive examples, fitted into MAX_LENGTH tokens; its SNI test prompts of unseen
tasks), so that every TAGI row pairs by example and by seed with the quality benchmark's rows that read instruction +
input: the base model, LoRA SFT (the TAGI paper's "LoRA multi-task" row) and TKI, each at the learning rate its search
chose there.

Per seed and instruction (the definition alone, or with the two demonstrations): one LoRA teacher per top-level SNI
category of the train rows, trained by `SFTTrainer` with the instruction in the prompt; then the hypernetwork
(`TAGITrainer`, the student reading the input alone; TAGI_PRESETS["embedded"]'s rate, the quality benchmark's epochs
and batch); then greedy answers of the unseen tasks, each row through its task's generated adapter. Ablations (seed 0
unless asked): without the KL term, without parameter matching. The inference cost compares, on one test task of 10
and of 100 examples (its instances repeated: the slice holds 10 per test task), the tokens each model reads and the
measured time of greedy answers: TAGI (the instruction encoded once, the input alone) against the base model reading
instruction + input.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python bench/tagi_quality.py [--runs tagi-s0 ...]

Each finished piece (teachers, a hypernetwork, an evaluation) is saved at once (``--work_dir``,
``results/tagi_quality/``): a rerun resumes; ``--report`` only rebuilds the tables.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset
from peft import LoraConfig, PeftModel
from trl import SFTConfig

import quality
from common import SNI, as_json, evaluate, mean_sd, read_record, training_arguments, write_record, write_results
from tki_trainer import load_embedded_model
from tki_trainer._io import staged_directory
from tki_trainer.data import add_query_embeddings, load_sni
from tki_trainer.embedded import load_embedded_encoder
from tki_trainer.evaluation import generate_answers
from tki_trainer.evaluation.comparison import paired_bootstrap
from tki_trainer.presets import TAGI_PRESETS
from tki_trainer.tagi import InstructionLoraConfig, TAGIConfig, TAGITrainer, sni_instruction_rows, train_teachers
from tki_trainer.tagi.rows import teacher_prompt


RUNS = quality.RESULTS / "tagi_quality"
PRESET = {key: value for key, (value, _) in TAGI_PRESETS["embedded"].items()}
SEEDS = (0, 1, 2)
DEMONSTRATIONS = "\n\nPositive Example 1 -"
"""Where the demonstrations start in an SNI instruction (`sni_prompt`): the definition alone is what comes before."""
COMPARED_WITH = ("base", "sft", "tki", "tki_literal")
"""Rows of the quality benchmark (instruction + input in the prompt) each TAGI row is compared with."""
INPUT_ALONE = "base_input_alone"
"""The base model reading the input alone, untrained like ``base``: one row for every seed."""
COST_TASK_ROWS = (10, 100)
COST_ANSWER_TOKENS = 16


@dataclass(frozen=True)
class Variant:
    label: str
    demonstrations: bool
    kl_weight: float
    matching_weight: float


VARIANTS = {
    "tagi": Variant("TAGI, definition", False, PRESET["kl_weight"], PRESET["matching_weight"]),
    "tagi_demos": Variant("TAGI, definition + 2 demonstrations", True, PRESET["kl_weight"], PRESET["matching_weight"]),
    "tagi_no_kl": Variant("TAGI, definition, without KL", False, 0.0, PRESET["matching_weight"]),
    "tagi_no_matching": Variant("TAGI, definition, without parameter matching", False, PRESET["kl_weight"], 0.0),
}
DEFAULT_RUNS = [f"{v}-s{s}" for v in ("tagi", "tagi_demos") for s in SEEDS] + ["tagi_no_kl-s0", "tagi_no_matching-s0"]
SETTINGS = {
    "train_rows": quality.TRAIN_ROWS,
    "max_length": quality.MAX_LENGTH,
    "epochs": quality.EPOCHS,
    "batch": quality.BATCH,
    "learning_rate": PRESET["learning_rate"],
    "teacher_epochs": PRESET["teacher_epochs"],
    "teacher_learning_rate": PRESET["teacher_learning_rate"],
    "r": PRESET["r"],
    "lora_alpha": PRESET["lora_alpha"],
    "target_modules": PRESET["lora_target"],
    "kl_temperature": PRESET["kl_temperature"],
    "matching_gate": PRESET["matching_gate"],
}


def instruction_rows(rows: Dataset, demonstrations: bool) -> Dataset:
    """TAGI's rows: the instruction (definition, with or without the demonstrations) apart from the input."""
    split = sni_instruction_rows(rows)
    if demonstrations:
        return split
    return split.map(lambda row: {"instruction": row["instruction"].partition(DEMONSTRATIONS)[0]})


class Bench:
    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        RUNS.mkdir(parents=True, exist_ok=True)
        _, self.tokenizer = load_embedded_model()
        self.data = quality.Data(self.tokenizer, work_dir, None)
        self.encoder = load_embedded_encoder()

    def teachers(self, demonstrations: bool, seed: int) -> dict[str, str]:
        """One LoRA per category of the train rows (kept once saved), trained with the instruction in the prompt."""
        kind = "demos" if demonstrations else "definition"
        args = SFTConfig(
            **training_arguments(
                self.work_dir / "teacher-run",
                learning_rate=PRESET["teacher_learning_rate"],
                seed=seed,
                per_device_train_batch_size=quality.BATCH,
                num_train_epochs=PRESET["teacher_epochs"],
                max_length=quality.MAX_LENGTH,
                save_strategy="no",
            )
        )
        peft_config = LoraConfig(
            r=PRESET["r"],
            lora_alpha=PRESET["lora_alpha"],
            target_modules=PRESET["lora_target"].split(","),
            task_type="CAUSAL_LM",
        )
        rows = instruction_rows(self.data.train, demonstrations)
        output_dir = self.work_dir / "teachers" / f"{kind}-s{seed}"
        return train_teachers(lambda: load_embedded_model()[0], rows, args, peft_config, output_dir, self.tokenizer)

    def adapter_config(self) -> InstructionLoraConfig:
        width = self.encoder.get_embedding_dimension()
        return InstructionLoraConfig(
            r=PRESET["r"],
            lora_alpha=PRESET["lora_alpha"],
            target_modules=PRESET["lora_target"].split(","),
            key_dim=width,
            encoder_name=PRESET["instruction_encoder"],
            encoder_dim=width,
        )

    def ensure(self, run: str) -> None:
        """Train (teachers, then the hypernetwork) and evaluate one run, saving each part as it ends."""
        variant, seed = run.rsplit("-s", 1)
        spec, seed = VARIANTS[variant], int(seed)
        config = as_json({"variant": asdict(spec), "seed": seed, "settings": SETTINGS})
        path = RUNS / f"{run}.json"
        record = read_record(path)
        if record.get("config") != config:
            record = {"config": config}
        adapter = self.work_dir / "runs" / run
        if "train" not in record or (not adapter.is_dir() and "sni" not in record.get("eval", {})):
            teachers = self.teachers(spec.demonstrations, seed)
            model, tokenizer = load_embedded_model()
            output_dir = self.work_dir / "hypernetwork-run"
            shutil.rmtree(output_dir, ignore_errors=True)
            args = TAGIConfig(
                **training_arguments(
                    output_dir,
                    learning_rate=PRESET["learning_rate"],
                    seed=seed,
                    per_device_train_batch_size=quality.BATCH,
                    num_train_epochs=quality.EPOCHS,
                    max_length=quality.MAX_LENGTH,
                    save_strategy="no",
                ),
                teachers=teachers,
                kl_weight=spec.kl_weight,
                matching_weight=spec.matching_weight,
                kl_temperature=PRESET["kl_temperature"],
                matching_gate=PRESET["matching_gate"],
                instruction_encoder=PRESET["instruction_encoder"],
            )
            rows = instruction_rows(self.data.train, spec.demonstrations)
            trainer = TAGITrainer(
                model, args=args, train_dataset=rows, processing_class=tokenizer, peft_config=self.adapter_config()
            )
            started = time.time()
            trainer.train()
            seconds = time.time() - started
            with staged_directory(adapter) as staging:
                trainer.model.save_pretrained(str(staging))
            record = {"config": config, "train": {"seconds": seconds, "log_history": trainer.state.log_history}}
            write_record(path, record)
        if "sni" not in record.get("eval", {}):
            print(f"== evaluating {run}", flush=True)
            model = self.load(adapter)
            rows = self.test_rows(spec.demonstrations)
            started = time.time()
            record.setdefault("eval", {})["sni"] = {**evaluate(model, self.tokenizer, rows, "category"),
                                                    "seconds": time.time() - started}  # fmt: skip
            write_record(path, record)

    def input_alone(self) -> None:
        """The base model reading the input alone (what TAGI reads, without a generated adapter): what the adapter
        adds, beside what the instruction in the prompt adds."""
        path, config = RUNS / f"{INPUT_ALONE}.json", as_json({"settings": quality.SETTINGS})
        record = read_record(path)
        if "sni" in record.get("eval", {}) and record.get("config") == config:
            return
        print("== evaluating the base model on the input alone", flush=True)
        model, _ = load_embedded_model()
        started = time.time()
        result = evaluate(model.eval(), self.tokenizer, self.test_rows(False), "category")
        write_record(path, {"config": config, "eval": {"sni": {**result, "seconds": time.time() - started}}})

    def load(self, adapter: Path) -> PeftModel:
        model, _ = load_embedded_model()
        return PeftModel.from_pretrained(model, str(adapter)).eval()

    def test_rows(self, demonstrations: bool) -> Dataset:
        rows = instruction_rows(self.data.eval["sni"], demonstrations)
        return add_query_embeddings(
            rows, self.encoder, column="instruction_embedding", text_of=lambda row: row["instruction"]
        )

    def inference_cost(self, adapter: Path) -> None:
        """Tokens read and seconds of greedy answers for one test task of 10 and of 100 examples: a TAGI model
        (its instruction encoded once, then the input alone; its seed changes the time only through where answers
        stop) against the base model reading instruction + input. Both answer COST_ANSWER_TOKENS tokens per example; two
        interleaved rounds, the faster kept."""
        path = RUNS / "inference_cost.json"
        digest = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
        settings = as_json(
            {
                "rows": COST_TASK_ROWS,
                "answer_tokens": COST_ANSWER_TOKENS,
                "run": adapter.name,
                "adapter_sha256": digest,
            }
        )
        if read_record(path).get("settings") == settings:
            return
        tasks = self.data.eval["sni"]["task"]
        task = max(sorted(set(tasks)), key=tasks.count)  # the most frequent; ties go to the first name
        instances = instruction_rows(load_sni(SNI, [task], max_instances=max(COST_TASK_ROWS)), False)
        # The slice holds at most 10 instances per test task: a larger task repeats them (the cost of answering
        # depends on the inputs' lengths, not on which inputs they are).
        rows = instances.select([i % len(instances) for i in range(max(COST_TASK_ROWS))])
        model, (base, _) = self.load(adapter), load_embedded_model()
        base.eval()
        result = {"task": task, "distinct_instances": len(instances)}
        for count in COST_TASK_ROWS:
            subset = rows.select(range(count))
            with_instruction = subset.map(lambda row: {"prompt": teacher_prompt(row["prompt"], row["instruction"])})
            times = {"tagi": [], "instruction in prompt": []}
            for _ in range(2):
                started = time.perf_counter()
                embedding = self.encoder.encode([subset[0]["instruction"]], convert_to_tensor=True)[0].tolist()
                tagi_rows = subset.add_column("instruction_embedding", [embedding] * count)
                generate_answers(model, self.tokenizer, tagi_rows, max_new_tokens=COST_ANSWER_TOKENS, batch_size=8)
                times["tagi"].append(time.perf_counter() - started)
                started = time.perf_counter()
                generate_answers(
                    base, self.tokenizer, with_instruction, max_new_tokens=COST_ANSWER_TOKENS, batch_size=8
                )
                times["instruction in prompt"].append(time.perf_counter() - started)
            encoder_tokens = len(self.encoder.tokenizer(subset[0]["instruction"], truncation=True)["input_ids"])
            tokens = {  # the encoder reads the instruction once (its own tokens), the model each input
                "tagi": sum(len(self.tokenizer(p)["input_ids"]) for p in subset["prompt"]) + encoder_tokens,
                "instruction in prompt": sum(len(self.tokenizer(p)["input_ids"]) for p in with_instruction["prompt"]),
            }
            result[str(count)] = {"seconds": {k: min(v) for k, v in times.items()}, "prompt_tokens": tokens}
        write_record(path, {"settings": settings, **result})


def report() -> None:
    runs = {path.stem: read_record(path) for path in sorted(RUNS.glob("*-s*.json"))}
    quality_runs = quality.finished_runs()
    found = {}
    for name, record in runs.items():
        if "sni" in record.get("eval", {}):
            variant, seed = name.rsplit("-s", 1)
            found.setdefault(variant, {})[int(seed)] = record["eval"]["sni"]
    others = {method: quality.rows_of(quality_runs, method, "sni") for method in COMPARED_WITH}
    input_alone = read_record(RUNS / f"{INPUT_ALONE}.json").get("eval", {})
    others[INPUT_ALONE] = {0: input_alone["sni"]} if "sni" in input_alone else {}
    rows = {
        VARIANTS[variant].label: {"seeds": sorted(by_seed), "rougeL": [r["all"]["rougeL"] for r in by_seed.values()]}
        for variant, by_seed in found.items()
    } | {
        (f"{method} (instruction + input, quality benchmark)" if method != INPUT_ALONE else "base (input alone)"): {
            "seeds": sorted(by_seed),
            "rougeL": [r["all"]["rougeL"] for r in by_seed.values()],
        }
        for method, by_seed in others.items()
        if by_seed
    }
    comparisons = []
    for variant, by_seed in found.items():
        against = dict(others) | ({"tagi": found["tagi"]} if variant != "tagi" and "tagi" in found else {})
        for method, other in against.items():
            untrained = method in ("base", INPUT_ALONE)  # one row for every seed
            seeds = sorted(by_seed) if untrained else sorted(set(by_seed) & set(other))
            if not seeds or not other:
                continue
            if any(by_seed[s]["ids"] != other[0 if untrained else s]["ids"] for s in seeds):
                raise ValueError(f"{variant} and {method} were scored on other SNI prompts: rerun with the same data.")
            first = np.array([by_seed[s]["per_example"]["rougeL"] for s in seeds])
            second = np.array([other[0 if untrained else s]["per_example"]["rougeL"] for s in seeds])
            result = paired_bootstrap(first, second, paired_seeds=True).to_dict()
            comparisons.append({"a": variant, "b": method, "seeds": seeds, **result})
    cost = read_record(RUNS / "inference_cost.json")
    payload = {"settings": SETTINGS, "rows": rows, "comparisons": comparisons, "inference_cost": cost}
    write_results("tagi_quality", payload, markdown(rows, comparisons, cost))


def winner(comparison: dict) -> str:
    """The verdict naming the row: "sft better", or "unresolved"."""
    side = {"a better": "a", "b better": "b"}.get(comparison["verdict"])
    return f"{comparison[side]} better" if side else comparison["verdict"]


def markdown(rows: dict, comparisons: list[dict], cost: dict) -> str:
    lines = [
        f"TAGI on the SNI slice's unseen tasks (the quality benchmark's {quality.SNI_TEST_PROMPTS} test prompts and "
        f"{quality.TRAIN_ROWS} train rows), embedded SmolLM2-135M: greedy answers, ROUGE-L x100, mean ± sd over "
        "seeds. TAGI reads the input alone, through the adapter its hypernetwork generates from the task's "
        "instruction; the other rows read instruction + input. Produced by `MALLOC_MMAP_MAX_=0 "
        "MALLOC_TRIM_THRESHOLD_=68719476736 python bench/tagi_quality.py` (resumable; `--report` rebuilds this page).",
        "",
        "| row | seeds | ROUGE-L |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {', '.join(map(str, r['seeds']))} | {mean_sd(r['rougeL'])} |" for label, r in rows.items()]
    lines += [
        "",
        "Differences a − b, paired by seed and by example (the base model, untrained, pairs with every seed), "
        "bootstrap 95% intervals.",
        "",
        "| a − b | difference | 95% interval | smallest detectable | seeds | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        lines.append(
            f"| {c['a']} − {c['b']} | {c['difference']:+.2f} | [{c['low']:+.2f}, {c['high']:+.2f}] | "
            f"{c['detectable']:.2f} | {', '.join(map(str, c['seeds']))} | {winner(c)} |"
        )
    if cost:
        lines += [
            "",
            f"Inference cost on task `{cost['task']}` (greedy answers of at most {COST_ANSWER_TOKENS} tokens, stopped "
            "at end-of-sequence, batch 8; prompt tokens: the model's, plus for TAGI the encoder's tokens of the "
            f"instruction, read once; the slice holds {cost.get('distinct_instances', '')} instances of the task, "
            f"repeated to make the larger task): TAGI ({cost['settings']['run']}) / instruction in "
            "prompt.",
            "",
            "| examples | prompt tokens | seconds |",
            "|---|---|---|",
        ]
        for count in COST_TASK_ROWS:
            entry = cost[str(count)]
            tokens, seconds = entry["prompt_tokens"], entry["seconds"]
            lines.append(
                f"| {count} | {tokens['tagi']} / {tokens['instruction in prompt']} = "
                f"{tokens['tagi'] / tokens['instruction in prompt']:.2f} | {seconds['tagi']:.1f} / "
                f"{seconds['instruction in prompt']:.1f} = {seconds['tagi'] / seconds['instruction in prompt']:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="outputs/bench-tagi", help="Teachers, hypernetworks, query caches.")
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="<variant>-s<seed>, in order.")
    parser.add_argument("--report", action="store_true", help="Only rebuild the tables.")
    args = parser.parse_args()
    if not args.report:
        bench = Bench(Path(args.work_dir))
        bench.input_alone()
        for run in args.runs:
            bench.ensure(run)
        runs = (Path(args.work_dir) / "runs" / f"tagi-s{seed}" for seed in SEEDS)
        trained = next((adapter for adapter in runs if adapter.is_dir()), None)
        if trained is not None:
            bench.inference_cost(trained)
    report()


if __name__ == "__main__":
    main()
