"""Per-example gradient capture: from one backward, also the gradient of a weighted subset of the batch.

PCGrad needs, for a micro-batch where some examples' reinstatement term goes through the prior input and others'
through the real prompt, the SFT gradient of the whole batch and the reinstatement gradient through the real prompt of the second
group only. Both come from the same backward through the real-prompt graph: an adapter's trainable parameters
are the weights of bias-free linear maps (LoRA's ``A`` and ``B``) and the rows of latent banks gathered per
example, and each one's gradient is a sum over examples of products of what the layer saw and the gradient of
what it returned. Weighting those per example gives the subset's gradient without a second backward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..tuner.layer import TKILayer


class GradientCapture:
    """Records, during a forward, what one backward needs to also produce ``sum_i weights[i] * grad_i`` for every
    trainable parameter (``grad_i``: example ``i``'s share of the backward's gradient).

    ``supported`` is False when some trainable parameter is neither such a linear weight nor a bank (DoRA
    magnitudes, trainable biases or embeddings): callers then take another backward. ``complete`` is checked, not
    assumed: it is False after a recording in which some covered parameter's hook did not fire (a module whose
    weight is read without calling it, as TRL's fused LM head reads ``lm_head.weight``) or some output carried no
    gradient (reentrant activation checkpointing runs the forward without autograd).
    """

    def __init__(self, model: nn.Module, parameters: list[nn.Parameter]) -> None:
        self.parameters = parameters
        self._index = {id(p): i for i, p in enumerate(parameters)}
        self._linears = [
            module
            for module in model.modules()
            if isinstance(module, nn.Linear)
            and id(module.weight) in self._index
            and (module.bias is None or not module.bias.requires_grad)
        ]
        self._banks = [
            module for module in model.modules() if isinstance(module, TKILayer) and len(module.tki_latent_A)
        ]
        covered = {id(module.weight) for module in self._linears}
        for layer in self._banks:
            covered |= {id(p) for bank in (layer.tki_latent_A, layer.tki_latent_B) for p in bank.values()}
        self.supported = all(id(p) in covered for p in parameters)
        self.weights: torch.Tensor | None = None
        self._seen: set[int] = set()
        self._blind = True
        self._gradients: list[torch.Tensor | None] = [None] * len(parameters)

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Wrap the forward whose backward should also give a subset's gradient (set ``weights`` before that
        backward; with ``weights`` None the recorded hooks do nothing)."""
        self._seen, self._blind = set(), False
        handles = [module.register_forward_hook(self._on_linear) for module in self._linears]
        for layer in self._banks:
            layer.gather_observer = self._on_gather
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for layer in self._banks:
                layer.gather_observer = None

    @property
    def complete(self) -> bool:
        """Whether the last recording saw every trainable parameter used with autograd on."""
        return self.supported and not self._blind and self._seen >= self._index.keys()

    def take(self) -> list[torch.Tensor | None]:
        """The weighted subset's gradients, aligned with ``parameters`` (dense, or sparse rows for banks)."""
        gradients, self._gradients, self.weights = self._gradients, [None] * len(self.parameters), None
        return gradients

    def _add(self, parameter: nn.Parameter, gradient: torch.Tensor) -> None:
        i = self._index[id(parameter)]
        self._gradients[i] = gradient if self._gradients[i] is None else self._gradients[i] + gradient

    def _on_linear(self, module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not output.requires_grad:
            self._blind = True
            return
        self._seen.add(id(module.weight))
        seen = inputs[0].detach()

        def hook(grad: torch.Tensor) -> None:
            if self.weights is None:
                return
            weights = self.weights.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))
            weighted = (grad * weights).reshape(-1, grad.shape[-1]).float()
            self._add(module.weight, (weighted.T @ seen.reshape(-1, seen.shape[-1]).float()).to(module.weight.dtype))

        output.register_hook(hook)

    def _on_gather(self, bank: nn.Parameter, indices: torch.Tensor, rows: torch.Tensor) -> None:
        """``rows[batch * k, ...]`` were gathered from ``bank`` at ``indices``, ``k`` consecutive rows per example."""
        if not rows.requires_grad:
            self._blind = True
            return
        self._seen.add(id(bank))

        def hook(grad: torch.Tensor) -> None:
            if self.weights is None:
                return
            per_row = self.weights.to(grad.dtype).repeat_interleave(len(indices) // len(self.weights)).unsqueeze(-1)
            values = (grad * per_row).to(bank.dtype)
            self._add(bank, torch.sparse_coo_tensor(indices.unsqueeze(0), values, bank.shape, check_invariants=False))

        rows.register_hook(hook)
