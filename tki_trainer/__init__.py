"""tki-trainer: Task Knowledge Injection for the Hugging Face stack.

Importing the package registers the TKI tuner with PEFT, so `PeftModel.from_pretrained` loads TKI adapters.
"""

from .embedded import embedded_lora_config, load_embedded_encoder, load_embedded_model
from .tuner import LatentLoraConfig, TKIModel, export_lora, route


__version__ = "0.1.0"

__all__ = [
    "LatentLoraConfig",
    "TKIModel",
    "embedded_lora_config",
    "export_lora",
    "load_embedded_encoder",
    "load_embedded_model",
    "route",
]
