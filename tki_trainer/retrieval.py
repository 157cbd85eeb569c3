"""Latent-task keys and retrieval: pure tensor code, no model in sight.

A bank of ``M = C * Q`` latent tasks is addressed by frozen unit keys, ``C`` groups of ``Q``.
An example retrieves the ``k`` keys most similar (cosine) to its query, either inside its own
group (training, and whenever group ids are given) or across the bank (unseen inputs), and blends
the matching increments with weights that sum to one.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F


COSINE_EPS = 1e-6
"""Floor of the cosine similarities in the paper's ``D / sum D`` blend, so weights stay positive."""


def make_keys(num_groups: int, keys_per_group: int, key_dim: int, seed: int) -> torch.Tensor:
    """Seeded unit keys ``[C * Q, key_dim]``, orthogonal within each group and across the bank if ``M <= key_dim``.

    Orthogonality is what lets ``Q`` latent tasks of a group cover as many task directions as possible; the
    rows come from the QR decomposition of a Gaussian matrix.
    """
    if keys_per_group > key_dim:
        raise ValueError(
            f"keys_per_group={keys_per_group} orthogonal keys cannot exist in key_dim={key_dim} dimensions: "
            f"lower keys_per_group to at most {key_dim}."
        )
    generator = torch.Generator().manual_seed(seed)
    num_keys = num_groups * keys_per_group
    if num_keys <= key_dim:
        blocks = [torch.randn(key_dim, num_keys, generator=generator, dtype=torch.float64)]
    else:
        blocks = [
            torch.randn(key_dim, keys_per_group, generator=generator, dtype=torch.float64) for _ in range(num_groups)
        ]
    return torch.cat([torch.linalg.qr(block).Q.T for block in blocks]).float()


def retrieve(
    query_embeddings: torch.Tensor,
    keys: torch.Tensor,
    num_groups: int,
    top_k: int,
    group_ids: torch.Tensor | None = None,
    blend: str = "cosine",
    temperature: float = 1.0,
    inference_retrieval: str = "global",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[batch, k]`` into the bank and blend weights ``[batch, k]`` for each query.

    With ``group_ids`` each row searches only its group's keys. Without them ``inference_retrieval`` decides:
    ``"global"`` searches all ``M`` keys, ``"group"`` searches the group that holds the single most similar key.
    Weights carry no gradient: keys are frozen and queries are data.
    """
    keys_per_group = keys.shape[0] // num_groups
    similarity = F.normalize(query_embeddings.to(keys.dtype), dim=-1) @ keys.T
    if group_ids is None and inference_retrieval == "group":
        group_ids = similarity.argmax(dim=-1) // keys_per_group
    if group_ids is None:
        scores, indices = similarity.topk(top_k, dim=-1)
    else:
        grouped = similarity.view(-1, num_groups, keys_per_group)
        rows = torch.arange(similarity.shape[0], device=similarity.device)
        scores, local = grouped[rows, group_ids].topk(top_k, dim=-1)
        indices = group_ids.unsqueeze(-1) * keys_per_group + local
    if blend == "softmax":
        weights = torch.softmax(scores / temperature, dim=-1)
    else:
        distance = scores.clamp_min(COSINE_EPS)
        weights = distance / distance.sum(dim=-1, keepdim=True)
    return indices, weights


def hashed_group(example_id: str, num_groups: int, seed: int) -> int:
    """A stable group for an example without a ``group_id``: the paper's random split of the training examples
    into C groups, as a seeded hash of the id (the same across runs, processes and row order)."""
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % num_groups


def usage_entropy(indices: torch.Tensor, weights: torch.Tensor, num_keys: int) -> float:
    """Entropy (nats) of the blend-weight mass per latent task over a batch; ``log M`` when all are used equally."""
    mass = torch.zeros(num_keys, dtype=torch.float64, device=weights.device)
    mass.index_add_(0, indices.flatten(), weights.flatten().double())
    p = mass[mass > 0] / mass.sum()
    return float(-(p * p.log()).sum())
