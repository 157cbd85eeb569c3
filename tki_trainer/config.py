"""`TKIConfig`: `trl.SFTConfig` plus the switches and inputs of Task Knowledge Injection."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from trl import SFTConfig

from .reinstatement import PriorInputConfig


@dataclass
class TKIConfig(SFTConfig):
    """Configuration of `TKITrainer`. Every `SFTConfig` field keeps its meaning; with ``lta``, ``kr`` and
    ``pcgrad`` off the trainer is `SFTTrainer`. Like `SFTConfig`, a CPU-only machine needs ``use_cpu=True`` or
    ``bf16=False``."""

    lta: bool = field(
        default=True,
        metadata={"help": "Latent task adaptation: route each example to its retrieved latent LoRA increments."},
    )
    kr: bool = field(
        default=True,
        metadata={"help": "Knowledge reinstatement: also train on each example's optimised prior input embeddings."},
    )
    pcgrad: bool = field(
        default=True,
        metadata={
            "help": "Project conflicting gradients of the SFT and reinstatement objectives (PCGrad); "
            "without kr there is one objective and nothing to project."
        },
    )
    reinstatement_alpha: float = field(
        default=1.0, metadata={"help": "alpha: weight of the reinstatement loss, total = L_sft + alpha * L_reinst."}
    )
    query_encoder: str = field(
        default="FacebookAI/roberta-base",
        metadata={
            "help": "Sentence encoder for query embeddings the dataset lacks: a sentence-transformers name or path, "
            "or 'embedded' for the packaged all-MiniLM-L6-v2. The paper uses RoBERTa-base."
        },
    )
    prior_inputs_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "A store written by compute_prior_inputs / tki-prepare. Unset with kr=True: computed at "
            "construction under output_dir/_tki_cache."
        },
    )
    prior_inputs_mode: str = field(
        default="store",
        metadata={
            "help": "'store': read prior inputs from a store (computed once); 'on_the_fly': run stage 1 on each "
            "batch inside training, for datasets whose store would not fit on disk."
        },
    )
    prior_inputs_steps: int = field(default=PriorInputConfig.steps, metadata={"help": "Stage-1 steps per example."})
    prior_inputs_learning_rate: float = field(
        default=PriorInputConfig.learning_rate, metadata={"help": "Stage-1 Adam learning rate."}
    )
    prior_inputs_wasserstein_weight: float = field(
        default=PriorInputConfig.wasserstein_weight, metadata={"help": "lam: weight of W(q, e) in stage 1."}
    )
    prior_inputs_batch_size: int = field(
        default=PriorInputConfig.batch_size, metadata={"help": "Examples optimised together in stage 1 (store mode)."}
    )
    query_embedding_column: str = field(default="query_embedding", metadata={"help": "Column of query embeddings."})
    group_id_column: str = field(
        default="group_id", metadata={"help": "Column of latent-task group ids; absent: a seeded hash of the id."}
    )
    id_column: str = field(default="id", metadata={"help": "Column of stable, unique example ids."})
    hub_strategy: str = field(
        default="end",
        metadata={
            "help": "With push_to_hub: 'end' (the only strategy TKITrainer takes) pushes once, through "
            "trainer.push_to_hub; the Trainer's others push its pickled state during training.",
            "choices": ["end"],
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prior_inputs_mode not in ("store", "on_the_fly"):
            raise ValueError(f"prior_inputs_mode must be 'store' or 'on_the_fly', got {self.prior_inputs_mode!r}.")
        if self.reinstatement_alpha < 0:
            raise ValueError(f"reinstatement_alpha must be >= 0, got {self.reinstatement_alpha}.")

    @property
    def prior_input_config(self) -> PriorInputConfig:
        return PriorInputConfig(
            steps=self.prior_inputs_steps,
            learning_rate=self.prior_inputs_learning_rate,
            wasserstein_weight=self.prior_inputs_wasserstein_weight,
            batch_size=self.prior_inputs_batch_size,
        )
