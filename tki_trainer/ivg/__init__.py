"""Instruction vectors (Jiang et al., "Refine Large Language Model Fine-tuning via Instruction Vector"): a vector
in the residual stream, built from the attention heads with the largest causal effect on in-context prompts
(Todd et al.'s function vectors), whose addition at one layer's last prompt token brings back what a task's
in-context prompts make the model do."""

from .accuracy import answered_correctly
from .config import IVConfig
from .effects import causal_effects
from .extraction import extract_instruction_vector
from .heads import AttentionHeads, HeadCapture
from .intervention import intervene
from .prompts import EncodedPrompt, PromptFormat
from .vector import InstructionVector


__all__ = [
    "AttentionHeads",
    "EncodedPrompt",
    "HeadCapture",
    "IVConfig",
    "InstructionVector",
    "PromptFormat",
    "answered_correctly",
    "causal_effects",
    "extract_instruction_vector",
    "intervene",
]
