"""The TKI PEFT tuner, registered with PEFT on import under its own ``peft_type``.

PEFT's `register_peft_method` accepts only names of its own `PeftType` enum, which cannot be extended,
so the tuner is entered into the same mapping tables that function fills. After this, `get_peft_model`,
`PeftModel.from_pretrained`, `save_pretrained` and `load_adapter` treat ``"TKI"`` like a built-in type.
"""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from .config import PEFT_TYPE, LatentLoraConfig
from .export import export_lora
from .layer import Linear, TKILayer, lowrank_per_example
from .model import TKIModel, bypass_bank, route


PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = LatentLoraConfig
PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = TKIModel
PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = TKIModel.prefix

__all__ = [
    "PEFT_TYPE",
    "LatentLoraConfig",
    "Linear",
    "TKILayer",
    "TKIModel",
    "bypass_bank",
    "export_lora",
    "lowrank_per_example",
    "route",
]
