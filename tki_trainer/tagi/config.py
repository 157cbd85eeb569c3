"""`TAGIConfig`: `trl.SFTConfig` plus the columns, teachers and loss weights of TAGI's hypernetwork training."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from trl import SFTConfig


MATCHING_GATES = ("sigmoid", "none")


@dataclass
class TAGIConfig(SFTConfig):
    r"""
    Configuration class for [`TAGITrainer`]: [`~trl.SFTConfig`] plus the parameters below. The hypernetwork
    minimises ``L_pred + kl_weight * KL(teacher || student) + matching_weight * g(d) * d``, where the student is the
    frozen model with the generated LoRA reading the example's input alone, the teacher is the model with its task
    category's LoRA reading the instruction and the input, and ``d`` the squared distance between the generated
    update and the teacher's (`tagi.losses`).

    Parameters:
        > Rows

        instruction_column (`str`, *optional*, defaults to `"instruction"`):
            Column holding each row's task instruction (SNI: the definition, optionally with demonstrations); the
            prompt holds the input alone.
        instruction_embedding_column (`str`, *optional*, defaults to `"instruction_embedding"`):
            Column of instruction embeddings; computed with `instruction_encoder` when the dataset lacks it.
        instruction_encoder (`str`, *optional*, defaults to `"embedded"`):
            Sentence encoder for the instructions: a sentence-transformers name or path, or `"embedded"` for the
            packaged all-MiniLM-L6-v2 (384 dimensions, the `InstructionLoraConfig` default `key_dim`).
        teacher_column (`str`, *optional*, defaults to `"teacher"`):
            Column naming each training row's teacher, a key of `teachers` (TAGI: the task's category).

        > Teachers

        teachers (`dict[str, str]`, *optional*):
            Teacher name -> its LoRA adapter (a directory `SFTTrainer` saved, or a Hub id), each trained with the
            instruction in the prompt. `None` trains on the prediction loss alone (pretraining, ablations), which
            requires `kl_weight=0` and `matching_weight=0`.
        teacher_separator (`str`, *optional*, defaults to `"\n\n"`):
            Text between the instruction and the input in the teacher's prompt (and in `teacher_rows`).

        > Loss

        kl_weight (`float`, *optional*, defaults to `5.0`):
            Weight of KL(teacher || student) over the answer tokens (TAGI: 5); 0 leaves the teachers' outputs out.
        kl_temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature of both distributions; the term is multiplied by its square.
        matching_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the parameter-matching term; 0 leaves it out.
        matching_gate (`str`, *optional*, defaults to `"sigmoid"`):
            `"sigmoid"`: the term is `sigmoid(d) * d` (TAGI's code), which weighs a small distance less; `"none"`: `d`.
    """

    instruction_column: str = field(
        default="instruction",
        metadata={"help": "Column holding each row's task instruction; the prompt holds the input alone."},
    )
    instruction_embedding_column: str = field(
        default="instruction_embedding",
        metadata={"help": "Column of instruction embeddings; computed with instruction_encoder when missing."},
    )
    instruction_encoder: str = field(
        default="embedded",
        metadata={
            "help": "Sentence encoder for the instructions: a sentence-transformers name or path, or 'embedded'."
        },
    )
    teacher_column: str = field(
        default="teacher", metadata={"help": "Column naming each training row's teacher, a key of teachers."}
    )
    teachers: Optional[dict[str, str]] = field(
        default=None,
        metadata={
            "help": "Teacher name -> LoRA adapter directory or Hub id, each trained with the instruction in the prompt."
        },
    )
    teacher_separator: str = field(
        default="\n\n", metadata={"help": "Text between the instruction and the input in the teacher's prompt."}
    )
    kl_weight: float = field(default=5.0, metadata={"help": "Weight of KL(teacher || student) (TAGI: 5)."})
    kl_temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature of the KL term; the term is multiplied by its square."}
    )
    matching_weight: float = field(default=1.0, metadata={"help": "Weight of the parameter-matching term."})
    matching_gate: str = field(
        default="sigmoid", metadata={"help": "'sigmoid': sigmoid(d) * d (TAGI's code); 'none': d."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.packing or self.eval_packing or self.padding_free:
            raise ValueError(
                "packing / eval_packing / padding_free merge examples into one row, but each example gets the LoRA "
                "generated from its own instruction: set packing=False, eval_packing=False and padding_free=False."
            )
        negative = [name for name in ("kl_weight", "matching_weight") if getattr(self, name) < 0]
        if negative:
            raise ValueError(f"{', '.join(negative)} must be >= 0 (0 leaves the term out).")
        if self.kl_temperature <= 0:
            raise ValueError(f"kl_temperature must be > 0, got {self.kl_temperature}.")
        if self.matching_gate not in MATCHING_GATES:
            raise ValueError(f"matching_gate must be one of {MATCHING_GATES}, got {self.matching_gate!r}.")
        if self.teachers is not None and not (self.kl_weight or self.matching_weight):
            raise ValueError(
                "teachers are given but kl_weight and matching_weight are 0, so no term would read them: drop "
                "teachers, or give one of the weights a positive value."
            )
        if self.teachers is not None and self.completion_only_loss is False:
            raise ValueError(
                "completion_only_loss=False trains on the prompt's tokens too, but the teacher reads another prompt: "
                "leave completion_only_loss at its default with teachers."
            )
        if self.teachers is None and (self.kl_weight or self.matching_weight):
            raise ValueError(
                "kl_weight and matching_weight compare with the teachers, but teachers is None: pass teachers "
                "({category: LoRA adapter}), or set kl_weight=0 and matching_weight=0 to train on the prediction loss "
                "alone (pretraining, ablations)."
            )

    @property
    def uses_teachers(self) -> bool:
        """Whether training reads the teachers: given, and at least one term compares with them."""
        return self.teachers is not None and (self.kl_weight > 0 or self.matching_weight > 0)
