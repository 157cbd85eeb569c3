"""TAGI: task adapters generated from instructions (a hypernetwork turns an instruction embedding into LoRA weights).

Importing this package registers the instruction-LoRA tuner with PEFT, so `PeftModel.from_pretrained` loads its
adapters. `TAGITrainer` trains the hypernetwork (with teachers: distillation and parameter matching).
"""

from .config import TAGIConfig
from .rows import pretraining_rows, sni_instruction_rows, teacher_prompt, teacher_rows
from .teachers import TeacherLoras, train_teachers
from .trainer import TAGITrainer
from .tuner import (
    InstructionLoraConfig,
    InstructionLoraModel,
    apply_lora,
    export_instruction_lora,
    generate_for,
    generate_lora,
)


__all__ = [
    "InstructionLoraConfig",
    "InstructionLoraModel",
    "TAGIConfig",
    "TAGITrainer",
    "TeacherLoras",
    "apply_lora",
    "export_instruction_lora",
    "generate_for",
    "generate_lora",
    "pretraining_rows",
    "sni_instruction_rows",
    "teacher_prompt",
    "teacher_rows",
    "train_teachers",
]
