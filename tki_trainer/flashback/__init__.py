"""Flashbacks (Joint Flashback Adaptation): old tasks' prompts whose next-token distributions are kept close to
the reference model's while new tasks are learned, routed through the same latent-task bank."""

from ..modes import evaluation_mode
from .divergence import DIVERGENCE_NAMES, DIVERGENCES, token_divergence
from .objective import FlashbackObjective
from .prompts import (
    FlashbackBatch,
    Flashbacks,
    end_of_sequence_ids,
    extend_with_continuations,
    load_flashback_rows,
    tokenize_flashbacks,
)
from .reference import Reference, starts_as_identity


__all__ = [
    "DIVERGENCE_NAMES",
    "DIVERGENCES",
    "FlashbackBatch",
    "FlashbackObjective",
    "Flashbacks",
    "Reference",
    "end_of_sequence_ids",
    "evaluation_mode",
    "extend_with_continuations",
    "load_flashback_rows",
    "starts_as_identity",
    "token_divergence",
    "tokenize_flashbacks",
]
