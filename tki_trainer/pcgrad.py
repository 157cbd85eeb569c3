"""PCGrad (Yu et al., 2020) between two objectives, exact under gradient accumulation and data parallelism.

Each objective's gradient is accumulated on its own over the micro-batches of an effective batch; once the
effective batch is complete (and, on several processes, both sums are all-reduced) the pair is projected once:
where ``g1 . g2 < 0`` each is projected onto the normal plane of the other, and the update is their sum.
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
    """Per-objective gradient sums over the trainable parameters of one effective batch."""

    def __init__(self, parameters: list[torch.nn.Parameter]) -> None:
        self.parameters = parameters
        self.sums = [None, None]

    def take_gradients(self) -> torch.Tensor:
        """The parameters' ``.grad`` as one flat tensor, leaving ``.grad`` empty for the next backward."""
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in self.parameters])
        for p in self.parameters:
            p.grad = None
        return flat

    def add(self, objective: int, flat: torch.Tensor) -> None:
        """Add a flat gradient to objective ``objective``'s sum (0: SFT, 1: reinstatement)."""
        self.sums[objective] = flat if self.sums[objective] is None else self.sums[objective] + flat

    def apply(self) -> Projection:
        """All-reduce (mean) both sums across processes, project, and write the update into ``.grad``."""
        g1, g2 = self.sums
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            pair = torch.stack([g1, g2])
            dist.all_reduce(pair)
            g1, g2 = pair / dist.get_world_size()
        update, projection = project(g1, g2)
        offset = 0
        for p in self.parameters:
            p.grad = update[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        self.sums = [None, None]
        return projection
