"""The gradient engine's one mirror of `Trainer.training_step`: the factor it scales ``compute_loss``'s result by."""

import inspect

import pytest
from transformers import Trainer

from conftest import tiny_llama, tiny_tokenizer
from test_trainer import common, rows, shared_lora
from tki_trainer import TKIConfig, TKITrainer


MIRRORED = (
    "self.loss_is_scaled_for_ga",
    "self.model_accepts_loss_kwargs and num_items_in_batch is not None",
    "self.compute_loss_func is not None",
    "loss = loss / self.current_gradient_accumulation_steps",
    "self.accelerator.backward(loss, **kwargs)",
)


def test_the_statements_the_engine_mirrors_are_in_the_installed_training_step():
    """Fails when transformers reshapes its step: `GradientEngine.scale` must then be read against it again."""
    source = inspect.getsource(Trainer.training_step)
    assert [line for line in MIRRORED if line not in source] == []


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("with_count", [True, False])
def test_the_engine_scales_as_the_trainer_scales_its_backward(tmp_path, accumulation, with_count):
    """The Trainer's step returns ``compute_loss``'s result times its factor: the engine's factor is that ratio."""
    args = TKIConfig(
        **common(tmp_path, "run", gradient_accumulation_steps=accumulation), lta=False, kr=False, pcgrad=False
    )
    trainer = TKITrainer(
        tiny_llama(), args=args, train_dataset=rows(), processing_class=tiny_tokenizer(), peft_config=shared_lora()
    )
    trainer.current_gradient_accumulation_steps = accumulation  # set by the Trainer's loop for each step
    inputs = next(iter(trainer.get_train_dataloader()))
    count = (inputs["labels"] != -100).sum() if with_count else None
    stepped = trainer.training_step(trainer.model, dict(inputs), count)
    loss = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=count)
    assert float(stepped) == pytest.approx(float(loss.detach()) * trainer.gradients.scale(count), rel=1e-5)
