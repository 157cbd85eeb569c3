"""The objectives `TKITrainer` builds (each when its arguments ask for it), in the order their gradients follow
SFT's for PCGrad. Registering an objective is one line here."""

from .flashback.objective import FlashbackObjective
from .ivg.guidance import InstructionVectorGuidance
from .objective import TrainingObjective
from .reinstatement.objective import ReinstatementObjective


OBJECTIVES: tuple[type[TrainingObjective], ...] = (
    ReinstatementObjective,
    FlashbackObjective,
    InstructionVectorGuidance,
)
