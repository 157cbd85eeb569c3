import pytest
import torch

from tki_trainer.optim import LazyAdamW, clip_grad_norm


SETTINGS = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def sparse_rows(rows: list[int], values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.tensor([rows]), values, shape, check_invariants=True)


def test_lazy_adamw_equals_adamw_on_retrieved_rows_and_leaves_the_others_alone():
    generator = torch.Generator().manual_seed(1)
    start = torch.randn(5, 3, generator=generator)
    lazy_param, dense_param = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    lazy = LazyAdamW([lazy_param], **SETTINGS)
    dense = torch.optim.AdamW([dense_param], **SETTINGS)
    rows = [1, 3]
    for _ in range(3):
        values = torch.randn(2, 3, generator=generator)
        lazy_param.grad = sparse_rows(rows, values, (5, 3))
        dense_param.grad = torch.zeros(5, 3).index_add_(0, torch.tensor(rows), values)
        lazy.step()
        dense.step()
    torch.testing.assert_close(lazy_param[rows], dense_param[rows])
    torch.testing.assert_close(lazy_param[[0, 2, 4]], start[[0, 2, 4]])


def test_each_row_follows_adamw_over_its_own_gradients_whenever_it_is_first_retrieved():
    """Row 0 has a gradient at every step, row 2 from step 50 on, row 1 never: each row moves as a one-row AdamW
    fed that row's gradients only, so row 2's first update is a fresh row's first update."""
    generator = torch.Generator().manual_seed(2)
    start = torch.randn(3, 4, generator=generator)
    bank = torch.nn.Parameter(start.clone())
    optimizer = LazyAdamW([bank], **SETTINGS)
    references = {row: torch.nn.Parameter(start[row : row + 1].clone()) for row in (0, 2)}
    reference_optimizers = {row: torch.optim.AdamW([p], **SETTINGS) for row, p in references.items()}
    for step in range(1, 61):
        rows = [0, 2] if step >= 50 else [0]
        values = torch.randn(len(rows), 4, generator=generator)
        bank.grad = sparse_rows(rows, values, (3, 4))
        before = bank[2].detach().clone()
        optimizer.step()
        for row, value in zip(rows, values):
            references[row].grad = value.unsqueeze(0)
            reference_optimizers[row].step()
        if step == 50:
            fresh = torch.nn.Parameter(before.unsqueeze(0))
            fresh.grad = values[1:]
            torch.optim.AdamW([fresh], **SETTINGS).step()
            torch.testing.assert_close(bank[2] - before, (fresh[0] - before).detach(), rtol=1e-6, atol=0)
    for row, reference in references.items():
        torch.testing.assert_close(bank[row], reference[0], rtol=1e-6, atol=0)
    assert torch.equal(bank[1], start[1])
    assert optimizer.state[bank]["step"].tolist() == [60, 0, 11]


def test_dense_parameters_get_torchs_adamw_step_exactly():
    generator = torch.Generator().manual_seed(3)
    start = torch.randn(4, 2, generator=generator)
    dense, reference, bank = (
        torch.nn.Parameter(start.clone()),
        torch.nn.Parameter(start.clone()),
        torch.nn.Parameter(torch.zeros(6, 2)),
    )
    optimizer = LazyAdamW([dense, bank], **SETTINGS)
    reference_optimizer = torch.optim.AdamW([reference], **SETTINGS)
    for _ in range(5):
        grad = torch.randn(4, 2, generator=generator)
        dense.grad, reference.grad = grad.clone(), grad.clone()
        bank.grad = sparse_rows([1], torch.randn(1, 2, generator=generator), (6, 2))
        optimizer.step()
        reference_optimizer.step()
    assert torch.equal(dense, reference)


@pytest.mark.parametrize("fused", [False, True])
def test_a_checkpointed_optimizer_resumes_with_its_row_counts(tmp_path, fused):
    """The Trainer saves and loads the optimizer's state (``fused=True`` for ``adamw_torch_fused``)."""
    generator = torch.Generator().manual_seed(4)
    start = torch.randn(4, 2, generator=generator)
    straight, resumed = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    gradients = [(rows, torch.randn(len(rows), 2, generator=generator)) for rows in ([0], [0, 3], [3], [1, 3])]
    optimizer = LazyAdamW([straight], fused=fused, **SETTINGS)
    for step, (rows, values) in enumerate(gradients):
        straight.grad = sparse_rows(rows, values, (4, 2))
        optimizer.step()
        if step == 1:
            torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
            resumed.data.copy_(straight.detach())
    optimizer = LazyAdamW([resumed], fused=fused, **SETTINGS)
    optimizer.load_state_dict(torch.load(tmp_path / "optimizer.pt"))
    for rows, values in gradients[2:]:
        resumed.grad = sparse_rows(rows, values, (4, 2))
        optimizer.step()
    assert torch.equal(resumed, straight)
    assert optimizer.state[resumed]["step"].tolist() == [2, 1, 0, 3]


@pytest.mark.parametrize("option", ["amsgrad", "maximize", "capturable", "differentiable"])
def test_options_the_lazy_update_cannot_honour_are_refused_at_construction(option):
    with pytest.raises(ValueError, match=f"{option}=True .* pass {option}=False"):
        LazyAdamW([torch.nn.Parameter(torch.zeros(2))], **{option: True})
    with pytest.raises(ValueError, match=f"{option}=True"):
        LazyAdamW([{"params": [torch.nn.Parameter(torch.zeros(2))], option: True}])


def test_clipping_counts_sparse_gradients_like_dense_ones():
    a, b = torch.nn.Parameter(torch.zeros(4, 2)), torch.nn.Parameter(torch.zeros(3))
    values = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    a.grad = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), values, (4, 2), check_invariants=True)
    b.grad = torch.tensor([0.0, 12.0, 0.0])
    total = clip_grad_norm([a, b], max_norm=1.3)
    assert float(total) == pytest.approx(13.0)
    dense = torch.cat([a.grad.to_dense().flatten(), b.grad])
    assert float(dense.norm()) == pytest.approx(1.3, rel=1e-4)
