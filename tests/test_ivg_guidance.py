"""Instruction-vector guidance as a TKITrainer objective: switched off it is TKI, its KL term and gradient equal a
hand computation, the progressive intervention adds the scaled vector at each row's last prompt token."""

import json

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from conftest import tiny_llama, tiny_tokenizer, tki_config
from test_ivg import task_rows
from test_trainer import common, losses, rows, shared_lora
from tki_trainer import TKIConfig, TKITrainer
from tki_trainer.ivg import InstructionVector, IVConfig, extract_instruction_vector, intervene
from tki_trainer.ivg.guidance import InstructionVectorGuidance, last_prompt_positions
from tki_trainer.objective import MicroBatch
from tki_trainer.tuner import bypass_bank


LAYER = 0


def saved_vector(tmp_path, scale=3.0):
    vector = torch.randn(1, 32, generator=torch.Generator().manual_seed(11)) * scale
    InstructionVector(vector, ["task"], LAYER, [(0, 0), (1, 1)]).save(tmp_path / "iv")
    return str(tmp_path / "iv")


def trainer_with(tmp_path, name, lta=True, **settings):
    """A TKI trainer; ``lta=False`` trains a plain LoRA, whose forwards need no routing."""
    args = TKIConfig(**{**common(tmp_path, name, max_steps=3), "kr": False, "lta": lta, **settings})
    peft_config = tki_config() if lta else shared_lora()
    return TKITrainer(
        tiny_llama(), args=args, train_dataset=rows(), processing_class=tiny_tokenizer(), peft_config=peft_config
    )


def guidance(trainer):
    return next(o for o in trainer.objectives if isinstance(o, InstructionVectorGuidance))


def test_at_scale_zero_and_kl_weight_zero_it_trains_loss_for_loss_like_tki(tmp_path):
    plain = trainer_with(tmp_path, "plain")
    plain.train()
    silent = trainer_with(
        tmp_path,
        "silent",
        ivg_vector=saved_vector(tmp_path),
        ivg_scale_start=0.0,
        ivg_scale_end=0.0,
        ivg_kl_weight=0.0,
    )
    silent.train()
    assert guidance(silent).scale() == 0.0, "the guidance is built, and silent"
    assert all(entry["ivg_scale"] == 0.0 for entry in silent.state.log_history if "loss" in entry)
    assert losses(silent) == pytest.approx(losses(plain), rel=1e-6)
    for (name, a), b in zip(plain.model.named_parameters(), silent.model.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, msg=name)


def test_the_scale_falls_linearly_from_start_to_end_over_training(tmp_path):
    trainer = trainer_with(tmp_path, "scale", ivg_vector=saved_vector(tmp_path), ivg_kl_weight=0.0)
    trainer.train()
    scales = [entry["ivg_scale"] for entry in trainer.state.log_history if "ivg_scale" in entry]
    assert scales == pytest.approx([1.0, 0.5, 0.0])


def test_progressive_intervention_adds_the_scaled_vector_at_the_last_prompt_token(tmp_path):
    trainer = trainer_with(tmp_path, "added", lta=False, ivg_vector=saved_vector(tmp_path), ivg_kl_weight=0.0)
    objective = guidance(trainer)
    batch = next(iter(trainer.get_train_dataloader()))
    labels = batch["labels"]
    expected = torch.tensor([int((row != -100).int().argmax()) - 1 for row in labels])
    assert torch.equal(last_prompt_positions(labels), expected)
    model = trainer.model
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad(), model.disable_adapter():
        with objective.around_step(model, batch):
            guided = model(**inputs).logits
        with intervene(model, objective.vector, LAYER, scale=objective.scale(), positions=expected):
            by_hand = model(**inputs).logits
        plain = model(**inputs).logits
    torch.testing.assert_close(guided, by_hand)
    assert not torch.allclose(guided, plain)


def test_the_kl_term_and_its_gradient_equal_a_hand_computation(tmp_path):
    """Reference: the model before training (adapters off) with the whole vector added; model: the trained model
    without it; KL(reference || model) at temperature T, at the first answer position plus averaged over the
    answer positions, each hinged, averaged over rows."""
    temperature, hinge = 2.0, 0.0025  # between the rows' terms: one row hinged away, the other counted
    trainer = trainer_with(
        tmp_path, "kl", lta=False, pcgrad=False, ivg_vector=saved_vector(tmp_path), ivg_kl_weight=1.0,
        ivg_kl_temperature=temperature,
        ivg_kl_hinge=hinge, ivg_kl_positions="both",
    )  # fmt: skip
    objective = guidance(trainer)
    model = trainer.model
    with torch.no_grad():  # move the adapter away from the identity so that the gradient is not zero
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    batch = next(iter(trainer.get_train_dataloader()))
    labels = batch["labels"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    positions = last_prompt_positions(labels)
    with torch.no_grad(), model.disable_adapter(), intervene(model, objective.vector, LAYER, positions=positions):
        reference = F.log_softmax(model(**inputs).logits / temperature, dim=-1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log_probs = F.log_softmax(model(**inputs).logits / temperature, dim=-1)
    per_token = (reference.exp() * (reference - log_probs)).sum(-1)
    terms = []
    for row in range(len(labels)):
        answer = [t - 1 for t in range(1, labels.shape[1]) if labels[row, t] != -100]
        first, mean = per_token[row, answer[0]], per_token[row, answer].mean()
        terms.append((first - hinge).clamp(min=0) + (mean - hinge).clamp(min=0))
    expected = torch.stack(terms).mean()
    assert 0 < float(expected.detach()) < float(torch.stack(terms).max().detach()), "one row counted, one hinged away"
    expected_grads = torch.autograd.grad(expected, trainable, allow_unused=True)

    model.zero_grad(set_to_none=True)
    model.train()
    # two micro-batches per step, no token count: the Trainer halves what compute_loss returns, and the term's
    # backward is a per-micro-batch mean's, halved too
    trainer.current_gradient_accumulation_steps = 2
    with trainer.gradients.step(model), objective.around_step(model, batch):
        value = objective.loss(MicroBatch(model, dict(batch), None, None, None), trainer.gradients)
    assert float(value) * trainer.gradients.scale(None) == pytest.approx(float(expected.detach()) / 2, rel=1e-5)
    expected_grads = [None if grad is None else grad / 2 for grad in expected_grads]
    for parameter, grad in zip(trainable, expected_grads):
        got = None if parameter.grad is None else parameter.grad.to_dense()
        if grad is None or not grad.abs().sum():
            assert got is None or not got.abs().sum()
        else:
            torch.testing.assert_close(got, grad, rtol=1e-4, atol=1e-7)


def test_the_card_says_which_vector_guided_training(tmp_path):
    trainer = trainer_with(tmp_path, "card", ivg_vector=saved_vector(tmp_path))
    trainer.create_model_card()
    text = (tmp_path / "card" / "README.md").read_text()
    assert "Instruction-vector guidance: the vector of task (layer 0, 2 heads)" in text
    assert "Refine Large Language Model Fine-tuning via Instruction Vector" in text


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(ivg_vector="missing-dir"), "holds no instruction vector"),
        (dict(ivg_task="other"), "No instruction vector for task 'other'"),
        (dict(ivg_kl_positions="middle"), "ivg_kl_positions"),
        (dict(ivg_kl_weight=-1.0), "ivg_kl_weight"),
        (dict(completion_only_loss=False), "last prompt token"),
        (dict(kr=True, prior_inputs_mode="on_the_fly"), "prior_inputs_mode='store' with ivg_vector"),
        (dict(ivg_tasks="tasks.jsonl"), "not both"),
        (dict(ivg_vector=None, ivg_tasks="missing.jsonl"), "saved dataset folder"),
        (dict(ivg_vector=None, ivg_tasks="x.jsonl", ivg_extraction='{"shots": 0}'), "shots=0"),
    ],
)
def test_bad_guidance_settings_are_refused_before_training(tmp_path, settings, message):
    values = {"ivg_vector": saved_vector(tmp_path), **settings}
    with pytest.raises(ValueError, match=message):
        trainer_with(tmp_path, "bad", **values)


def test_without_an_adapter_the_kl_term_is_refused_before_training(tmp_path):
    args = TKIConfig(**common(tmp_path, "full"), lta=False, kr=False, ivg_vector=saved_vector(tmp_path))
    with pytest.raises(ValueError, match="needs an adapter to switch off"):
        TKITrainer(tiny_llama(), args=args, train_dataset=rows(), processing_class=tiny_tokenizer())


def test_rows_that_train_on_their_prompt_are_refused_at_the_first_step(tmp_path):
    """Text rows carry no prompt to mask: the vector would have no last prompt token to go to."""
    text = rows().map(lambda row: {"text": row["prompt"] + row["completion"]}, remove_columns=["prompt", "completion"])
    args = TKIConfig(**common(tmp_path, "text"), lta=False, kr=False, ivg_vector=saved_vector(tmp_path))
    trainer = TKITrainer(
        tiny_llama(), args=args, train_dataset=text, processing_class=tiny_tokenizer(), peft_config=shared_lora()
    )
    with pytest.raises(ValueError, match="some rows train on their first token"):
        trainer.train()


def test_training_with_activation_checkpointing_equals_training_without(tmp_path):
    """The backward recomputes layers under checkpointing; the vector, added to a layer's output, reaches the next
    layers through the inputs checkpointing saved, so both the guided forward and the KL term's unguided one train
    as without checkpointing, step for step."""
    vector = saved_vector(tmp_path)
    runs = {}
    for checkpointing in (False, True):
        trainer = trainer_with(
            tmp_path, f"ckpt_{checkpointing}", lta=False, ivg_vector=vector, ivg_kl_weight=1.0, ivg_kl_hinge=0.0,
            ivg_scale_end=1.0, activation_checkpointing=checkpointing,
        )  # fmt: skip
        trainer.train()
        runs[checkpointing] = trainer
    assert losses(runs[True]) == pytest.approx(losses(runs[False]), rel=1e-5)
    for a, b in zip(runs[False].model.parameters(), runs[True].model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_vector_extracted_from_tasks_at_construction_equals_the_one_extracted_directly(tmp_path):
    """``ivg_tasks``: extracted from the model before training (adapters off), with ``ivg_extraction``'s settings,
    cached under the run's directory, and the mean of the tasks' vectors guides training."""
    data = tmp_path / "tasks.jsonl"
    Dataset.from_list(task_rows()).to_json(data)
    settings = dict(
        shots=2, activation_prompts=4, effect_prompts=2, correct_top_k=None, top_heads=3, heads_per_batch=3
    )
    trainer = trainer_with(tmp_path, "extracted", lta=False, ivg_tasks=str(data), ivg_extraction=json.dumps(settings))
    direct = extract_instruction_vector(tiny_llama(), tiny_tokenizer(), task_rows(), IVConfig(**settings))
    objective = guidance(trainer)
    assert objective.instruction_vector.tasks == direct.tasks
    assert objective.instruction_vector.heads == direct.heads
    torch.testing.assert_close(objective.instruction_vector.vectors, direct.vectors)
    torch.testing.assert_close(objective.vector, direct.vectors.mean(0))
    trainer.create_model_card()
    assert (
        "the mean vector of upper, echo, extracted from `tasks.jsonl`"
        in (tmp_path / "extracted" / "README.md").read_text()
    )


def test_a_model_arriving_with_a_latent_bank_extracts_its_vector_past_the_bank(tmp_path):
    """The next stage of continual training: the model holds the previous stage's trained bank, and the in-context
    prompts of extraction have no query, so the vector is extracted with the bank bypassed (the shared LoRA and
    the previous stage's weights apply), as flashbacks without queries are."""
    data = tmp_path / "tasks.jsonl"
    Dataset.from_list(task_rows()).to_json(data)
    settings = dict(
        shots=2, activation_prompts=4, effect_prompts=2, correct_top_k=None, top_heads=3, heads_per_batch=3
    )
    previous = trainer_with(tmp_path, "stage1")
    previous.train()
    model = previous.model
    with bypass_bank(model):
        direct = extract_instruction_vector(model, tiny_tokenizer(), task_rows(), IVConfig(**settings))
    args = TKIConfig(**{**common(tmp_path, "stage2", max_steps=1), "kr": False, "lta": True,
                        "ivg_tasks": str(data), "ivg_extraction": json.dumps(settings)})  # fmt: skip
    trainer = TKITrainer(model, args=args, train_dataset=rows(), processing_class=tiny_tokenizer())
    torch.testing.assert_close(guidance(trainer).instruction_vector.vectors, direct.vectors)
    trainer.train()
