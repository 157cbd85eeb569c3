import pytest
import torch

from tki_trainer.pcgrad import PCGradAccumulator, project


def yu_et_al(g1, g2):
    """PCGrad for two tasks written out: each gradient loses its component along the other where they conflict."""
    p1, p2 = g1.clone(), g2.clone()
    if torch.dot(g1, g2) < 0:
        p1 = g1 - torch.dot(g1, g2) / torch.dot(g2, g2) * g2
        p2 = g2 - torch.dot(g2, g1) / torch.dot(g1, g1) * g1
    return p1 + p2


@pytest.mark.parametrize(
    "g1,g2,conflict",
    [
        ([1.0, 0.0, 2.0], [-1.0, 1.0, 0.0], True),
        ([1.0, 2.0, 0.0], [0.5, -0.1, 3.0], False),
        ([3.0, -1.0, 0.5], [-3.0, 1.0, -0.5], True),
    ],
)
def test_projection_follows_the_formula(g1, g2, conflict):
    g1, g2 = torch.tensor(g1), torch.tensor(g2)
    update, projection = project(g1, g2)
    torch.testing.assert_close(update, yu_et_al(g1, g2))
    assert projection.conflict == conflict
    assert projection.cosine == pytest.approx(float(torch.cosine_similarity(g1, g2, dim=0)), abs=1e-6)
    if conflict:
        p1 = g1 - torch.dot(g1, g2) / torch.dot(g2, g2) * g2
        assert float(torch.dot(p1, g2)) == pytest.approx(0.0, abs=1e-5)


def test_accumulator_sums_micro_batches_then_projects_once_into_grad():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(1))
    accumulator = PCGradAccumulator([a, b])
    pairs = [(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([-2.0, 1.0, 0.0])), (torch.tensor([0.0, 1.0, 0.5]), torch.tensor([0.0, -1.0, -1.0]))]
    for g1, g2 in pairs:
        a.grad, b.grad = g1[:2].clone(), g1[2:].clone()
        accumulator.add(0, accumulator.take_gradients())
        assert a.grad is None
        accumulator.add(1, g2)
    accumulator.apply()
    expected = yu_et_al(sum(p[0] for p in pairs), sum(p[1] for p in pairs))
    torch.testing.assert_close(torch.cat([a.grad, b.grad]), expected)
