"""TAGI's teachers: one plain PEFT LoRA per task category, trained with the instruction in the prompt
(`train_teachers`), stacked per module so that a batch mixing categories reads each row's teacher in one forward
(`apply_lora`)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, PeftConfig
from peft.utils import load_peft_weights
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from trl import SFTConfig, SFTTrainer

from .._io import staged_directory
from .losses import Factors
from .rows import teacher_rows


TRAINING_RECORD = "teacher_training.json"
"""Saved beside each adapter `train_teachers` trains: what the teacher was trained on and with."""
TRAINING_FIELDS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "world_size", "seed", "data_seed", "max_length", "truncation_mode", "lr_scheduler_type", "lr_scheduler_kwargs",
    "warmup_steps", "weight_decay", "max_grad_norm", "optim", "optim_args", "adam_beta1", "adam_beta2",
    "adam_epsilon", "label_smoothing_factor", "neftune_noise_alpha", "loss_type", "bf16", "fp16",
    "completion_only_loss", "assistant_only_loss", "packing", "padding_free", "model_init_kwargs",
)  # fmt: skip
"""What of `SFTConfig` a teacher's weights depend on (logging, saving, reporting and the device do not count)."""
LORA_FIELDS = (
    "r", "lora_alpha", "target_modules", "exclude_modules", "layers_to_transform", "lora_dropout", "use_rslora",
    "use_dora", "bias", "init_lora_weights", "rank_pattern", "alpha_pattern", "modules_to_save",
)  # fmt: skip
"""The `LoraConfig` fields a teacher's weights depend on (not PEFT's version, nor what PEFT fills in on use)."""


def train_teachers(
    model_init: Callable[[], PreTrainedModel],
    dataset: Dataset,
    args: SFTConfig,
    peft_config: LoraConfig,
    output_dir: str | os.PathLike,
    processing_class=None,
    instruction_column: str = "instruction",
    separator: str = "\n\n",
) -> dict[str, str]:
    """Train one LoRA per teacher named in ``dataset["teacher"]`` with `SFTTrainer`, on that teacher's rows with the
    instruction in the prompt (`teacher_rows`), and save it as a plain PEFT adapter in ``output_dir/<teacher>``.

    A teacher saved there from the same rows, LoRA config and training fields is kept, so a rerun resumes where an
    interrupted one stopped; one saved from others is refused (it would silently teach another task). Run by every
    process under ``accelerate launch``: each teacher trains data-parallel, the main process saves it.
    ``model_init`` gives a fresh base model for each teacher; each teacher's checkpoints, if ``args`` asks for
    any, go to ``args.output_dir/<teacher>``. Returns ``{teacher: adapter directory}`` for `TAGIConfig.teachers`.
    """
    missing = [column for column in ("teacher", instruction_column) if column not in dataset.column_names]
    if missing:
        raise ValueError(f"train_teachers needs rows with a 'teacher' and an instruction column; missing {missing}.")
    check_plain_lora(peft_config, "train_teachers' peft_config")
    if any(not isinstance(name, str) for name in dataset["teacher"]):
        raise ValueError("Some rows' 'teacher' is not a string: name every row's teacher (its task category).")
    names = sorted(set(dataset["teacher"]))
    slugs = {name: re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") for name in names}
    if len(set(slugs.values())) < len(names) or not all(slugs.values()):
        raise ValueError(
            f"Teacher names {names[:5]} do not give one directory each (letters and digits, case ignored): rename "
            "the teachers so that each has its own."
        )
    paths = {name: Path(output_dir) / slug for name, slug in slugs.items()}
    for name in tqdm(names, desc="Teachers"):
        rows = dataset.filter(lambda teacher, name=name: teacher == name, input_columns="teacher")
        rows = teacher_rows(rows, instruction_column, separator).select_columns(["prompt", "completion"])
        record = {
            "rows": hashlib.sha256(json.dumps(rows.to_dict(), sort_keys=True).encode()).hexdigest(),
            "lora": {field: getattr(peft_config, field, None) for field in LORA_FIELDS},
            "training": {field: getattr(args, field, None) for field in TRAINING_FIELDS},
        }
        if _saved_as(paths[name], name, record):
            continue
        teacher_args = copy.copy(args)
        teacher_args.output_dir = str(Path(args.output_dir) / slugs[name])
        _train(model_init(), rows, teacher_args, peft_config, processing_class, paths[name], record)
    return {name: str(path) for name, path in paths.items()}


def _saved_as(path: Path, name: str, record: dict) -> bool:
    """Whether ``path`` holds teacher ``name`` trained as ``record`` says (False: nothing there yet)."""
    if not (path / "adapter_model.safetensors").is_file():
        return False
    if not (path / TRAINING_RECORD).is_file():
        raise ValueError(
            f"Teacher {name!r} in {path} has no {TRAINING_RECORD} (an adapter saved otherwise, or a save that was "
            "interrupted): delete that directory to train it here, or give train_teachers another output_dir."
        )
    saved = json.loads((path / TRAINING_RECORD).read_text())
    changed = sorted(key for key in record if saved.get(key) != _as_json(record[key]))
    if changed:
        raise ValueError(
            f"Teacher {name!r} in {path} was trained with other {' and '.join(changed)} than asked now: delete that "
            "directory to retrain it, or give train_teachers another output_dir."
        )
    return True


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON, sets sorted (their order changes from one process to the next)."""
    return json.loads(json.dumps(value, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))


def _train(model, rows, args, peft_config, processing_class, path: Path, record: dict) -> None:
    trainer = SFTTrainer(model, args=args, train_dataset=rows, processing_class=processing_class,
                         peft_config=peft_config)  # fmt: skip
    trainer.train()
    if trainer.accelerator.is_main_process:
        with staged_directory(path) as staging:
            trainer.model.save_pretrained(str(staging))
            (staging / TRAINING_RECORD).write_text(json.dumps(_as_json(record), indent=1))
    trainer.accelerator.wait_for_everyone()


class TeacherLoras:
    """The factors of every teacher, per module: ``A`` [teachers, r, in] and ``B`` [teachers, out, r] with each
    teacher's ``lora_alpha / r`` folded into ``B`` (so teachers trained with different alphas compare as the
    updates they apply).

    Loaded with PEFT's own readers from the directories (or Hub ids) `SFTTrainer` saved, so a teacher is any LoRA
    adapter on the base model: plain LoRA on linear layers, one rank for all.
    """

    def __init__(self, names: Sequence[str], factors: dict[str, Factors]) -> None:
        self.names = list(names)
        self.factors = factors
        """``{module name: (A, B)}``, names relative to the base model as `generate_lora` gives them."""

    @classmethod
    def load(cls, paths: Mapping[str, str | os.PathLike]) -> TeacherLoras:
        """Read ``{teacher name: adapter directory or Hub id}``; refuse, naming the fix, what cannot be stacked."""
        if not paths:
            raise ValueError("teachers is empty: map each teacher name (a task category) to its LoRA adapter.")
        per_teacher = {name: _read(name, str(path)) for name, path in paths.items()}
        ranks = {name: next(iter(factors.values()))[0].shape[0] for name, factors in per_teacher.items()}
        modules = {name: frozenset(factors) for name, factors in per_teacher.items()}
        first = next(iter(paths))
        if len(set(ranks.values())) > 1:
            raise ValueError(f"The teachers have different ranks {ranks}: train every teacher with the same r.")
        odd = [name for name, names in modules.items() if names != modules[first]]
        if odd:
            raise ValueError(
                f"Teachers {odd[:3]} adapt other modules than teacher {first!r}: train every teacher with the same "
                "target_modules (those of the InstructionLoraConfig)."
            )
        factors = {
            module: (
                torch.stack([per_teacher[name][module][0] for name in paths]),
                torch.stack([per_teacher[name][module][1] for name in paths]),
            )
            for module in sorted(modules[first])
        }
        return cls(list(paths), factors)

    def index(self, names: Sequence[str]) -> list[int]:
        """The position of each named teacher; an unknown name is refused with the known ones."""
        position = {name: i for i, name in enumerate(self.names)}
        unknown = sorted({name for name in names if name not in position})
        if unknown:
            raise ValueError(
                f"Rows name teachers {unknown[:5]} that teachers does not hold (it holds {self.names[:5]}"
                f"{'...' if len(self.names) > 5 else ''}): add their LoRA adapters to teachers, or drop those rows."
            )
        return [position[name] for name in names]

    def gather(self, teachers: torch.Tensor) -> dict[str, Factors]:
        """The factors of the given teachers ([tasks] indexes), per module."""
        return {name: (a[teachers.to(a.device)], b[teachers.to(b.device)]) for name, (a, b) in self.factors.items()}

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TeacherLoras:
        self.factors = {name: (a.to(device, dtype), b.to(device, dtype)) for name, (a, b) in self.factors.items()}
        return self


def check_plain_lora(config: PeftConfig, what: str) -> None:
    """Refuse, naming the fix, a config whose update the hypernetwork cannot learn to generate."""
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{what} is a {config.peft_type} adapter: a teacher is a PEFT LoRA.")
    unsupported = {
        "use_dora": config.use_dora,
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
        "bias": config.bias != "none",
        "modules_to_save": config.modules_to_save,
    }
    used = [key for key, value in unsupported.items() if value]
    if used:
        raise ValueError(
            f"{what} uses {used}: a teacher is a plain LoRA (one rank and alpha, no DoRA, bias or modules_to_save), "
            "the update the hypernetwork learns to generate. Train it without them."
        )


def _read(name: str, path: str) -> dict[str, Factors]:
    config = PeftConfig.from_pretrained(path)
    check_plain_lora(config, f"Teacher {name!r} at {path}")
    scaling = config.lora_alpha / (config.r**0.5 if config.use_rslora else config.r)
    weights = load_peft_weights(path, device="cpu")
    factors = {}
    for key, lora_a in weights.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        lora_b = weights[key.replace(".lora_A.", ".lora_B.")]
        factors[module] = (lora_a.float(), lora_b.float() * scaling)
    if not factors:
        raise ValueError(f"Teacher {name!r} at {path} holds no LoRA weights (no '*.lora_A.weight' tensors).")
    return factors
