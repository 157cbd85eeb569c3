import pytest
import torch

from tki_trainer.optim import LazyAdamW, clip_grad_norm
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


def test_sparse_bank_gradients_accumulate_like_dense_ones():
    """A bank whose gradients are row-sparse gives the dense computation's update, itself row-sparse."""
    generator = torch.Generator().manual_seed(0)
    bank, dense_bank, other = (torch.nn.Parameter(torch.zeros(6, 2)) for _ in range(3))
    sparse = PCGradAccumulator([bank, other])
    reference = PCGradAccumulator([dense_bank, other])
    for rows in ([0, 4], [4, 5]):
        for objective in range(2):
            values = torch.randn(len(rows), 2, generator=generator)
            g_other = torch.randn(6, 2, generator=generator)
            sparse.add(objective, [torch.sparse_coo_tensor(torch.tensor([rows]), values, (6, 2), check_invariants=True), g_other])
            reference.add(objective, [torch.zeros(6, 2).index_add_(0, torch.tensor(rows), values), g_other])
    sparse_projection, reference_projection = sparse.apply(), reference.apply()
    assert bank.grad.is_sparse and sorted(bank.grad.coalesce().indices()[0].tolist()) == [0, 4, 5]
    torch.testing.assert_close(bank.grad.to_dense(), dense_bank.grad)
    assert sparse_projection.cosine == pytest.approx(reference_projection.cosine)


def test_lazy_adamw_equals_adamw_on_retrieved_rows_and_leaves_the_others_alone():
    generator = torch.Generator().manual_seed(1)
    start = torch.randn(5, 3, generator=generator)
    lazy_param, dense_param = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    lazy = LazyAdamW([lazy_param], lr=0.1, weight_decay=0.01)
    dense = torch.optim.AdamW([dense_param], lr=0.1, weight_decay=0.01)
    rows = torch.tensor([1, 3])
    for _ in range(3):
        values = torch.randn(2, 3, generator=generator)
        lazy_param.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values, (5, 3), check_invariants=True)
        dense_param.grad = torch.zeros(5, 3).index_add_(0, rows, values)
        lazy.step()
        dense.step()
    torch.testing.assert_close(lazy_param[rows], dense_param[rows])
    torch.testing.assert_close(lazy_param[[0, 2, 4]], start[[0, 2, 4]])


def test_clipping_counts_sparse_gradients_like_dense_ones():
    a, b = torch.nn.Parameter(torch.zeros(4, 2)), torch.nn.Parameter(torch.zeros(3))
    values = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    a.grad = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), values, (4, 2), check_invariants=True)
    b.grad = torch.tensor([0.0, 12.0, 0.0])
    total = clip_grad_norm([a, b], max_norm=1.3)
    assert float(total) == pytest.approx(13.0)
    dense = torch.cat([a.grad.to_dense().flatten(), b.grad])
    assert float(dense.norm()) == pytest.approx(1.3, rel=1e-4)
