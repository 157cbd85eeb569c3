"""PCGrad (Yu et al., 2020): the projection of conflicting objective gradients."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Projection:
    """What one projection saw: the cosine of every pair of objectives' gradients ([objectives, objectives]; 0
    where a gradient is zero)."""

    cosines: torch.Tensor

    def cosine(self, i: int = 0, j: int = 1) -> float:
        return float(self.cosines[i, j])

    @property
    def conflict(self) -> bool:
        """Whether some pair of gradients conflicted (and was projected)."""
        return bool((self.cosines < 0).any())


def project(gradients: torch.Tensor) -> tuple[torch.Tensor, Projection]:
    """The PCGrad update of flat gradients ``[objectives, size]``: each ``g_i``, in turn projected onto the normal
    plane of every original ``g_j`` it conflicts with, then summed. The ``j`` are visited in index order (Yu et al.
    draw a random order; a fixed one gives every process and every rerun the same update); with two objectives the
    order does not matter."""
    dots = gradients @ gradients.T
    norms = dots.diagonal().sqrt()
    cosines = dots / torch.outer(norms, norms).clamp(min=1e-30)
    projected = gradients.clone()
    count = len(gradients)
    for i in range(count):
        for j in range(count):
            if i == j or norms[j] == 0:
                continue
            dot = torch.dot(projected[i], gradients[j])
            if dot < 0:
                projected[i] -= dot / dots[j, j] * gradients[j]
    return projected.sum(dim=0), Projection(cosines.cpu())
