"""tki-trainer: Task Knowledge Injection for the Hugging Face stack.

Importing the package registers the TKI tuner with PEFT, so `PeftModel.from_pretrained` loads TKI adapters.
"""

from .config import TKIConfig
from .data import add_query_embeddings
from .embedded import load_embedded_encoder, load_embedded_model
from .presets import embedded_lora_config
from .reinstatement import PriorInputConfig, PriorInputStore, compute_prior_inputs
from .trainer import TKITrainer
from .tuner import LatentLoraConfig, TKIModel, export_lora, route


__version__ = "0.1.0"

__all__ = [
    "LatentLoraConfig",
    "PriorInputConfig",
    "PriorInputStore",
    "TKIConfig",
    "TKIModel",
    "TKITrainer",
    "add_query_embeddings",
    "compute_prior_inputs",
    "embedded_lora_config",
    "export_lora",
    "load_embedded_encoder",
    "load_embedded_model",
    "route",
]
