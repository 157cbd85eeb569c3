"""TAGI's distillation and parameter-matching terms against explicit dense computations."""

import pytest
import torch
import torch.nn.functional as F

from tki_trainer.tagi.losses import distillation, parameter_matching, update_distance


def factors(tasks, r, inputs, outputs, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tasks, r, inputs, generator=generator), torch.randn(tasks, outputs, r, generator=generator)


def test_update_distance_equals_the_dense_frobenius_distance():
    generated, teacher = factors(3, 4, 7, 5, seed=0), factors(3, 2, 7, 5, seed=1)
    dense = 0.5 * generated[1] @ generated[0] - 2.0 * teacher[1] @ teacher[0]
    expected = (dense**2).sum(dim=(1, 2))
    torch.testing.assert_close(update_distance(generated, teacher, 0.5, 2.0), expected, rtol=1e-5, atol=1e-4)


def test_two_factorizations_of_one_update_are_at_distance_zero():
    a, b = factors(2, 3, 6, 4, seed=2)
    q = torch.randn(3, 3, generator=torch.Generator().manual_seed(3)) + 3 * torch.eye(3)
    other = (torch.linalg.solve(q, a), b @ q)
    assert update_distance((a, b), other, 1.0, 1.0).abs().max() < 1e-3


def test_parameter_matching_sums_modules_per_task_and_refuses_different_modules():
    generated = {"q": factors(2, 2, 5, 5, seed=4), "v": factors(2, 2, 5, 3, seed=5)}
    teacher = {"q": factors(2, 2, 5, 5, seed=6), "v": factors(2, 2, 5, 3, seed=7)}
    by_hand = sum(
        ((generated[m][1] @ generated[m][0] - teacher[m][1] @ teacher[m][0]) ** 2).sum(dim=(1, 2)) for m in "qv"
    )
    torch.testing.assert_close(parameter_matching(generated, teacher, 1.0, 1.0), by_hand, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="adapt different modules"):
        parameter_matching(generated, {"q": teacher["q"]}, 1.0, 1.0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_is_the_teachers_kl_times_the_squared_temperature_averaged_per_row(temperature):
    generator = torch.Generator().manual_seed(8)
    student, teacher = torch.randn(6, 11, generator=generator), torch.randn(6, 11, generator=generator)
    rows = torch.tensor([0, 0, 0, 0, 2, 2])  # row 0 has four answer positions, row 2 two, row 1 none
    p = F.softmax(teacher / temperature, dim=-1)
    per_position = (p * (p.log() - F.log_softmax(student / temperature, dim=-1))).sum(-1)
    by_hand = (per_position[:4].mean() + per_position[4:].mean()) / 2 * temperature**2
    torch.testing.assert_close(distillation(student, teacher, rows, temperature), by_hand)
    assert float(distillation(teacher, teacher, rows, temperature)) == pytest.approx(0.0, abs=1e-6)
