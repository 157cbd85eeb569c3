"""PCGrad (Yu et al., 2020) between two objectives, exact under gradient accumulation and data parallelism.

Each objective's gradient is accumulated on its own over the micro-batches of an effective batch; once the
effective batch is complete (and, on several processes, both sums are all-reduced) the pair is projected once:
where ``g1 . g2 < 0`` each is projected onto the normal plane of the other, and the update is their sum.
Latent banks are accumulated on the rows the batch retrieved only (the other rows' gradients are zero), so
the cost does not grow with the bank size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .optim import TouchedRows


@dataclass
class Projection:
    """What one projection did: the cosine of the two gradients and whether they conflicted."""

    cosine: float
    conflict: bool


def project(g1: torch.Tensor, g2: torch.Tensor) -> tuple[torch.Tensor, Projection]:
    """``g1' + g2'`` for two flat gradients, each projected off the other (original) one when they conflict."""
    dot = torch.dot(g1, g2)
    norm1, norm2 = g1.square().sum(), g2.square().sum()
    cosine = float(dot / (norm1.sqrt() * norm2.sqrt()).clamp(min=1e-30))
    if dot >= 0 or norm1 == 0 or norm2 == 0:
        return g1 + g2, Projection(cosine, False)
    return (g1 - dot / norm2 * g2) + (g2 - dot / norm1 * g1), Projection(cosine, True)


class PCGradAccumulator:
    """Per-objective gradient sums over the trainable parameters of one effective batch.

    ``banks`` are parameters whose gradient is non-zero only on the ``touched`` rows (dim 0): their sums are kept
    as (rows, values) pieces and assembled on the union of touched rows at projection time.
    """

    def __init__(
        self,
        parameters: list[torch.nn.Parameter],
        banks: list[torch.nn.Parameter] = (),
        touched: TouchedRows | None = None,
    ) -> None:
        self.parameters = parameters
        self.is_bank = [any(p is bank for bank in banks) for p in parameters]
        self.touched = touched
        self._reset()

    def _reset(self) -> None:
        self.dense: list[list[torch.Tensor | None]] = [[None] * len(self.parameters) for _ in range(2)]
        self.pieces: list[list[list[tuple[torch.Tensor, torch.Tensor]]]] = [[[] for _ in self.parameters] for _ in range(2)]

    def take_gradients(self) -> list[torch.Tensor | None]:
        """The parameters' ``.grad`` (moved out, leaving ``.grad`` empty for the next backward)."""
        grads = [p.grad for p in self.parameters]
        for p in self.parameters:
            p.grad = None
        return grads

    def add(self, objective: int, grads: list[torch.Tensor | None], scale: float = 1.0) -> None:
        """Add one backward's gradients, times ``scale``, to objective ``objective`` (0: SFT, 1: reinstatement)."""
        rows = self.touched.local_rows() if self.touched is not None and any(self.is_bank) else None
        for i, grad in enumerate(grads):
            if grad is None:
                continue
            if self.is_bank[i]:
                local = rows.to(grad.device)
                self.pieces[objective][i].append((local, grad.index_select(0, local).float() * scale))
            else:
                value = grad.float() * scale
                current = self.dense[objective][i]
                self.dense[objective][i] = value if current is None else current + value

    def _flat(self, objective: int, rows: torch.Tensor | None) -> torch.Tensor:
        parts = []
        for i, p in enumerate(self.parameters):
            if self.is_bank[i]:
                position = torch.full((p.shape[0],), -1, dtype=torch.long, device=p.device)
                position[rows] = torch.arange(len(rows), device=p.device)
                summed = torch.zeros((len(rows), *p.shape[1:]), device=p.device)
                for piece_rows, values in self.pieces[objective][i]:
                    summed.index_add_(0, position[piece_rows], values)
                parts.append(summed.flatten())
            else:
                value = self.dense[objective][i]
                parts.append((value if value is not None else torch.zeros_like(p, dtype=torch.float32)).flatten())
        return torch.cat(parts)

    def apply(self) -> Projection:
        """All-reduce (mean) both sums across processes, project, and write the update into ``.grad``."""
        rows = self.touched.rows() if self.touched is not None and any(self.is_bank) else None
        if rows is not None:
            rows = rows.to(self.parameters[0].device)
        g1, g2 = self._flat(0, rows), self._flat(1, rows)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            pair = torch.stack([g1, g2])
            dist.all_reduce(pair)
            g1, g2 = pair / dist.get_world_size()
        update, projection = project(g1, g2)
        offset = 0
        for i, p in enumerate(self.parameters):
            if self.is_bank[i]:
                size = len(rows) * p[0].numel()
                values = update[offset : offset + size].view(len(rows), *p.shape[1:])
                p.grad = torch.zeros_like(p).index_copy_(0, rows, values.to(p.dtype))
            else:
                size = p.numel()
                p.grad = update[offset : offset + size].view_as(p).to(p.dtype)
            offset += size
        self._reset()
        return projection
