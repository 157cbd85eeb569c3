"""The instruction vector: what extraction produces, saved as safetensors (the vectors) and JSON (the rest).

Layout of a saved directory::

    instruction_vector.safetensors   "vectors": [tasks, hidden] float32
    instruction_vector.json          tasks, layer, heads and their mean causal effects, provenance

Each file is written under a temporary name and renamed, so neither is ever half-written; the JSON records the
tasks, and a load checks them against the vectors' rows.
"""

from __future__ import annotations

import json
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._io import staged_directory
from .intervention import intervene


TENSORS = "instruction_vector.safetensors"
METADATA = "instruction_vector.json"
FORMAT_VERSION = 1


@dataclass
class InstructionVector:
    """Instruction vectors of one or more tasks, made from the same attention heads, for one layer.

    ``vectors[i]`` is task ``tasks[i]``'s IV: the sum over ``heads`` (``(layer, head)`` pairs) of that task's
    mean head activation, each projected into the residual stream by its head's share of the output projection.
    It is added to the output of decoder layer ``layer``.
    """

    vectors: torch.Tensor
    tasks: list[str]
    layer: int
    heads: list[tuple[int, int]]
    head_effects: list[float] | None = None
    """The mean causal effect of each head of ``heads``, when extraction chose them (None when they were given)."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """The model, the settings, and per task how many prompts were answered correctly."""

    def __post_init__(self) -> None:
        self.heads = [(int(layer), int(head)) for layer, head in self.heads]
        if self.vectors.dim() != 2 or self.vectors.shape[0] != len(self.tasks):
            raise ValueError(
                f"vectors must be [tasks, hidden] with one row per task: got {tuple(self.vectors.shape)} for "
                f"{len(self.tasks)} tasks."
            )
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"Task names must be unique: {self.tasks}.")
        if not bool(torch.isfinite(self.vectors).all()):
            raise ValueError("The instruction vectors hold NaN or inf: extract them again, or check their source.")
        if self.head_effects is not None and len(self.head_effects) != len(self.heads):
            raise ValueError("head_effects needs one value per head, or None.")

    @property
    def hidden_size(self) -> int:
        return self.vectors.shape[1]

    def vector(self, task: str | None = None) -> torch.Tensor:
        """The IV of ``task`` ([hidden]); the task may be omitted when there is only one."""
        if task is None:
            if len(self.tasks) != 1:
                raise ValueError(f"This InstructionVector holds {len(self.tasks)} tasks: name one of {self.tasks}.")
            return self.vectors[0]
        if task not in self.tasks:
            raise ValueError(f"No instruction vector for task {task!r}: it holds {self.tasks}.")
        return self.vectors[self.tasks.index(task)]

    def intervention(
        self, model: nn.Module, task: str | None = None, scale: float = 1.0, **kwargs: Any
    ) -> AbstractContextManager[None]:
        """`intervene` with this task's vector at this vector's layer (``scale=-1`` removes it)."""
        return intervene(model, self.vector(task), self.layer, scale=scale, **kwargs)

    def save(self, directory: str | os.PathLike) -> None:
        metadata = {
            "format": FORMAT_VERSION,
            "tasks": self.tasks,
            "layer": self.layer,
            "heads": self.heads,
            "head_effects": self.head_effects,
            "provenance": self.provenance,
        }
        with staged_directory(directory) as staging:
            save_file({"vectors": self.vectors.float().contiguous()}, staging / TENSORS)
            (staging / METADATA).write_text(json.dumps(metadata, indent=2))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> InstructionVector:
        directory = Path(directory)
        if not (directory / TENSORS).is_file() or not (directory / METADATA).is_file():
            raise ValueError(
                f"{directory} holds no instruction vector ({TENSORS} and {METADATA}): pass a directory written by "
                "InstructionVector.save or extract_instruction_vector."
            )
        metadata = json.loads((directory / METADATA).read_text())
        if metadata.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"{directory / METADATA} has format {metadata.get('format')!r}, this version reads {FORMAT_VERSION}: "
                "extract the vector again with this version."
            )
        return cls(
            vectors=load_file(directory / TENSORS)["vectors"],
            tasks=metadata["tasks"],
            layer=metadata["layer"],
            heads=metadata["heads"],
            head_effects=metadata["head_effects"],
            provenance=metadata["provenance"],
        )
