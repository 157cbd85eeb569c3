"""Per-example gradient capture against a second backward over the chosen examples only."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import tiny_llama, tki_config, trained_like
from tki_trainer import route
from tki_trainer.gradients import GradientCapture


def losses(model, ids, queries):
    with route(model, queries) if queries is not None else torch.enable_grad():
        logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(dim=1)


@pytest.mark.parametrize("adapter", ["tki", "lora"])
def test_one_backward_gives_the_whole_batch_and_a_weighted_subset(adapter, queries):
    torch.manual_seed(0)
    if adapter == "tki":
        model, batch_queries = trained_like(get_peft_model(tiny_llama(), tki_config())), queries
    else:
        model, batch_queries = (
            get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)),
            None,
        )
    parameters = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(3, 300, (3, 9), generator=torch.Generator().manual_seed(2))
    weights = torch.tensor([1.0, 0.0, 0.5])

    capture = GradientCapture(model, parameters)
    assert capture.supported
    with capture.recording():
        per_example = losses(model, ids, batch_queries)
    assert capture.complete
    capture.weights = weights
    per_example.sum().backward()
    whole = [p.grad.to_dense().clone() for p in parameters]
    subset = [g.to_dense() if g is not None else None for g in capture.take()]

    model.zero_grad(set_to_none=True)
    (losses(model, ids, batch_queries) * weights).sum().backward()
    reference = [p.grad.to_dense() for p in parameters]
    model.zero_grad(set_to_none=True)
    losses(model, ids, batch_queries).sum().backward()

    for got, want, total, p in zip(subset, reference, whole, parameters):
        torch.testing.assert_close(got if got is not None else torch.zeros_like(want), want, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(total, p.grad.to_dense())
    assert any(want.abs().sum() > 0 for want in reference)


def test_parameters_the_capture_cannot_see_make_it_unsupported():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    assert not GradientCapture(model, [p for p in model.parameters() if p.requires_grad]).supported
