"""The hypernetwork: an instruction embedding in, the LoRA factors of every targeted module out."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .config import InstructionLoraConfig


@dataclass(frozen=True)
class ModuleSpec:
    """Where a targeted linear layer sits (its depth, the numbers in its name; its type, the rest of its name) and
    its shape: what the hypernetwork needs to embed it and size its factors."""

    depth: tuple[int, ...]
    kind: str
    in_features: int
    out_features: int

    @classmethod
    def of(cls, name: str, layer: nn.Module) -> ModuleSpec:
        parts = name.split(".")
        depth = tuple(int(part) for part in parts if part.isdigit())
        kind = ".".join(part for part in parts if not part.isdigit())
        return cls(depth, kind, layer.in_features, layer.out_features)


class _ResidualBlock(nn.Module):
    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, 4 * width),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(4 * width, width),
            nn.SiLU(),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class LoraHypernetwork(nn.Module):
    """Text-to-LoRA's hypernetwork over the modules of one adapter.

    Each (task, module) pair is one row through the trunk: ``[task code, depth embedding, type embedding]`` in, a
    ``hidden_dim`` vector out, and the head of the module's type turns it into ``A`` ``[r, in]`` and ``B``
    transposed ``[r, out]``. Heads start at zero weight with a bias equal to a freshly initialised PEFT LoRA
    (``A`` Kaiming-uniform, ``B`` zero; Beck et al.'s bias-HyperInit, Text-to-LoRA's ``match_lora_init``), so an
    untrained hypernetwork gives every task the zero update and training starts from the base model.
    """

    def __init__(self, config: InstructionLoraConfig, modules: dict[str, ModuleSpec]) -> None:
        super().__init__()
        self.rank = config.r
        kinds = sorted({spec.kind for spec in modules.values()})
        depths = sorted({spec.depth for spec in modules.values()})
        # Modules ordered by type, then depth: each type's modules form one contiguous span of rows.
        self.module_names = sorted(modules, key=lambda name: (kinds.index(modules[name].kind), modules[name].depth))
        self._position = {name: i for i, name in enumerate(self.module_names)}
        self._kind_of = [kinds.index(modules[name].kind) for name in self.module_names]
        self._shapes: list[tuple[int, int]] = []
        for kind in kinds:
            shapes = {(s.in_features, s.out_features) for s in modules.values() if s.kind == kind}
            if len(shapes) > 1:
                raise ValueError(
                    f"The modules of type {kind!r} have different shapes {sorted(shapes)}, but one output head serves "
                    "each type: leave the odd ones out of target_modules (or add them to exclude_modules)."
                )
            self._shapes.append(shapes.pop())
        counts = [self._kind_of.count(kind) for kind in range(len(kinds))]
        starts = [sum(counts[:kind]) for kind in range(len(kinds))]
        self._spans = [(kind, starts[kind], starts[kind] + counts[kind]) for kind in range(len(kinds))]
        depth_index = [depths.index(modules[name].depth) for name in self.module_names]
        self.register_buffer("depth_index", torch.tensor(depth_index), persistent=False)

        width = config.task_embedding_dim + config.layer_embedding_dim + config.module_embedding_dim
        dropout = config.hypernet_dropout
        self.task_encoder = nn.Sequential(
            nn.Linear(config.key_dim, config.task_embedding_dim), nn.LayerNorm(config.task_embedding_dim)
        )
        self.layer_embedding = nn.Embedding(len(depths), config.layer_embedding_dim)
        self.layer_norm = nn.LayerNorm(config.layer_embedding_dim)
        self.module_embedding = nn.Embedding(len(kinds), config.module_embedding_dim)
        self.module_norm = nn.LayerNorm(config.module_embedding_dim)
        self.trunk = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(width, 4 * width),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(4 * width, width),
            nn.SiLU(),
            *(_ResidualBlock(width, dropout) for _ in range(config.num_blocks)),
            nn.LayerNorm(width),
            nn.Linear(width, 4 * width),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(4 * width, config.hidden_dim),
            nn.SiLU(),
        )
        self.heads = nn.ModuleList(
            nn.Linear(config.hidden_dim, config.r * (in_features + out_features))
            for in_features, out_features in self._shapes
        )
        for head, (in_features, out_features) in zip(self.heads, self._shapes):
            lora_a = torch.empty(config.r, in_features)
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
            with torch.no_grad():
                head.weight.zero_()
                head.bias.copy_(torch.cat([lora_a.flatten(), torch.zeros(config.r * out_features)]))

    def forward(
        self, instruction_embeddings: torch.Tensor, module_name: Optional[str] = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module: (A [tasks, r, in], B^T [tasks, r, out])}`` for every module, or for ``module_name`` only.

        One trunk pass per module type (over all its modules and tasks at once), never per task or example.
        """
        task = self.task_encoder(instruction_embeddings.to(self.heads[0].weight))
        tasks = task.shape[0]
        if module_name is None:
            spans = self._spans
        else:
            position = self._position[module_name]
            spans = [(self._kind_of[position], position, position + 1)]
        factors = {}
        for kind, start, stop in spans:
            layers = self.layer_norm(self.layer_embedding(self.depth_index[start:stop]))
            module = self.module_norm(self.module_embedding.weight[kind])
            rows = torch.cat(
                [
                    task.unsqueeze(1).expand(-1, stop - start, -1),
                    layers.unsqueeze(0).expand(tasks, -1, -1),
                    module.expand(tasks, stop - start, -1),
                ],
                dim=-1,
            )
            in_features, out_features = self._shapes[kind]
            a, b = self.heads[kind](self.trunk(rows)).split([self.rank * in_features, self.rank * out_features], -1)
            for j, name in enumerate(self.module_names[start:stop]):
                factors[name] = (
                    a[:, j].view(tasks, self.rank, in_features),
                    b[:, j].view(tasks, self.rank, out_features),
                )
        return factors
