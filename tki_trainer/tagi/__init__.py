"""TAGI: task adapters generated from instructions (a hypernetwork turns an instruction embedding into LoRA weights).

Importing this package registers the instruction-LoRA tuner with PEFT, so `PeftModel.from_pretrained` loads its
adapters.
"""

from .tuner import (
    InstructionLoraConfig,
    InstructionLoraModel,
    export_instruction_lora,
    generate_for,
    generate_lora,
)


__all__ = [
    "InstructionLoraConfig",
    "InstructionLoraModel",
    "export_instruction_lora",
    "generate_for",
    "generate_lora",
]
