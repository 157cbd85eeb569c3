"""Adding an instruction vector to the hidden state that one decoder layer outputs, at the last prompt token.

The paper's intervention is ``h_l <- h_l + s * IV`` at the last token of the input (``s = -1`` removes the IV, the
test of necessity; ``s`` going from 1 to 0 is IV-guided training's progressive intervention). A forward hook on
layer ``l`` adds it, and a forward pre-hook on the module that runs the layers tells a fresh input from a step
that continues a cached one (``generate``'s decoding steps), so under ``generate`` the IV goes into the prompt's
last token only (the authors' code adds it at every generated token too: ``generated_tokens=True``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import Cache

from .heads import decoder_layers, text_config


def last_real_positions(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
    """Index of each row's last attended token (right or left padding alike); the last position without a 2-D
    mask."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[1] != length:
        return torch.full((batch,), length - 1, dtype=torch.long)
    return length - 1 - (attention_mask.flip(-1) != 0).int().argmax(-1)


def check_intervention(model: nn.Module, vector: torch.Tensor, layer: int, scale: float) -> None:
    """Refuse, before any forward, an intervention that cannot apply to this model."""
    _, layers = decoder_layers(model)
    hidden = text_config(model).hidden_size
    if not isinstance(layer, int) or not 0 <= layer < len(layers):
        raise ValueError(
            f"layer={layer!r}: the model has {len(layers)} decoder layers; pass an index in 0..{len(layers) - 1} "
            "(an InstructionVector carries the layer it was extracted for)."
        )
    if vector.dim() not in (1, 2) or vector.shape[-1] != hidden:
        raise ValueError(
            f"The instruction vector has shape {tuple(vector.shape)}, but this model's hidden size is {hidden}: pass "
            "[hidden] or [batch, hidden], extracted from this model (or one of the same architecture)."
        )
    if not bool(torch.isfinite(vector).all()):
        raise ValueError("The instruction vector holds NaN or inf: extract it again, or check how it was computed.")
    if not math.isfinite(scale):
        raise ValueError(
            f"scale={scale}: the intervention scale must be a finite number (0 leaves the model as it is)."
        )


@contextmanager
def intervene(
    model: nn.Module,
    vector: torch.Tensor,
    layer: int,
    *,
    scale: float = 1.0,
    positions: torch.Tensor | None = None,
    generated_tokens: bool = False,
) -> Iterator[None]:
    """Inside the block, every forward of ``model`` (a transformers decoder or a PEFT model around one; plain
    calls, training steps and ``generate`` alike) adds ``scale * vector`` to the output of decoder layer ``layer``
    (what ``output_hidden_states`` reports as ``hidden_states[layer + 1]``) at one position per row.

    ``vector`` is [hidden] or [batch, hidden] (one per row). The position is each row's last attended token, or
    ``positions[i]`` ([batch], long) when given, e.g. the last prompt token of rows that go on with their
    completion. Forwards that continue a cached sequence get nothing, unless ``generated_tokens``: then their
    last token gets it too.

    The hook runs before the layer's other forward hooks, transformers' own recorder of ``output_hidden_states``
    among them (installed at its first use), so the reported hidden states include the vector.
    """
    check_intervention(model, vector, layer, scale)
    owner, layers = decoder_layers(model)
    state = {"continuation": False, "attention_mask": None}

    def before_layers(module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = next((value for value in kwargs.values() if isinstance(value, Cache)), None)
        state["continuation"] = cache is not None and cache.get_seq_length() > 0
        state["attention_mask"] = kwargs.get("attention_mask")

    def after_layer(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
        hidden = output[0] if isinstance(output, tuple) else output
        batch, length = hidden.shape[:2]
        if state["continuation"]:
            if not generated_tokens:
                return output
            where = torch.full((batch,), length - 1, dtype=torch.long)
        elif positions is not None:
            where = positions
        else:
            where = last_real_positions(state["attention_mask"], batch, length)
        rows = torch.arange(batch, device=hidden.device)
        where = where.to(hidden.device)
        added = hidden[rows, where] + scale * vector.to(hidden.device, hidden.dtype)
        hidden = hidden.index_put((rows, where), added)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handles = [
        owner.register_forward_pre_hook(before_layers, with_kwargs=True),
        layers[layer].register_forward_hook(after_layer, prepend=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
