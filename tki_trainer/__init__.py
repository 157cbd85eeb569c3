"""tki-trainer: Task Knowledge Injection for the Hugging Face stack.

Importing the package registers its tuners with PEFT (TKI's latent bank and TAGI's instruction-generated LoRA), so
`PeftModel.from_pretrained` loads their adapters.
"""

from .config import TKIConfig
from .data import add_query_embeddings
from .embedded import load_embedded_encoder, load_embedded_model
from .presets import embedded_lora_config
from .reinstatement import PriorInputConfig, PriorInputStore, compute_prior_inputs
from .tagi import (
    InstructionLoraConfig,
    InstructionLoraModel,
    TAGIConfig,
    TAGITrainer,
    export_instruction_lora,
    generate_for,
    generate_lora,
)
from .trainer import TKITrainer
from .tuner import LatentLoraConfig, TKIModel, export_lora, route


__version__ = "0.1.0"

__all__ = [
    "InstructionLoraConfig",
    "InstructionLoraModel",
    "TAGIConfig",
    "TAGITrainer",
    "LatentLoraConfig",
    "PriorInputConfig",
    "PriorInputStore",
    "TKIConfig",
    "TKIModel",
    "TKITrainer",
    "add_query_embeddings",
    "compute_prior_inputs",
    "embedded_lora_config",
    "export_instruction_lora",
    "export_lora",
    "generate_for",
    "generate_lora",
    "load_embedded_encoder",
    "load_embedded_model",
    "route",
]
