"""`LatentLoraConfig`: the PEFT config of the TKI tuner (shared LoRA plus a bank of latent LoRA increments)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft import LoraConfig
from peft.config import PeftConfig


PEFT_TYPE = "TKI"
"""The tuner's ``peft_type`` string, as written into ``adapter_config.json``."""


@dataclass
class LatentLoraConfig(PeftConfig):
    """Configuration of a TKI adapter: an ordinary LoRA shared by every example, and a bank of latent tasks.

    Each targeted linear layer computes, for example ``i`` of a batch,
    ``W x + (lora_alpha / r) B A x + (latent_alpha / latent_r) * sum_j w_ij B_j A_j x``, where the ``k`` latent
    tasks ``j`` and their weights ``w_ij`` are retrieved by comparing the example's query embedding with the
    bank's frozen keys. Defaults are the TKI paper's values (C=16, Q=12, k=2, LoRA rank 8 on all linear layers,
    a RoBERTa-base query encoder of dimension 768); the latent bank sits on ``q_proj``/``v_proj``.
    """

    r: int = field(default=8, metadata={"help": "Rank of the shared LoRA (the paper's `lora_rank`)."})
    lora_alpha: int = field(
        default=16, metadata={"help": "Scaling numerator of the shared LoRA: its output is scaled by lora_alpha / r."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default="all-linear",
        metadata={
            "help": "Modules that get the shared LoRA: a list of module names or suffixes, a regex, or 'all-linear' "
            "(every linear layer but the output head, the paper's `lora_target=all`); None: what PEFT's LoRA targets "
            "for the architecture."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules never adapted, as names, suffixes or a regex."}
    )
    lora_dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the input of the shared LoRA and of the latent bank."}
    )
    use_shared_lora: bool = field(
        default=True,
        metadata={"help": "Train the shared LoRA next to the bank; False leaves only the latent increments."},
    )
    latent_r: int = field(default=8, metadata={"help": "Rank of each latent increment B_j A_j."})
    latent_alpha: float = field(
        default=16,
        metadata={
            "help": "Scaling numerator of the latent bank: the blended increment is scaled by latent_alpha / latent_r."
        },
    )
    latent_target_modules: Optional[Union[list[str], str]] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={"help": "Modules that get a latent bank, in the same forms as target_modules."},
    )
    num_groups: int = field(
        default=16, metadata={"help": "C: groups of latent tasks; a training example retrieves only inside its group."}
    )
    keys_per_group: int = field(default=12, metadata={"help": "Q: latent tasks per group; the bank holds M = C * Q."})
    top_k: int = field(default=2, metadata={"help": "k: latent tasks retrieved and blended per example."})
    key_dim: int = field(
        default=768,
        metadata={
            "help": "Dimension of keys and query embeddings, i.e. the query encoder's output size (RoBERTa-base: 768)."
        },
    )
    blend: Literal["cosine", "softmax"] = field(
        default="cosine",
        metadata={
            "help": "Blend weights of the k retrieved tasks: 'cosine' is the paper's D/sum(D) with D the cosine "
            "similarity clamped at a small epsilon, 'softmax' a softmax of the similarities over temperature."
        },
    )
    temperature: float = field(default=1.0, metadata={"help": "Temperature of the 'softmax' blend."})
    inference_retrieval: Literal["global", "group"] = field(
        default="global",
        metadata={
            "help": "Retrieval for inputs given without group ids (unseen tasks): 'global' searches all M keys, "
            "'group' searches only the group holding the most similar key."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the keys; they are saved with the adapter all the same."})
    encoder_name: Optional[str] = field(
        default=None, metadata={"help": "Metadata: the sentence encoder that produced the query embeddings."}
    )
    encoder_dim: Optional[int] = field(default=None, metadata={"help": "Metadata: that encoder's output dimension."})

    target_parameters = None
    """PEFT's matcher reads this attribute; the tuner adapts modules, never bare parameters."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.task_type is None:
            self.task_type = "CAUSAL_LM"
        for name in ("r", "latent_r", "num_groups", "keys_per_group", "top_k", "key_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"LatentLoraConfig.{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.top_k > self.keys_per_group:
            raise ValueError(
                f"top_k={self.top_k} exceeds keys_per_group={self.keys_per_group}: an example cannot retrieve more latent "
                "tasks than its group holds; lower top_k or raise keys_per_group."
            )
        if self.keys_per_group > self.key_dim:
            raise ValueError(
                f"keys_per_group={self.keys_per_group} exceeds key_dim={self.key_dim}: the keys of a group are orthogonal, "
                f"so at most {self.key_dim} fit; lower keys_per_group."
            )
        if self.blend not in ("cosine", "softmax"):
            raise ValueError(f"blend must be 'cosine' or 'softmax', got {self.blend!r}.")
        if self.inference_retrieval not in ("global", "group"):
            raise ValueError(f"inference_retrieval must be 'global' or 'group', got {self.inference_retrieval!r}.")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}.")
        if not self.latent_target_modules:
            raise ValueError(
                "latent_target_modules is empty: name the modules that hold the latent bank, e.g. ['q_proj', 'v_proj']."
            )
        if self.use_shared_lora and self.target_modules is not None and not self.target_modules:
            raise ValueError(
                "target_modules is empty while use_shared_lora=True: name the shared LoRA's modules or set use_shared_lora=False."
            )
        for name in ("target_modules", "latent_target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value))

    @classmethod
    def from_lora_config(cls, lora: LoraConfig, **bank: Any) -> LatentLoraConfig:
        """The TKI adapter whose shared LoRA is ``lora``, with the bank given by ``bank`` (fields of this config;
        the rest keep the paper's values). A LoRA field the TKI layer cannot honour (DoRA, rsLoRA, biases, rank
        patterns, other initialisations, ...) is refused, naming it, rather than silently dropped."""
        carried = {"r", "lora_alpha", "target_modules", "exclude_modules", "lora_dropout", "task_type"}
        carried |= {f.name for f in dataclasses.fields(PeftConfig)} - {"peft_type"}
        default = LoraConfig()
        refused = sorted(
            f.name
            for f in dataclasses.fields(LoraConfig)
            if f.name not in carried and f.name != "peft_type" and getattr(lora, f.name) != getattr(default, f.name)
        )
        if refused:
            raise ValueError(
                f"lta=True builds the TKI adapter from your LoraConfig, but TKI layers cannot honour {refused}: "
                "leave them at LoRA's defaults, pass a tki_trainer.LatentLoraConfig, or set lta=False."
            )
        values = {name: getattr(lora, name) for name in carried if name not in ("auto_mapping", "peft_version")}
        return cls(**{**values, **bank})

    @property
    def num_latent_tasks(self) -> int:
        """M, the number of latent tasks in the bank."""
        return self.num_groups * self.keys_per_group
