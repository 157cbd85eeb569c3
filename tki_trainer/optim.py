"""Optimizer updates that touch only the latent increments an effective batch retrieved.

Each example trains ``k`` of the bank's ``M`` increments, but dense AdamW updates every row of every bank
tensor at every step, so its cost grows with ``M``. `LazyAdamW` is AdamW with lazy semantics on the bank:
a row's moments, decay and update advance only at steps where the row was retrieved (as TensorFlow's
LazyAdam and PyTorch's SparseAdam), with the global step count in the bias correction. Every other
parameter gets torch's own AdamW step.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class TouchedRows:
    """The bank rows retrieved since the last optimizer step, as a mask over the ``M`` latent tasks."""

    def __init__(self, num_rows: int) -> None:
        self.mask = torch.zeros(num_rows, dtype=torch.bool)

    def mark(self, indices: torch.Tensor) -> None:
        self.mask[indices.flatten().cpu()] = True

    def local_rows(self) -> torch.Tensor:
        """Indices of the rows this process touched."""
        return self.mask.nonzero().flatten()

    def rows(self) -> torch.Tensor:
        """Indices of the touched rows; with several processes, of the rows any process touched (a collective)."""
        mask = self.mask
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            mask = mask.to(torch.uint8)
            dist.all_reduce(mask, op=dist.ReduceOp.MAX)
            mask = mask.bool()
        return mask.nonzero().flatten()

    def clear(self) -> None:
        self.mask.zero_()


class LazyAdamW(torch.optim.AdamW):
    """AdamW whose parameter groups marked ``lazy=True`` (the latent banks, rows along dim 0) update only the rows
    in ``touched``; other groups take torch's AdamW step unchanged."""

    def __init__(self, params, touched: TouchedRows, lazy_params: list[torch.nn.Parameter] = (), **kwargs) -> None:
        """``params`` as for AdamW; the ``lazy_params`` among them move to groups of their own marked ``lazy``."""
        groups = list(params)
        groups = groups if groups and isinstance(groups[0], dict) else [{"params": groups}]
        lazy_ids = {id(p) for p in lazy_params}
        split = []
        for group in groups:
            for lazy in (False, True):
                members = [p for p in group["params"] if (id(p) in lazy_ids) == lazy]
                if members:
                    split.append({**group, "params": members, "lazy": lazy})
        super().__init__(split, **kwargs)
        self.touched = touched

    @torch.no_grad()
    def step(self, closure=None):
        lazy = [(group, p, p.grad) for group in self.param_groups if group.get("lazy") for p in group["params"] if p.grad is not None]
        for _, p, _ in lazy:
            p.grad = None
        loss = super().step(closure)
        rows = self.touched.rows() if lazy else None
        for group, p, grad in lazy:
            self._lazy_update(group, p, grad, rows.to(p.device))
            p.grad = grad
        return loss

    def _lazy_update(self, group: dict, p: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor) -> None:
        """AdamW's update, written out, on ``rows`` of ``p`` only."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        step = float(state["step"])
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        values, g = p.index_select(0, rows), grad.index_select(0, rows)
        exp_avg = state["exp_avg"].index_select(0, rows).lerp_(g, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1 - beta2)
        values.mul_(1 - lr * weight_decay)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        values.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
        p.index_copy_(0, rows, values)
        state["exp_avg"].index_copy_(0, rows, exp_avg)
        state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
