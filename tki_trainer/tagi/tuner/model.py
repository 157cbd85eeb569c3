"""`InstructionLoraModel`: the PEFT tuner that injects generated-LoRA layers and owns their hypernetworks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from ...tuner.model import _model_inputs
from .config import InstructionLoraConfig
from .hypernet import LoraHypernetwork, ModuleSpec
from .layer import InstructionLoraLayer, Linear
from .routing import Factors, GivenLora, InstructionRouter, check_instruction_embeddings


class InstructionLoraModel(BaseTuner):
    """Creates a model whose LoRA weights are generated per task from an instruction embedding.

    Built by `peft.get_peft_model(model, InstructionLoraConfig(...))` once `tki_trainer.tagi` is imported. Each
    adapter's hypernetwork lives here, in ``tagi_hypernet``, is the adapter's only trainable part and is saved with
    it. Calls accept ``instruction_embeddings`` ``[batch, key_dim]`` as a keyword (PEFT passes it through to this
    tuner for every task type whose `PeftModel` calls its base model, e.g. ``CAUSAL_LM``); `generate_for` works
    with any wrapping.
    """

    prefix: str = "tagi_"
    tuner_layer_cls = InstructionLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    """``target_modules=None`` targets what PEFT's LoRA targets for the architecture."""

    def _pre_injection_hook(self, model: nn.Module, config: InstructionLoraConfig, adapter_name: str) -> None:
        if not hasattr(self, "tagi_hypernet"):
            self.tagi_hypernet = nn.ModuleDict({})
            self.router = InstructionRouter(self.tagi_hypernet, self.peft_config)
            self._layers_enabled = True

    def _check_new_adapter_config(self, config: InstructionLoraConfig) -> None:
        super()._check_new_adapter_config(config)
        if not isinstance(config, InstructionLoraConfig):
            raise ValueError(f"InstructionLoraModel needs an InstructionLoraConfig, got {type(config).__name__}.")

    def _create_and_replace(
        self,
        config: InstructionLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        update = dict(
            r=config.r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            inference_mode=config.inference_mode,
        )
        if isinstance(target, InstructionLoraLayer):
            target.update_layer(adapter_name, **update)
            return
        if not isinstance(target, nn.Linear):
            raise ValueError(
                f"The instruction-LoRA tuner adapts torch.nn.Linear layers only; {current_key!r} is a "
                f"{type(target).__name__}: remove it from target_modules."
            )
        new_module = Linear(target, adapter_name, current_key, self.router, **update)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """PEFT's injection, then the adapter's hypernetwork, sized from the layers it targets (their depths,
        types and shapes), so a saved adapter rebuilds the same one on the same base model."""
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        modules = {
            name: ModuleSpec.of(name, layer)
            for name, layer in model.named_modules()
            if isinstance(layer, InstructionLoraLayer) and adapter_name in layer.tagi_dropout
        }
        hypernet = LoraHypernetwork(self.peft_config[adapter_name], modules)
        self.tagi_hypernet[adapter_name] = hypernet.to(next(model.parameters()).device).train(model.training)
        self.set_adapter(self.active_adapters, inference_mode=self.peft_config[adapter_name].inference_mode)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """PEFT's switch, extended to the hypernetworks: only the active adapters' train, none in inference mode."""
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        active = [adapter_name] if isinstance(adapter_name, str) else adapter_name
        for name, hypernet in self.tagi_hypernet.items():
            hypernet.requires_grad_(name in active and not inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        del self.tagi_hypernet[adapter_name]

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Checkpoint keys without the adapter name, for the nested hypernetwork keys too
        (``tagi_hypernet.<adapter>.trunk.1.weight`` -> ``tagi_hypernet.trunk.1.weight``), so a saved adapter
        loads under any name."""
        marker = f"{cls.prefix}hypernet.{adapter_name}."
        if marker in key:
            return key.replace(marker, f"{cls.prefix}hypernet.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._layers_enabled = enabled

    def _set_call_instructions(self, instruction_embeddings: torch.Tensor | None, inputs: Any) -> None:
        """Set this call's instructions (or clear the previous call's) and refuse, before any model work, a call
        the active adapters cannot serve."""
        self.router.set_call(instruction_embeddings, self.active_adapters)
        if not (self._layers_enabled and any(name in self.tagi_hypernet for name in self.active_adapters)):
            return
        instructions = self.router.require()
        if isinstance(inputs, torch.Tensor) and inputs.shape[0] != instructions.batch_size:
            raise ValueError(
                f"The model received {inputs.shape[0]} examples but was given {instructions.batch_size} instruction "
                "embeddings: pass one instruction embedding per example of the batch."
            )

    def forward(self, *args: Any, instruction_embeddings: torch.Tensor | None = None, **kwargs: Any) -> Any:
        self._set_call_instructions(instruction_embeddings, _model_inputs(args, kwargs))
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, instruction_embeddings: torch.Tensor | None = None, **kwargs: Any) -> Any:
        self._set_call_instructions(instruction_embeddings, _model_inputs(args, kwargs))
        return self.model.generate(*args, **kwargs)


def find_instruction_tuner(model: nn.Module) -> InstructionLoraModel:
    """The `InstructionLoraModel` inside ``model``, whatever wraps it (`PeftModel`, DDP, accelerate)."""
    for module in model.modules():
        if isinstance(module, InstructionLoraModel):
            return module
    raise ValueError(
        f"{type(model).__name__} holds no instruction-generated LoRA: build one with peft.get_peft_model(model, "
        "tki_trainer.tagi.InstructionLoraConfig(...)) or load one with PeftModel.from_pretrained."
    )


@contextmanager
def generate_for(model: nn.Module, instruction_embeddings: torch.Tensor) -> Iterator[None]:
    """Apply, inside the block, to every row of every forward, backward and ``generate`` the LoRA generated from
    its example's instruction embedding (``[batch, key_dim]``; a batch may mix tasks). Backward must run inside the
    block when activation checkpointing recomputes the layers. Rows repeated by ``generate`` (beams,
    ``num_return_sequences``) follow their example."""
    tuner = find_instruction_tuner(model)
    with tuner.router.use(instruction_embeddings, tuner.active_adapters):
        yield


@contextmanager
def apply_lora(model: nn.Module, factors: dict[str, Factors], task_of_example: torch.Tensor) -> Iterator[None]:
    """Apply, inside the block, given LoRA factors instead of generated ones: ``factors`` is ``{module name: (lora_A
    [tasks, r, in], lora_B [tasks, out, r])}`` in PEFT's layout with each LoRA's ``lora_alpha / r`` already in
    ``lora_B``, ``task_of_example`` [batch] picks each example's LoRA. A batch may mix LoRAs: this is how TAGI's
    teachers, one LoRA per task category, read a batch in one forward through the same layers as the student."""
    tuner = find_instruction_tuner(model)
    adapter = tuner.peft_config[tuner.active_adapters[0]]
    device = next(tuner.tagi_hypernet.parameters()).device
    factors = {name: (a.to(device), b.to(device)) for name, (a, b) in factors.items()}
    lora = GivenLora(factors, task_of_example.to(device), adapter.lora_alpha / adapter.r)
    with tuner.router.use_given(lora):
        yield


def generate_lora(
    model: nn.Module, instruction_embeddings: torch.Tensor, adapter_name: str | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The LoRA of each task, in one hypernetwork call: ``{module name: (lora_A [tasks, r, in], lora_B [tasks, out,
    r])}`` in PEFT's layout (``lora_B @ lora_A``, scaled by ``lora_alpha / r``), names relative to the base model.

    Differentiable under autograd (e.g. to match a teacher LoRA's factors); ``instruction_embeddings`` is
    ``[tasks, key_dim]``.
    """
    tuner = find_instruction_tuner(model)
    adapter_name = adapter_name or tuner.active_adapters[0]
    if adapter_name not in tuner.tagi_hypernet:
        raise ValueError(
            f"No instruction-LoRA adapter named {adapter_name!r}; the model holds {sorted(tuner.tagi_hypernet.keys())}."
        )
    check_instruction_embeddings(instruction_embeddings, tuner.peft_config, [adapter_name])
    generated = tuner.tagi_hypernet[adapter_name](instruction_embeddings)
    return {name: (a, b.transpose(1, 2)) for name, (a, b) in generated.items()}
