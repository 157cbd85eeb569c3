"""`TKIModel`: the PEFT tuner that injects TKI layers, owns the latent keys and routes each example."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from ..retrieval import make_keys
from .config import LatentLoraConfig
from .layer import Linear, TKILayer
from .routing import Router


class TKIModel(BaseTuner):
    """Creates a TKI model (shared LoRA plus latent LoRA bank) from a transformers model.

    Built by `peft.get_peft_model(model, LatentLoraConfig(...))` once `tki_trainer` is imported. The keys of
    each adapter's bank live here, in ``tki_keys``, and are saved with the adapter. Calls accept
    ``query_embeddings`` ``[batch, key_dim]`` and ``group_ids`` ``[batch]`` as keywords (PEFT passes them through
    to this tuner for every task type whose `PeftModel` calls its base model, e.g. ``CAUSAL_LM``);
    `tki_trainer.route` works with any wrapping.
    """

    prefix: str = "tki_"
    tuner_layer_cls = TKILayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    """A shared LoRA without ``target_modules`` (``None``) targets what PEFT's LoRA targets for the architecture."""

    def _pre_injection_hook(self, model: nn.Module, config: LatentLoraConfig, adapter_name: str) -> None:
        self.tki_keys = BufferDict({}, persistent=True)
        self.router = Router(self.tki_keys, self.peft_config)
        self._layers_enabled = True

    def _check_new_adapter_config(self, config: LatentLoraConfig) -> None:
        super()._check_new_adapter_config(config)
        if not isinstance(config, LatentLoraConfig):
            raise ValueError(f"TKIModel needs a LatentLoraConfig, got {type(config).__name__}.")

    @staticmethod
    def _matches(targets: Any, config: LatentLoraConfig, key: str) -> bool:
        """PEFT's own module matching (names, suffixes, regex, exclusions) applied to one target list."""
        view = SimpleNamespace(target_modules=targets, target_parameters=None, exclude_modules=config.exclude_modules)
        return bool(targets) and bool(check_target_module_exists(view, key))

    def _check_target_module_exists(self, config: LatentLoraConfig, key: str) -> bool:
        shared = config.use_shared_lora and self._matches(config.target_modules, config, key)
        return shared or self._matches(config.latent_target_modules, config, key)

    def _create_and_replace(
        self,
        config: LatentLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if adapter_name not in self.tki_keys:
            keys = make_keys(config.num_groups, config.keys_per_group, config.key_dim, config.seed)
            self.tki_keys[adapter_name] = keys.to(next(self.model.parameters()).device)
        update_kwargs = dict(
            r=config.r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            shared=config.use_shared_lora and self._matches(config.target_modules, config, current_key),
            latent_r=config.latent_r,
            latent_alpha=config.latent_alpha,
            num_latent_tasks=config.num_latent_tasks,
            latent=self._matches(config.latent_target_modules, config, current_key),
            inference_mode=config.inference_mode,
        )
        if isinstance(target, TKILayer):
            target.update_layer(adapter_name, **update_kwargs)
            return
        if not isinstance(target, nn.Linear):
            raise ValueError(
                f"TKI adapts torch.nn.Linear layers only; {current_key!r} is a {type(target).__name__}: "
                "remove it from target_modules / latent_target_modules."
            )
        new_module = Linear(target, adapter_name, self.router, **update_kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """PEFT's injection, then a check PEFT cannot make: a bank whose ``latent_target_modules`` match no layer
        (a typo) would leave LTA silently without latent tasks."""
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        config = self.peft_config[adapter_name]
        banks = [m for m in model.modules() if isinstance(m, TKILayer) and adapter_name in m.tki_latent_A]
        if config.latent_target_modules and not banks:
            linear = sorted(
                {
                    name.rsplit(".", 1)[-1]
                    for name, m in model.named_modules()
                    if isinstance(m, (nn.Linear, TKILayer)) and "tki_" not in name and not name.endswith("base_layer")
                }
            )
            raise ValueError(
                f"latent_target_modules={config.latent_target_modules!r} matches no layer of the model, so the latent "
                f"bank would be empty: name some of its linear layers ({', '.join(linear[:12])})."
            )

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        del self.tki_keys[adapter_name]

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._layers_enabled = enabled

    def _bank_is_active(self) -> bool:
        return self._layers_enabled and any(name in self.tki_keys for name in self.active_adapters)

    def _set_call_routing(
        self, query_embeddings: torch.Tensor | None, group_ids: torch.Tensor | None, inputs: Any
    ) -> None:
        """Route this call (or clear the previous call's routing) and refuse, before any model work, a call the
        bank cannot route."""
        self.router.set_call(query_embeddings, group_ids, self.active_adapters)
        if not self._bank_is_active():
            return
        routing = self.router.require()
        if routing.batch_size is None:  # the bank is bypassed
            return
        if isinstance(inputs, torch.Tensor) and inputs.shape[0] != routing.batch_size:
            raise ValueError(
                f"The model received {inputs.shape[0]} examples but was routed with {routing.batch_size} query "
                "embeddings: pass one query embedding per example of the batch."
            )

    def forward(
        self,
        *args: Any,
        query_embeddings: torch.Tensor | None = None,
        group_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        self._set_call_routing(query_embeddings, group_ids, _model_inputs(args, kwargs))
        return self.model(*args, **kwargs)

    def generate(
        self,
        *args: Any,
        query_embeddings: torch.Tensor | None = None,
        group_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        self._set_call_routing(query_embeddings, group_ids, _model_inputs(args, kwargs))
        return self.model.generate(*args, **kwargs)


def _model_inputs(args: tuple, kwargs: dict) -> Any:
    """The tensor whose first dimension is the call's batch: positional or keyword ``input_ids``, or ``inputs_embeds``."""
    if args:
        return args[0]
    return kwargs.get("input_ids", kwargs.get("inputs_embeds"))


def find_tuner(model: nn.Module) -> TKIModel:
    """The `TKIModel` inside ``model``, whatever wraps it (`PeftModel`, DDP, accelerate)."""
    for module in model.modules():
        if isinstance(module, TKIModel):
            return module
    raise ValueError(
        f"{type(model).__name__} holds no TKI adapter: build one with "
        "peft.get_peft_model(model, tki_trainer.LatentLoraConfig(...)) or load one with PeftModel.from_pretrained."
    )


@contextmanager
def route(model: nn.Module, query_embeddings: torch.Tensor, group_ids: torch.Tensor | None = None) -> Iterator[None]:
    """Route every row of every forward, backward and ``generate`` inside the block with its example's query.

    ``query_embeddings`` is ``[batch, key_dim]``; ``group_ids`` ``[batch]`` restricts each example to its group's
    latent tasks (training) and is omitted for unseen inputs. Backward must run inside the block when activation
    checkpointing recomputes the layers. Rows repeated by ``generate`` (beams, ``num_return_sequences``) follow
    their example.
    """
    tuner = find_tuner(model)
    with tuner.router.use(query_embeddings, group_ids, tuner.active_adapters):
        yield


@contextmanager
def bypass_bank(model: nn.Module) -> Iterator[None]:
    """Inside the block the latent bank adds nothing (the shared LoRA still applies): inputs kept out of the
    latent tasks."""
    with find_tuner(model).router.bypass():
        yield


def tki_layers(model: nn.Module) -> Iterator[tuple[str, TKILayer]]:
    """``(name, layer)`` of every TKI layer, names relative to the base transformers model."""
    base = find_tuner(model).model
    for name, module in base.named_modules():
        if isinstance(module, TKILayer):
            yield name, module
