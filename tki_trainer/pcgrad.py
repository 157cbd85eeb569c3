"""PCGrad (Yu et al., 2020) between two objectives, exact under gradient accumulation and data parallelism.

Each objective's gradient is accumulated on its own over the micro-batches of an effective batch; once the
effective batch is complete (and, on several processes, both sums are all-reduced) the pair is projected once:
where ``g1 . g2 < 0`` each is projected onto the normal plane of the other, and the update is their sum.
Latent banks have row-sparse gradients and are accumulated on the rows the batch retrieved only, so the cost
does not grow with the bank size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


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

    Row-sparse gradients (the latent banks') are kept as their (rows, values) pieces and assembled on the union of
    rows at projection time, then written back as sparse gradients; the other rows are zero in both objectives and
    do not enter the projection.
    """

    def __init__(self, parameters: list[torch.nn.Parameter]) -> None:
        self.parameters = parameters
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
        for i, grad in enumerate(grads):
            if grad is None:
                continue
            if grad.is_sparse:
                grad = grad.coalesce()
                self.pieces[objective][i].append((grad.indices()[0], grad.values().float() * scale))
            else:
                value = grad.float() * scale
                current = self.dense[objective][i]
                self.dense[objective][i] = value if current is None else current + value

    def _sparse_rows(self, index: int) -> torch.Tensor | None:
        """Rows any objective (on any process: a collective) touched of a sparse parameter; None for dense ones."""
        pieces = self.pieces[0][index] + self.pieces[1][index]
        is_sparse = torch.tensor([float(bool(pieces))])
        mask = torch.zeros(self.parameters[index].shape[0], dtype=torch.uint8)
        for rows, _ in pieces:
            mask[rows.cpu()] = 1
        if _distributed():
            dist.all_reduce(is_sparse, op=dist.ReduceOp.MAX)
            dist.all_reduce(mask, op=dist.ReduceOp.MAX)
        return mask.nonzero().flatten().to(self.parameters[index].device) if is_sparse.item() else None

    def _flat(self, objective: int, rows: list[torch.Tensor | None]) -> torch.Tensor:
        parts = []
        for i, p in enumerate(self.parameters):
            if rows[i] is None:
                value = self.dense[objective][i]
                parts.append((value if value is not None else torch.zeros_like(p, dtype=torch.float32)).flatten())
                continue
            position = torch.full((p.shape[0],), -1, dtype=torch.long, device=p.device)
            position[rows[i]] = torch.arange(len(rows[i]), device=p.device)
            summed = torch.zeros((len(rows[i]), *p.shape[1:]), device=p.device)
            for piece_rows, values in self.pieces[objective][i]:
                summed.index_add_(0, position[piece_rows], values)
            parts.append(summed.flatten())
        return torch.cat(parts)

    def apply(self) -> Projection:
        """All-reduce (mean) both sums across processes, project, and write the update into ``.grad``."""
        rows = [self._sparse_rows(i) for i in range(len(self.parameters))]
        g1, g2 = self._flat(0, rows), self._flat(1, rows)
        if _distributed():
            pair = torch.stack([g1, g2])
            dist.all_reduce(pair)
            g1, g2 = pair / dist.get_world_size()
        update, projection = project(g1, g2)
        offset = 0
        for p, touched in zip(self.parameters, rows):
            if touched is None:
                size = p.numel()
                p.grad = update[offset : offset + size].view_as(p).to(p.dtype)
            else:
                size = len(touched) * p[0].numel()
                values = update[offset : offset + size].view(len(touched), *p.shape[1:]).to(p.dtype)
                p.grad = torch.sparse_coo_tensor(touched.unsqueeze(0), values, p.shape, is_coalesced=True, check_invariants=False)
            offset += size
        self._reset()
        return projection


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
