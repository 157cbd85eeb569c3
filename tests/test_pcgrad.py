import pytest
import torch

import pcgrad_collectives
from tki_trainer.gradients import ObjectiveGradients, project


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
    update, projection = project(torch.stack([g1, g2]))
    torch.testing.assert_close(update, yu_et_al(g1, g2))
    assert projection.conflict == conflict
    assert projection.cosine() == pytest.approx(float(torch.cosine_similarity(g1, g2, dim=0)), abs=1e-6)
    if conflict:
        p1 = g1 - torch.dot(g1, g2) / torch.dot(g2, g2) * g2
        assert float(torch.dot(p1, g2)) == pytest.approx(0.0, abs=1e-5)


def yu_et_al_in_order(gradients):
    """PCGrad for several tasks written out: each gradient loses, in turn, its component along every original
    gradient it still conflicts with (in index order)."""
    projected = []
    for i, g in enumerate(gradients):
        p = g.clone()
        for j, other in enumerate(gradients):
            if j != i and torch.dot(p, other) < 0:
                p = p - torch.dot(p, other) / torch.dot(other, other) * other
        projected.append(p)
    return sum(projected)


def test_three_objectives_follow_the_formula_in_index_order():
    g = torch.tensor([[1.0, 0.0, 2.0, 0.0], [-1.0, 1.0, 0.0, 0.5], [0.0, -2.0, -1.0, 1.0]])
    update, projection = project(g)
    torch.testing.assert_close(update, yu_et_al_in_order(g))
    assert not torch.allclose(update, g.sum(0))
    assert projection.conflict
    assert projection.cosine(1, 2) == pytest.approx(float(torch.cosine_similarity(g[1], g[2], dim=0)), abs=1e-6)


def test_a_zero_gradient_projects_nothing():
    g = torch.tensor([[1.0, -1.0], [0.0, 0.0], [2.0, 0.5]])
    update, projection = project(g)
    torch.testing.assert_close(update, g.sum(0))
    assert not projection.conflict and projection.cosine(0, 1) == 0.0


def test_accumulator_sums_micro_batches_then_projects_once_into_grad():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(1))
    accumulator = ObjectiveGradients([a, b])
    pairs = [
        (torch.tensor([1.0, 0.0, 1.0]), torch.tensor([-2.0, 1.0, 0.0])),
        (torch.tensor([0.0, 1.0, 0.5]), torch.tensor([0.0, -1.0, -1.0])),
    ]
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
    sparse = ObjectiveGradients([bank, other])
    reference = ObjectiveGradients([dense_bank, other])
    for rows in ([0, 4], [4, 5]):
        for objective in range(2):
            values = torch.randn(len(rows), 2, generator=generator)
            g_other = torch.randn(6, 2, generator=generator)
            sparse.add(
                objective,
                [torch.sparse_coo_tensor(torch.tensor([rows]), values, (6, 2), check_invariants=True), g_other],
            )
            reference.add(objective, [torch.zeros(6, 2).index_add_(0, torch.tensor(rows), values), g_other])
    sparse_projection, reference_projection = sparse.apply(), reference.apply()
    assert bank.grad.is_sparse and sorted(bank.grad.coalesce().indices()[0].tolist()) == [0, 4, 5]
    torch.testing.assert_close(bank.grad.to_dense(), dense_bank.grad)
    assert sparse_projection.cosine() == pytest.approx(reference_projection.cosine())


def test_one_objective_only_sums_and_keeps_sparse_rows_sparse():
    bank, other = torch.nn.Parameter(torch.zeros(6, 2)), torch.nn.Parameter(torch.zeros(3))
    accumulator = ObjectiveGradients([bank, other], num_objectives=1)
    rows = torch.tensor([[1, 4]])
    values = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.5, 0.5], [1.0, -1.0]])]
    for value, dense in zip(values, (torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, -1.0, 1.0]))):
        accumulator.add(0, [torch.sparse_coo_tensor(rows, value, (6, 2), check_invariants=True), dense], scale=2.0)
    assert accumulator.apply() is None
    assert bank.grad.is_sparse and bank.grad.coalesce().indices()[0].tolist() == [1, 4]
    torch.testing.assert_close(bank.grad.to_dense(), torch.zeros(6, 2).index_add_(0, rows[0], 2 * sum(values)))
    torch.testing.assert_close(other.grad, torch.tensor([2.0, -2.0, 6.0]))


def by_hand(count: int, num_objectives: int) -> tuple[list[torch.Tensor], list[set[int]]]:
    """Per objective, the flat mean over the two ranks of their summed micro-batch gradients; per parameter, the
    bank rows any rank touched."""
    shapes = pcgrad_collectives.shapes(count)
    sums = [[torch.zeros(shape) for shape in shapes] for _ in range(num_objectives)]
    rows: list[set[int]] = [set() for _ in shapes]
    for rank in range(2):
        for micro_batch in range(pcgrad_collectives.MICRO_BATCHES):
            for objective in range(num_objectives):
                for index, grad in enumerate(pcgrad_collectives.gradients(rank, count, micro_batch, objective)):
                    if grad is not None:
                        sums[objective][index] += grad.to_dense() / 2
                        rows[index] |= set(grad.coalesce().indices()[0].tolist()) if grad.is_sparse else set()
    return [torch.cat([g.flatten() for g in objective]) for objective in sums], rows


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))],
)
def test_two_processes_reduce_with_a_constant_number_of_collectives_on_the_parameters_device(tmp_path, device):
    """Two gloo processes: every collective of `apply` gets tensors on the parameters' device, as many for 3
    parameters as for 30, and the result is the (projected) mean of the two ranks' gradients, computed by hand:
    dense, sparse rows (some touched on one rank only, one bank on one rank only), no gradient anywhere."""
    torch.multiprocessing.start_processes(
        pcgrad_collectives.worker,
        args=(2, str(tmp_path / "rendezvous"), device, str(tmp_path)),
        nprocs=2,
        start_method="fork" if device == "cpu" else "spawn",
    )
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    small, large = pcgrad_collectives.SIZES
    for num_objectives in (1, 2, 3):
        counts = {len(r[count, num_objectives]["calls"]) for r in results for count in (small, large)}
        assert counts == {2}
    for (count, num_objectives), result in [item for r in results for item in r.items()]:
        assert all(devices == [device] for _, devices in result["calls"])
        flat, rows = by_hand(count, num_objectives)
        expected = yu_et_al_in_order(flat) if num_objectives > 1 else flat[0]
        shapes = pcgrad_collectives.shapes(count)
        grads = result["grads"]
        got = torch.cat([(torch.zeros(s) if g is None else g.to_dense()).flatten() for g, s in zip(grads, shapes)])
        torch.testing.assert_close(got, expected)
        assert [g is None for g in grads] == [i == large - 1 for i in range(count)]
        for index, (grad, touched) in enumerate(zip(grads, rows)):
            if grad is not None:
                assert grad.is_sparse == pcgrad_collectives.is_bank(index)
                assert not grad.is_sparse or grad.coalesce().indices()[0].tolist() == sorted(touched)
        if num_objectives > 1:
            assert result["cosine"] == pytest.approx(float(torch.cosine_similarity(flat[0], flat[1], dim=0)), abs=1e-6)
