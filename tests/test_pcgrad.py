import pytest
import torch

from tki_trainer.optim import LazyAdamW, TouchedRows
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
        accumulator.add(1, [g2[:2], g2[2:]], scale=0.5)
    accumulator.apply()
    expected = yu_et_al(sum(p[0] for p in pairs), 0.5 * sum(p[1] for p in pairs))
    torch.testing.assert_close(torch.cat([a.grad, b.grad]), expected)


def test_bank_rows_accumulate_like_dense_gradients():
    """A bank whose gradients live on the retrieved rows only gives the dense computation's update."""
    generator = torch.Generator().manual_seed(0)
    bank, dense_bank, other = (torch.nn.Parameter(torch.zeros(6, 2)) for _ in range(3))
    touched = TouchedRows(6)
    sparse = PCGradAccumulator([bank, other], banks=[bank], touched=touched)
    reference = PCGradAccumulator([dense_bank, other])
    for rows in ([0, 4], [4, 5]):
        touched.mark(torch.tensor(rows))
        grads = []
        for _ in range(2):
            g = torch.zeros(6, 2)
            g[rows] = torch.randn(len(rows), 2, generator=generator)
            grads.append((g, torch.randn(6, 2, generator=generator)))
        for objective, (g_bank, g_other) in enumerate(grads):
            sparse.add(objective, [g_bank, g_other])
            reference.add(objective, [g_bank, g_other])
    sparse_projection, reference_projection = sparse.apply(), reference.apply()
    torch.testing.assert_close(bank.grad, dense_bank.grad)
    assert bank.grad[[1, 2, 3]].abs().sum() == 0
    assert sparse_projection.cosine == pytest.approx(reference_projection.cosine)


def test_lazy_adamw_equals_adamw_on_touched_rows_and_leaves_the_others_alone():
    generator = torch.Generator().manual_seed(1)
    start = torch.randn(5, 3, generator=generator)
    lazy_param, dense_param = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    touched = TouchedRows(5)
    lazy = LazyAdamW([lazy_param], touched=touched, lazy_params=[lazy_param], lr=0.1, weight_decay=0.01)
    dense = torch.optim.AdamW([dense_param], lr=0.1, weight_decay=0.01)
    rows = torch.tensor([1, 3])
    for _ in range(3):
        grad = torch.zeros(5, 3)
        grad[rows] = torch.randn(2, 3, generator=generator)
        lazy_param.grad, dense_param.grad = grad.clone(), grad.clone()
        touched.mark(rows)
        lazy.step()
        dense.step()
        touched.clear()
    torch.testing.assert_close(lazy_param[rows], dense_param[rows])
    torch.testing.assert_close(lazy_param[[0, 2, 4]], start[[0, 2, 4]])
    assert lazy.param_groups[0]["lazy"] is True
