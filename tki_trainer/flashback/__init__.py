"""Flashbacks (Joint Flashback Adaptation): old tasks' prompts whose next-token distributions are kept close to
the reference model's while new tasks are learned, routed through the same latent-task bank."""

from .divergence import DIVERGENCES, token_divergence
from .prompts import FlashbackBatch, Flashbacks, extend_with_continuations, load_flashback_rows, tokenize_flashbacks
from .reference import Reference


__all__ = [
    "DIVERGENCES",
    "FlashbackBatch",
    "Flashbacks",
    "Reference",
    "extend_with_continuations",
    "load_flashback_rows",
    "token_divergence",
    "tokenize_flashbacks",
]
