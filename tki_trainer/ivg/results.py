"""Per-task extraction results, kept on disk as each task finishes so that an interrupted extraction resumes.

Layout of an output directory::

    ivg_run.json                               fingerprints of the model (its adapter included) and tokenizer
    tasks/activations-<key>.safetensors        "mean" [layers, heads, head_dim], "correct" [prompts] bool
    tasks/effects-<key>.safetensors            "effects" [prompts, layers, heads]
    instruction_vector.{safetensors,json}      the result (see `InstructionVector`)

``<key>`` hashes the task's name and examples and the settings the stage depends on, so changed data or
settings give new files and everything else is reused. Each file's header metadata (JSON) names its task and
counts. Every file is written under a temporary name and renamed: it is either complete or absent.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from .._io import staged_file
from ..reinstatement.fingerprint import model_fingerprint, tokenizer_fingerprint


INDEX = "ivg_run.json"


def adapter_checksum(model: nn.Module) -> str | None:
    """SHA-256 of a PEFT model's adapter weights (they change the heads' activations); None for a plain model."""
    if not isinstance(model, PeftModel):
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(get_peft_model_state_dict(model).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()


def result_key(task: str, examples: list[tuple[str, str]], settings: dict) -> str:
    payload = json.dumps({"task": task, "examples": examples, "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class TaskResults:
    """Stored per-task tensors by stage and key; in memory only when ``directory`` is None."""

    def __init__(
        self, directory: str | os.PathLike | None, model: nn.Module, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        if self.directory is None:
            return
        index = {
            "model": model_fingerprint(model),
            "adapter_sha256": adapter_checksum(model),
            "tokenizer": tokenizer_fingerprint(tokenizer),
        }
        path = self.directory / INDEX
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored != json.loads(json.dumps(index)):
                differ = sorted(key for key in index if stored.get(key) != json.loads(json.dumps(index[key])))
                raise ValueError(
                    f"{self.directory} holds instruction-vector results of another {' and '.join(differ)}: pass "
                    "another output_dir, or delete it to extract again."
                )
        else:
            with staged_file(path) as staging:
                staging.write_text(json.dumps(index, indent=2, sort_keys=True))

    def _path(self, stage: str, key: str) -> Path:
        return self.directory / "tasks" / f"{stage}-{key}.safetensors"

    def get(self, stage: str, key: str) -> dict[str, torch.Tensor] | None:
        if self.directory is None:
            return self._memory.get(f"{stage}-{key}")
        path = self._path(stage, key)
        if not path.is_file():
            return None
        with safe_open(path, framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}

    def put(self, stage: str, key: str, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
        tensors = {name: value.contiguous() for name, value in tensors.items()}
        if self.directory is None:
            self._memory[f"{stage}-{key}"] = tensors
            return
        with staged_file(self._path(stage, key)) as staging:
            save_file(tensors, staging, metadata={"metadata": json.dumps(metadata)})
