"""The terms of TAGI's hypernetwork fine-tuning besides the student's prediction loss (SFTTrainer's own): the
distillation from the task category's teacher, and the distance between the generated update and the teacher's.

Both compare what the hypernetwork generates for a task with a LoRA trained on that task's category with the
instruction in the prompt (the teacher): in its outputs (the student reads the input alone) and in its weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


Factors = tuple[torch.Tensor, torch.Tensor]
"""A LoRA's factors in PEFT's layout, for a batch of tasks: ``A`` [tasks, r, in], ``B`` [tasks, out, r]."""


def distillation(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, rows: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher || student) at ``temperature``, times its square (the gradients then keep their size as the
    temperature changes, Hinton et al.), averaged over each row's positions, then over rows. Logits are [positions,
    vocab], the same answer tokens in the same order on both sides (the teacher's prompt holds the instruction, the
    student's does not); ``rows`` [positions] says whose each position is. Each row counts once, as in parameter
    matching, so the term splits over micro-batches and processes as one batch does."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = F.kl_div(student, teacher, reduction="none", log_target=True).sum(-1)
    _, owner, counts = rows.unique(return_inverse=True, return_counts=True)
    per_row = per_position.new_zeros(len(counts)).index_add(0, owner, per_position) / counts
    return per_row.mean() * temperature**2


def update_distance(
    generated: Factors, teacher: Factors, generated_scale: float, teacher_scale: float
) -> torch.Tensor:
    """``|| s_g B_g A_g - s_t B_t A_t ||_F^2`` per task, [tasks], through r x r products only: the [out, in]
    updates are never formed, and factorizations of the same update (``B Q``, ``Q^-1 A``) are at distance zero,
    which comparing the factors themselves would not give."""

    def inner(first: Factors, second: Factors) -> torch.Tensor:  # <B1 A1, B2 A2> = tr((B1^T B2)(A2 A1^T))
        (a1, b1), (a2, b2) = first, second
        return torch.einsum("tij,tji->t", b1.transpose(1, 2) @ b2, a2 @ a1.transpose(1, 2))

    g = (generated[0].float(), generated[1].float() * generated_scale)
    t = (teacher[0].float(), teacher[1].float() * teacher_scale)
    return inner(g, g) - 2 * inner(g, t) + inner(t, t)


def parameter_matching(
    generated: dict[str, Factors], teacher: dict[str, Factors], generated_scale: float, teacher_scale: float
) -> torch.Tensor:
    """The squared distance of each task's generated update from its teacher's, summed over the modules both adapt,
    [tasks] (``scale``: each LoRA's ``lora_alpha / r``). Modules only one of them adapts are refused: the distance
    would silently leave them out."""
    if generated.keys() != teacher.keys():
        raise ValueError(
            "The generated LoRA and the teacher LoRA adapt different modules (only generated: "
            f"{sorted(generated.keys() - teacher.keys())[:3]}, only teacher: {sorted(teacher.keys() - generated.keys())[:3]}):"
            " train the teachers with the target_modules of the InstructionLoraConfig."
        )
    distances = [update_distance(generated[name], teacher[name], generated_scale, teacher_scale) for name in generated]
    return torch.stack(distances).sum(0)
