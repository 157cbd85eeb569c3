"""The layer of the instruction-LoRA tuner: a linear layer whose LoRA factors come from the hypernetwork."""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...tuner.layer import lowrank_per_example
from .routing import InstructionRouter


class InstructionLoraLayer(BaseTunerLayer):
    """Adapter state of one targeted linear layer, keyed by adapter name as in PEFT's LoRA layer.

    The layer holds no weights of its own: its ``A`` and ``B`` are generated per task by the adapter's hypernetwork
    (on the tuner), and applied per row of the batch with the same gathered low-rank product as the TKI bank.
    """

    adapter_layer_names = ("tagi_dropout",)
    other_param_names = ("r", "lora_alpha", "scaling")

    def __init__(self, base_layer: nn.Module, module_name: str, router: InstructionRouter, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.module_name = module_name
        """The layer's name in the base model: the hypernetwork's key for its depth and type."""
        self.tagi_dropout = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.merged_adapters = []
        self._disable_adapters = False
        self._router = router
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.kwargs = kwargs

    def update_layer(
        self, adapter_name: str, *, r: int, lora_alpha: float, lora_dropout: float, inference_mode: bool = False
    ) -> None:
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.tagi_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)


class Linear(nn.Module, InstructionLoraLayer):
    """An ``nn.Linear`` with an instruction-generated LoRA."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, module_name: str, router: InstructionRouter, **update: Any
    ) -> None:
        super().__init__()
        InstructionLoraLayer.__init__(self, base_layer, module_name, router)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **update)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        result_dtype = result.dtype
        for adapter_name in self.active_adapters:
            if adapter_name not in self.tagi_dropout:
                continue
            down, up = self._router.factors(adapter_name, self.module_name, x.shape[0])
            x_adapter = self._cast_input_dtype(self.tagi_dropout[adapter_name](x), down.dtype)
            delta = lowrank_per_example(x_adapter, down, up)
            result = result + delta.reshape(result.shape) * self.scaling[adapter_name]
        return result.to(result_dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(
            "An instruction-generated LoRA cannot be merged into the base weights: it depends on each input's "
            "instruction. Use tki_trainer.tagi.export_instruction_lora(model, instruction_embedding, output_dir) to "
            "write one task's LoRA, then merge that."
        )

    def __repr__(self) -> str:
        return "tagi." + super().__repr__()
