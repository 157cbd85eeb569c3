"""`InstructionLoraConfig`: the PEFT config of the TAGI tuner (LoRA weights generated from an instruction)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig


PEFT_TYPE = "TAGI"
"""The tuner's ``peft_type`` string, as written into ``adapter_config.json``."""

_SIZES = ("r", "key_dim", "task_embedding_dim", "layer_embedding_dim", "module_embedding_dim", "hidden_dim")


@dataclass
class InstructionLoraConfig(PeftConfig):
    """Configuration of an instruction-generated LoRA: a hypernetwork turns a task's instruction embedding into the
    ``A`` and ``B`` of every targeted linear layer, which then computes ``W x + (lora_alpha / r) B A x``.

    The hypernetwork follows Text-to-LoRA (Charakorn et al. 2025), the decoder-only analogue of TAGI: a task code
    (a linear map of the sentence-encoder embedding, layer-normed), a learned embedding of the layer's depth and
    one of the module type are concatenated, passed through an MLP trunk with residual blocks, and one output head
    per module type emits ``A`` and ``B`` flattened. Defaults are Text-to-LoRA's (rank 8 on ``q_proj``/``v_proj``,
    latent 64 + 32 + 32, head input 512); ``key_dim`` defaults to the embedded encoder's 384.
    """

    r: int = field(default=8, metadata={"help": "Rank of each generated LoRA."})
    lora_alpha: float = field(
        default=16, metadata={"help": "Scaling numerator: a generated update is scaled by lora_alpha / r, as in LoRA."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={
            "help": "Modules that get a generated LoRA: names or suffixes, a regex, or 'all-linear'; None: what PEFT's "
            "LoRA targets for the architecture. Each distinct module type gets its own output head."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules never adapted, as names, suffixes or a regex."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the input of each generated LoRA."})
    key_dim: int = field(
        default=384,
        metadata={"help": "Dimension of the instruction embeddings, i.e. the sentence encoder's output size."},
    )
    task_embedding_dim: int = field(
        default=64, metadata={"help": "Width of the task code the instruction embedding is mapped to."}
    )
    layer_embedding_dim: int = field(default=32, metadata={"help": "Width of the learned layer-depth embedding."})
    module_embedding_dim: int = field(default=32, metadata={"help": "Width of the learned module-type embedding."})
    hidden_dim: int = field(default=512, metadata={"help": "Width of the trunk's output, the heads' input."})
    num_blocks: int = field(default=2, metadata={"help": "Residual MLP blocks in the trunk."})
    hypernet_dropout: float = field(
        default=0.0, metadata={"help": "Dropout inside the hypernetwork's trunk (Text-to-LoRA uses 0.05)."}
    )
    encoder_name: Optional[str] = field(
        default=None, metadata={"help": "Metadata: the sentence encoder that produced the instruction embeddings."}
    )
    encoder_dim: Optional[int] = field(default=None, metadata={"help": "Metadata: that encoder's output dimension."})

    target_parameters = None
    """PEFT's matcher reads this attribute; the tuner adapts modules, never bare parameters."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.task_type is None:
            self.task_type = "CAUSAL_LM"
        for name in _SIZES:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(
                    f"InstructionLoraConfig.{name} must be a positive integer, got {getattr(self, name)!r}."
                )
        if not isinstance(self.num_blocks, int) or self.num_blocks < 0:
            raise ValueError(f"InstructionLoraConfig.num_blocks must be an integer >= 0, got {self.num_blocks!r}.")
        for name in ("lora_dropout", "hypernet_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"InstructionLoraConfig.{name} must lie in [0, 1), got {getattr(self, name)!r}.")
        if self.encoder_dim is not None and self.encoder_dim != self.key_dim:
            raise ValueError(
                f"encoder_dim={self.encoder_dim} differs from key_dim={self.key_dim}: the hypernetwork reads the "
                "encoder's embeddings, so set key_dim to the encoder's dimension."
            )
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules is empty: name the modules that get a generated LoRA, e.g. ['q_proj'].")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value))
