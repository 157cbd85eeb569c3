"""The TKI tuner layer: a linear layer with a shared LoRA and a bank of latent LoRA increments."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .routing import Router


def lowrank_per_example(
    x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, rank_scale: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Each row's own low-rank update, ``x_i D_i diag(s_i) U_i``, for the whole batch in two batched products.

    ``x`` is ``[rows, ..., in]``, ``down`` ``[rows, in, R]`` (``A_i`` transposed), ``up`` ``[rows, R, out]`` (``B_i``
    transposed), ``rank_scale`` ``[rows, R]`` an optional weight per rank; returns ``[rows, tokens, out]``, unscaled.
    This is the one primitive behind every per-example adapter (the TKI bank's blended increments, generated
    adapters): a batch may mix tasks without a Python loop over its examples.
    """
    tokens = x.reshape(down.shape[0], -1, down.shape[1])
    hidden = torch.bmm(tokens, down.to(tokens.dtype))
    if rank_scale is not None:
        hidden = hidden * rank_scale.unsqueeze(1).to(hidden.dtype)
    return torch.bmm(hidden, up.to(tokens.dtype))


class TKILayer(BaseTunerLayer):
    """Adapter state of one targeted linear layer, keyed by adapter name as in PEFT's LoRA layer.

    ``tki_lora_A``/``tki_lora_B`` hold the shared LoRA (absent where the layer has none). The bank holds one row
    per latent task: ``tki_latent_A[M, latent_r * in]`` (``A_j`` flattened) and ``tki_latent_B[M, latent_r * out]``
    (``B_j`` transposed, flattened), so that the ``k`` increments gathered for an example stack into one rank
    ``k*latent_r`` product without a copy, and the bank's gradient is row-sparse: only the rows an example
    retrieved are carried, whatever the bank size.
    """

    adapter_layer_names = ("tki_lora_A", "tki_lora_B", "tki_latent_A", "tki_latent_B")
    other_param_names = ("r", "lora_alpha", "scaling", "latent_r", "latent_scaling")

    def __init__(self, base_layer: nn.Module, router: Router, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.tki_lora_A = nn.ModuleDict({})
        self.tki_lora_B = nn.ModuleDict({})
        self.tki_dropout = nn.ModuleDict({})
        self.tki_latent_A = nn.ParameterDict({})
        self.tki_latent_B = nn.ParameterDict({})
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.latent_r: dict[str, int] = {}
        self.latent_scaling: dict[str, float] = {}
        self.merged_adapters = []
        self._disable_adapters = False
        self._router = router
        self.gather_observer: Optional[Callable[[nn.Parameter, torch.Tensor, torch.Tensor], None]] = None
        """Called with (bank, indices, gathered rows) on each gather; `tki_trainer.capture` uses it."""
        self._factor_cache: dict[str, tuple] = {}
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.kwargs = kwargs

    def update_layer(
        self,
        adapter_name: str,
        *,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        shared: bool,
        latent_r: int,
        latent_alpha: float,
        num_latent_tasks: int,
        latent: bool,
        inference_mode: bool = False,
    ) -> None:
        """Create and initialise the adapter's weights on this layer.

        The shared LoRA is initialised as PEFT's LoRA (A Kaiming-uniform, B zero). The bank follows the paper:
        every ``A_j`` starts at zero, every ``B_j`` with the distribution PEFT gives a LoRA's ``A`` (uniform in
        ``1/sqrt(in_features)``), so the bank's first updates have the scale of an ordinary LoRA's.
        """
        self.tki_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        if shared:
            self.r[adapter_name] = r
            self.lora_alpha[adapter_name] = lora_alpha
            self.scaling[adapter_name] = lora_alpha / r
            self.tki_lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
            self.tki_lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
            nn.init.kaiming_uniform_(self.tki_lora_A[adapter_name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.tki_lora_B[adapter_name].weight)
        if latent:
            self.latent_r[adapter_name] = latent_r
            self.latent_scaling[adapter_name] = latent_alpha / latent_r
            bound = 1.0 / math.sqrt(self.in_features)
            self.tki_latent_A[adapter_name] = nn.Parameter(torch.zeros(num_latent_tasks, latent_r * self.in_features))
            self.tki_latent_B[adapter_name] = nn.Parameter(
                torch.empty(num_latent_tasks, latent_r * self.out_features).uniform_(-bound, bound)
            )
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def latent_delta(
        self, x: torch.Tensor, adapter_name: str, indices: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """``sum_j w_ij B_j A_j x_i`` for every row ``i`` at once, unscaled.

        The ``k`` increments of each row are gathered and stacked into one rank ``k*latent_r`` factor pair, so the
        whole batch is two batched matrix products. The gather is an embedding lookup with sparse gradients: the
        bank's gradient holds the retrieved rows only.
        """
        rows = indices.shape[0]
        if not torch.is_grad_enabled():
            down, up = self._inference_factors(adapter_name, indices, weights)
            return lowrank_per_example(x, down, up)
        rank = self.latent_r[adapter_name]
        flat = indices.flatten()
        banks = (self.tki_latent_A[adapter_name], self.tki_latent_B[adapter_name])
        a, b = (F.embedding(flat, bank, sparse=True) for bank in banks)
        if self.gather_observer is not None:
            for bank, gathered in zip(banks, (a, b)):
                self.gather_observer(bank, flat, gathered)
        a = a.view(rows, -1, self.in_features)
        b = b.view(rows, -1, self.out_features)
        return lowrank_per_example(x, a.transpose(1, 2), b, weights.repeat_interleave(rank, dim=1))

    def _inference_factors(
        self, adapter_name: str, indices: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The gathered pair ``(w * A)^T [rows, in, k*r]``, ``B [rows, k*r, out]`` without autograd, kept while the
        routing (the same selection tensors) and the bank (its storage and in-place version: a flashback reference
        swaps the storage in) stay: generation gathers once per call instead of once per new token."""
        bank_a, bank_b = self.tki_latent_A[adapter_name], self.tki_latent_B[adapter_name]
        version = (bank_a.data_ptr(), bank_a._version, bank_b.data_ptr(), bank_b._version)
        cached = self._factor_cache.get(adapter_name)
        if cached is None or cached[0] is not indices or cached[1] is not weights or cached[2] != version:
            rows, rank = indices.shape[0], self.latent_r[adapter_name]
            flat = indices.flatten()
            blend = weights.repeat_interleave(rank, dim=1).unsqueeze(-1).to(bank_a.dtype)
            down = (bank_a[flat].view(rows, -1, self.in_features) * blend).transpose(1, 2).contiguous()
            cached = (indices, weights, version, (down, bank_b[flat].view(rows, -1, self.out_features)))
            self._factor_cache[adapter_name] = cached
        return cached[3]


class Linear(nn.Module, TKILayer):
    """A TKI-adapted ``nn.Linear``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, router: Router, **update_kwargs: Any) -> None:
        super().__init__()
        TKILayer.__init__(self, base_layer, router)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **update_kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        result_dtype = result.dtype
        for adapter_name in self.active_adapters:
            if adapter_name not in self.tki_dropout:
                continue
            x_adapter = self.tki_dropout[adapter_name](x)
            if adapter_name in self.tki_lora_A:
                lora_a = self.tki_lora_A[adapter_name]
                x_shared = self._cast_input_dtype(x_adapter, lora_a.weight.dtype)
                result = result + self.tki_lora_B[adapter_name](lora_a(x_shared)) * self.scaling[adapter_name]
            selection = self._router.selection(adapter_name, x.shape[0]) if adapter_name in self.tki_latent_A else None
            if selection is not None:
                indices, weights = selection
                x_latent = self._cast_input_dtype(x_adapter, self.tki_latent_A[adapter_name].dtype)
                delta = self.latent_delta(x_latent, adapter_name, indices, weights)
                result = result + delta.reshape(result.shape) * self.latent_scaling[adapter_name]
        return result.to(result_dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(
            "A TKI adapter cannot be merged into the base weights: its latent increment depends on each input's query. "
            "Use tki_trainer.export_lora(model, query_embedding, output_dir) to fold the bank in for one query."
        )

    def __repr__(self) -> str:
        return "tki." + super().__repr__()
