"""Knowledge reinstatement, stage 1: its settings, and which of them change the prior inputs.

Kept apart from the stage itself so that the store, `TKIConfig` and ``tki-prepare`` declare and compare the
settings without importing the optimisation (POT, TRL's collator).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from trl import SFTConfig


DEFAULT_MAX_LENGTH: int = SFTConfig.__dataclass_fields__["max_length"].default
"""``max_length`` of `SFTConfig`, which `TKIConfig` inherits."""


@dataclass
class PriorInputConfig:
    """Settings of stage 1. The defaults cut the mean completion cross-entropy of the embedded model on P3 rows
    by about 38% (|q-e|/|e| about 1%; bench/results/prepare_speed.md); `PriorInputConfig.paper()` is the paper's
    setting, which barely moves ``q`` (CE lower by well under 1%), so reinstatement then does nothing. ``W`` is
    second order in ``q - e`` (zero gradient at ``q = e``), so at ``|lam|`` of order 1 its sign barely matters: the
    stage reports the ratio of the W gradient's norm to the CE gradient's."""

    steps: int = field(default=5, metadata={"help": "Stage-1 Adam steps per example."})
    learning_rate: float = field(default=3e-4, metadata={"help": "Stage-1 Adam learning rate."})
    wasserstein_weight: float = field(
        default=-1.0,
        metadata={
            "help": "lam: weight of W(q, e) in stage 1. -1, the paper's eq. 5 as written, pushes q away from the "
            "prompt; > 0 keeps q near it; 0 leaves W out."
        },
    )
    wasserstein: Literal["emd", "sinkhorn"] = field(
        default="emd", metadata={"help": "How W(q, e) is computed: 'emd' (exact) or 'sinkhorn'."}
    )
    sinkhorn_reg: float = field(default=0.05, metadata={"help": "Entropic regularisation of 'sinkhorn'."})
    batch_size: int = field(
        default=8, metadata={"help": "Examples optimised together in stage 1; does not change the results."}
    )

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("PriorInputConfig.steps and batch_size must be at least 1.")
        if self.wasserstein not in ("emd", "sinkhorn"):
            raise ValueError(f"wasserstein must be 'emd' (exact) or 'sinkhorn', got {self.wasserstein!r}.")
        if self.learning_rate < 0:
            raise ValueError(
                f"learning_rate={self.learning_rate}: stage 1 descends its objective, so the rate must be >= 0 (0 keeps "
                "q = e)."
            )
        if self.wasserstein == "sinkhorn" and self.wasserstein_weight and self.sinkhorn_reg <= 0:
            raise ValueError(
                f"sinkhorn_reg={self.sinkhorn_reg}: Sinkhorn's entropic regularisation must be > 0 (at 0 it divides by "
                "zero); use a positive sinkhorn_reg, or wasserstein='emd' for the exact distance."
            )
        if self.wasserstein_weight < -1.0:
            raise ValueError(
                f"wasserstein_weight={self.wasserstein_weight}: a negative weight pushes q away from e and is bounded "
                "at -1 so that the objective stays bounded below over the steps; use a value in [-1, inf)."
            )

    @classmethod
    def paper(cls) -> PriorInputConfig:
        """The TKI paper's stage 1: 3 epochs (steps per example) at lr 5e-6."""
        return cls(steps=3, learning_rate=5e-6)

    def to_dict(self) -> dict:
        return asdict(self)


RESULT_SETTINGS = ("steps", "learning_rate", "wasserstein_weight", "wasserstein", "sinkhorn_reg")
"""The stage-1 settings that change the prior inputs. Not ``batch_size``: the examples of a batch are optimised
independently (their objectives add up, Adam is elementwise), and padding enters neither the loss nor, under the
attention mask, the other tokens. Not ``max_length``: the trainer checks the prompt spans themselves."""


def result_settings(settings: dict) -> dict:
    """The `RESULT_SETTINGS` of a stage-1 settings dict, without those the others make irrelevant (the Wasserstein
    method at weight 0, the Sinkhorn regularisation with the exact method)."""
    relevant = {key: settings.get(key) for key in RESULT_SETTINGS}
    if not relevant["wasserstein_weight"]:
        del relevant["wasserstein"], relevant["sinkhorn_reg"]
    elif relevant["wasserstein"] != "sinkhorn":
        del relevant["sinkhorn_reg"]
    return relevant
