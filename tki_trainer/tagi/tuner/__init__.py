"""The instruction-LoRA (TAGI) PEFT tuner, registered with PEFT on import under its own ``peft_type``.

Registered as the TKI tuner is (PEFT's `register_peft_method` accepts only its own `PeftType` names): after this,
`get_peft_model`, `PeftModel.from_pretrained`, `save_pretrained` and `load_adapter` treat ``"TAGI"`` like a
built-in type.
"""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from .config import PEFT_TYPE, InstructionLoraConfig
from .export import export_instruction_lora
from .hypernet import LoraHypernetwork, ModuleSpec
from .layer import InstructionLoraLayer, Linear
from .model import InstructionLoraModel, apply_lora, find_instruction_tuner, generate_for, generate_lora


PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = InstructionLoraConfig
PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = InstructionLoraModel
PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = InstructionLoraModel.prefix

__all__ = [
    "PEFT_TYPE",
    "InstructionLoraConfig",
    "InstructionLoraLayer",
    "InstructionLoraModel",
    "Linear",
    "LoraHypernetwork",
    "ModuleSpec",
    "apply_lora",
    "export_instruction_lora",
    "find_instruction_tuner",
    "generate_for",
    "generate_lora",
]
