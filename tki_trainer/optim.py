"""AdamW that updates only the latent increments an effective batch retrieved.

Each example trains ``k`` of the bank's ``M`` increments, but dense AdamW updates every row of every bank
tensor at every step, so its cost grows with ``M``. The banks' gradients are row-sparse, and `LazyAdamW` is
AdamW with lazy semantics on them: a row's moments, decay and update advance only at steps where the row has a
gradient (as TensorFlow's LazyAdam and PyTorch's SparseAdam). Each row keeps its own step count for the bias
correction, so every row follows AdamW over its own gradient sequence: a row first retrieved late in training
takes the first step of a fresh AdamW, not one scaled by the bias correction of the parameter's older steps.
Parameters with dense gradients get torch's own AdamW step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


UNSUPPORTED = {
    "amsgrad": "amsgrad=False",
    "maximize": "maximize=False (negate the loss instead)",
    "capturable": "capturable=False",
    "differentiable": "differentiable=False",
}
"""AdamW options the lazy row update does not implement, with the setting to pass instead."""


class LazyAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW`, plus lazy row updates, with per-row step counts, for parameters whose gradient is
    sparse. A parameter's gradients must stay of one kind (sparse or dense) over training."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = {**self.defaults, **param_group}
        refused = [name for name in UNSUPPORTED if group.get(name)]
        if refused:
            fixes = ", ".join(UNSUPPORTED[name] for name in refused)
            raise ValueError(
                f"LazyAdamW does not implement {', '.join(f'{name}=True' for name in refused)} for the sparse "
                f"(latent-bank) gradients it updates lazily: pass {fixes}."
            )
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sparse = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                lazy = bool(state) and state["step"].dim() > 0
                if p.grad.is_sparse != lazy and state:
                    kind = "dense" if lazy else "sparse"
                    raise ValueError(
                        f"LazyAdamW got a {kind} gradient for a parameter it has updated with the other kind: keep each "
                        "parameter's gradients sparse (latent banks) or dense throughout, or give it its own optimizer."
                    )
                if p.grad.is_sparse:
                    sparse.append((group, p, p.grad))
        for _, p, _ in sparse:
            p.grad = None
        super().step()
        for group, p, grad in sparse:
            self._lazy_update(group, p, grad.coalesce())
            p.grad = grad
        return loss

    def _lazy_update(self, group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor) -> None:
        """AdamW's update, written out in torch's order, on the rows ``grad`` holds, each with its own count.

        ``state["step"]`` holds the per-row counts, [rows]: `torch.optim.Optimizer.load_state_dict` casts every
        other state tensor to the parameter's dtype, which in bf16 would round counts above 256.
        """
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros(p.shape[0], dtype=torch.long, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        rows, g = grad.indices()[0], grad.values()
        counts = state["step"] = state["step"].to(p.device)
        counts.index_add_(0, rows, torch.ones(len(rows), dtype=counts.dtype, device=p.device))
        # torch computes the bias corrections in double precision (Python floats); MPS has no float64.
        precision = torch.float32 if p.device.type == "mps" else torch.float64
        steps = counts.index_select(0, rows).to(precision).view(-1, *[1] * (p.dim() - 1))
        values = p.index_select(0, rows)
        values.mul_(1 - lr * weight_decay)
        exp_avg = state["exp_avg"].index_select(0, rows).lerp_(g, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = (lr / (1 - beta1**steps)).to(p.dtype)
        denom = (exp_avg_sq.sqrt() / (1 - beta2**steps).sqrt().to(p.dtype)).add_(eps)
        values.addcdiv_(exp_avg * -step_size, denom)
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
