"""One process of the two-process `ObjectiveGradients` check in test_pcgrad.py (gloo, started with
torch.multiprocessing): it accumulates the hand-made gradients of its rank, records every torch.distributed
collective that `apply` makes, and saves what it saw for the test to compare with the mean computed by hand."""

from __future__ import annotations

import datetime
import functools
from pathlib import Path

import torch
import torch.distributed as dist

from tki_trainer.gradients import ObjectiveGradients


COLLECTIVES = (
    "all_gather",
    "all_gather_coalesced",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_reduce",
    "all_reduce_coalesced",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "batch_isend_irecv",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "irecv",
    "isend",
    "monitored_barrier",
    "recv",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "scatter_object_list",
    "send",
)
SIZES = (3, 30)
"""Parameter counts of the two models whose number of collectives per `apply` must be the same."""
MICRO_BATCHES = 2
BANK_ROWS = 8


def is_bank(index: int) -> bool:
    """Every third parameter is a latent bank (row-sparse gradients), the others are dense."""
    return index % 3 == 0


def shapes(count: int) -> list[tuple[int, ...]]:
    return [(BANK_ROWS, 3) if is_bank(i) else ((2, 3) if i % 3 == 1 else (4,)) for i in range(count)]


def bank_rows(rank: int, index: int, micro_batch: int, objective: int) -> list[int]:
    """Rows 0 and 7 are touched on rank 0 only, row 5 on rank 1 only, row 2 on both; bank 3 only on rank 0."""
    if index == 3 and rank == 1:
        return []
    rows = [0, 2] if rank == 0 else [2, 5]
    return rows + [7] if rank == 0 and objective == 1 and micro_batch == 1 else rows


def gradients(rank: int, count: int, micro_batch: int, objective: int) -> list[torch.Tensor | None]:
    """One backward's gradients on ``rank``: dense tensors, sparse COO for the banks, None where untouched (the
    second dense parameter on rank 1, the last parameter of the large model everywhere)."""
    generator = torch.Generator().manual_seed(1000 * rank + 100 * count + 10 * micro_batch + objective)
    grads: list[torch.Tensor | None] = []
    for i, shape in enumerate(shapes(count)):
        if (i == 1 and rank == 1) or i == SIZES[1] - 1:
            grads.append(None)
        elif is_bank(i):
            rows = bank_rows(rank, i, micro_batch, objective)
            values = torch.randn(len(rows), *shape[1:], generator=generator)
            grads.append(
                torch.sparse_coo_tensor(torch.tensor([rows], dtype=torch.long), values, shape, check_invariants=True)
                if rows
                else None
            )
        else:
            grads.append(torch.randn(shape, generator=generator))
    return grads


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in _tensors(item)]
    return []


def worker(rank: int, world_size: int, init_file: str, device: str, output: str) -> None:
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timeout
    )
    calls: list[tuple[str, list[str]]] = []

    def recorded(name, collective):
        @functools.wraps(collective)
        def wrapper(*args, **kwargs):
            devices = [str(t.device) for t in _tensors(list(args) + list(kwargs.values()))]
            calls.append((name, devices))
            return collective(*args, **kwargs)

        return wrapper

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, recorded(name, getattr(dist, name)))
    results = {}
    for count in SIZES:
        for num_objectives in (1, 2, 3):
            parameters = [torch.nn.Parameter(torch.zeros(shape, device=device)) for shape in shapes(count)]
            accumulator = ObjectiveGradients(parameters, num_objectives=num_objectives)
            for micro_batch in range(MICRO_BATCHES):
                for objective in range(num_objectives):
                    grads = gradients(rank, count, micro_batch, objective)
                    accumulator.add(objective, [None if g is None else g.to(device) for g in grads])
            calls.clear()
            projection = accumulator.apply()
            results[count, num_objectives] = {
                "calls": list(calls),
                "grads": [None if p.grad is None else p.grad.cpu() for p in parameters],
                "cosine": None if projection is None else projection.cosine(),
            }
    torch.save(results, Path(output) / f"rank{rank}.pt")
    dist.destroy_process_group()
