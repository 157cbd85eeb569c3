"""AdamW that updates only the latent increments an effective batch retrieved.

Each example trains ``k`` of the bank's ``M`` increments, but dense AdamW updates every row of every bank
tensor at every step, so its cost grows with ``M``. The banks' gradients are row-sparse, and `LazyAdamW` is
AdamW with lazy semantics on them: a row's moments, decay and update advance only at steps where the row has a
gradient (as TensorFlow's LazyAdam and PyTorch's SparseAdam), with the parameter's step count in the bias
correction. Parameters with dense gradients get torch's own AdamW step.
"""

from __future__ import annotations

import math

import torch


class LazyAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW`, plus lazy row updates for parameters whose gradient is sparse."""

    @torch.no_grad()
    def step(self, closure=None):
        sparse = [(group, p, p.grad) for group in self.param_groups for p in group["params"] if p.grad is not None and p.grad.is_sparse]
        for _, p, _ in sparse:
            p.grad = None
        loss = super().step(closure)
        for group, p, grad in sparse:
            self._lazy_update(group, p, grad.coalesce())
            p.grad = grad
        return loss

    def _lazy_update(self, group: dict, p: torch.Tensor, grad: torch.Tensor) -> None:
        """AdamW's update, written out, on the rows ``grad`` holds."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        step = float(state["step"])
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        rows, g = grad.indices()[0], grad.values()
        values = p.index_select(0, rows)
        exp_avg = state["exp_avg"].index_select(0, rows).lerp_(g, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1 - beta2)
        values.mul_(1 - lr * weight_decay)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        values.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
        p.index_copy_(0, rows, values)
        state["exp_avg"].index_copy_(0, rows, exp_avg)
        state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)


def clip_grad_norm(parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` (2-norm over all gradients) that also takes sparse gradients."""
    grads = [p.grad.coalesce() if p.grad.is_sparse else p.grad for p in parameters if p.grad is not None]
    norms = [torch.linalg.vector_norm(g.values() if g.is_sparse else g, dtype=torch.float32) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    coefficient = max_norm / (total + 1e-6)
    if coefficient < 1:
        for p, grad in zip([p for p in parameters if p.grad is not None], grads):
            p.grad = grad * coefficient
    return total
