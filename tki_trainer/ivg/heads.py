"""Attention heads of a decoder: where they are, and reading or overwriting one head's output at chosen positions.

Each layer's attention output projection (``o_proj`` in Llama-family models) takes the concatenation of its
heads' outputs, ``[..., heads * head_dim]``. A forward pre-hook on it sees every head's output at every position
(the "head activation" of Todd et al.'s function vectors) and can replace one head's slice before the projection
mixes the heads. Only hooks: the model's own code runs unchanged, a PEFT-wrapped projection included.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from peft import PeftModel
from torch import nn


LAYER_LIST_NAMES = ("layers", "h", "blocks", "layer")
"""Attribute names under which transformers' decoders keep their layers (Llama ``model.layers``, GPT-2 ``h``)."""
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
PROJECTION_NAMES = ("o_proj", "out_proj", "dense", "c_proj")
"""Names of the attention output projection inside a layer's attention module, across transformers' decoders."""


def text_config(model: nn.Module):
    """The config that describes the decoder (the text model's, for a multimodal config)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The module that runs the decoder layers (it receives the cache) and the layers themselves."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    count = text_config(model).num_hidden_layers
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and name.rsplit(".", 1)[-1] in LAYER_LIST_NAMES:
            owner = base.get_submodule(name.rpartition(".")[0])
            return owner, module
    raise ValueError(
        f"No list of {count} decoder layers named one of {LAYER_LIST_NAMES} in {type(base).__name__}: instruction "
        "vectors need a transformers decoder-only model."
    )


def _attention_projection(layer: nn.Module, index: int) -> nn.Module:
    for attention_name in ATTENTION_NAMES:
        attention = getattr(layer, attention_name, None)
        for name in PROJECTION_NAMES if attention is not None else ():
            if isinstance(getattr(attention, name, None), nn.Module):
                return getattr(attention, name)
    raise ValueError(
        f"Decoder layer {index} ({type(layer).__name__}) has no attention output projection named "
        f"{'/'.join(ATTENTION_NAMES)}.{'/'.join(PROJECTION_NAMES)}: head activations are read at its input."
    )


@dataclass
class HeadCapture:
    """Filled during a forward: each layer's head outputs at the capture positions."""

    per_layer: dict[int, torch.Tensor]
    num_layers: int

    @property
    def activations(self) -> torch.Tensor:
        """[batch, layers, heads, head_dim] in the model's dtype."""
        missing = [layer for layer in range(self.num_layers) if layer not in self.per_layer]
        if missing:
            raise RuntimeError(f"No forward reached the attention output projection of layers {missing}.")
        return torch.stack([self.per_layer[layer] for layer in range(self.num_layers)], dim=1)


@dataclass
class AttentionHeads:
    """The attention heads of a decoder, read and written at the input of each layer's output projection."""

    projections: list[nn.Module]
    num_heads: int
    head_dim: int
    hidden_size: int
    dtype: torch.dtype
    """The dtype of the hidden states (the input embeddings'), which a quantized projection's weights do not tell."""

    @classmethod
    def of(cls, model: nn.Module) -> AttentionHeads:
        config = text_config(model)
        _, layers = decoder_layers(model)
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        projections = [_attention_projection(layer, i) for i, layer in enumerate(layers)]
        dtype = model.get_input_embeddings().weight.dtype
        return cls(projections, num_heads, head_dim, config.hidden_size, dtype)

    @property
    def num_layers(self) -> int:
        return len(self.projections)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(layers, heads, head_dim): the shape of one prompt's head activations."""
        return self.num_layers, self.num_heads, self.head_dim

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.num_heads * self.head_dim:
            raise ValueError(
                f"The attention output projection receives {x.shape[-1]} features, not num_attention_heads x head_dim "
                f"= {self.num_heads} x {self.head_dim} from the config: this model's heads cannot be split by its "
                "config."
            )
        return x.unflatten(-1, (self.num_heads, self.head_dim))

    @contextmanager
    def capture(self, positions: torch.Tensor) -> Iterator[HeadCapture]:
        """Record every head's output at ``positions[i]`` of row ``i`` ([batch], long) during the forwards inside."""
        capture = HeadCapture({}, self.num_layers)

        def record(layer: int, module: nn.Module, args: tuple) -> None:
            heads = self._split(args[0])
            rows = torch.arange(heads.shape[0], device=heads.device)
            capture.per_layer[layer] = heads[rows, positions.to(heads.device)].detach()

        handles = [p.register_forward_pre_hook(partial(record, i)) for i, p in enumerate(self.projections)]
        try:
            yield capture
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def patch(
        self,
        layers: torch.Tensor,
        heads: torch.Tensor,
        positions: torch.Tensor,
        values: torch.Tensor,
        add: bool = False,
    ) -> Iterator[None]:
        """Inside the block, row ``i``'s head ``heads[i]`` of layer ``layers[i]`` outputs ``values[i]`` ([batch,
        head_dim]) at position ``positions[i]`` (or that value added to its own, with ``add``); nothing else
        changes. One indexed write per layer, whatever the batch."""
        rows = torch.arange(len(layers))

        def overwrite(index: tuple[torch.Tensor, ...], new: torch.Tensor, module: nn.Module, args: tuple) -> tuple:
            split = self._split(args[0])
            index = tuple(i.to(split.device) for i in index)
            new = new.to(split.device, split.dtype)
            if add:
                new = split[index] + new
            return (split.index_put(index, new).flatten(-2), *args[1:])

        handles = []
        for layer in layers.unique().tolist():
            pick = layers == layer
            index = (rows[pick], positions[pick], heads[pick])
            hook = partial(overwrite, index, values[pick])
            handles.append(self.projections[layer].register_forward_pre_hook(hook, prepend=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def project(self, layer: int, activations: torch.Tensor) -> torch.Tensor:
        """Each head's share of layer ``layer``'s attention output: the projection applied to that head's output
        alone (the other heads zero), its bias removed. ``activations`` [heads, head_dim] gives [heads, hidden],
        float32. Through the module itself, so a LoRA on the projection counts as the model computes it."""
        projection = self.projections[layer]
        device = next(projection.parameters()).device
        blocks = torch.block_diag(*activations.to(device, self.dtype)).unsqueeze(0)
        return (projection(blocks) - projection(torch.zeros_like(blocks))).squeeze(0).float()
