import json
import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model

from conftest import KEY_DIM, tiny_llama, tiny_tokenizer, tki_config, trained_like
from test_trainer import common, losses, noisy_store, rows
from tki_trainer import TKIConfig, TKITrainer
from tki_trainer.flashback import DIVERGENCES, FlashbackObjective, Flashbacks, load_flashback_rows, token_divergence
from tki_trainer.flashback import prompts as flashback_prompts


FLASHBACKS = ["Paris is", "The island", "Answer: yes", "Is the capital", "The land of"]


def flashback_rows(with_queries=True):
    generator = torch.Generator().manual_seed(11)
    data = [{"prompt": p} for p in FLASHBACKS]
    if with_queries:
        for row in data:
            row["query_embedding"] = torch.randn(KEY_DIM, generator=generator).tolist()
    return Dataset.from_list(data)


def flashback_trainer(tmp_path, name, model=None, flashbacks=None, peft_config=None, train=None, **overrides):
    settings = {**common(tmp_path, name), "kr": False, "pcgrad": False, "flashbacks_per_step": 2, **overrides}
    return TKITrainer(
        model if model is not None else tiny_llama(),
        args=TKIConfig(**settings),
        train_dataset=rows() if train is None else train,
        processing_class=tiny_tokenizer(),
        peft_config=peft_config if peft_config is not None or model is not None else tki_config(),
        flashback_dataset=flashback_rows() if flashbacks is None else flashbacks,
    )


def test_divergences_follow_their_formulas():
    generator = torch.Generator().manual_seed(0)
    model, reference = (torch.randn(3, 7, generator=generator).log_softmax(-1) for _ in range(2))
    p, r = model.exp(), reference.exp()
    kl = (r * (reference - model)).sum(-1)
    reverse = (p * (model - reference)).sum(-1)
    m = (p + r) / 2
    js = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (r * (r / m).log()).sum(-1)
    torch.testing.assert_close(token_divergence(model, reference, "symmetric_kl"), kl + reverse)
    torch.testing.assert_close(token_divergence(model, reference, "kl"), kl)
    torch.testing.assert_close(token_divergence(model, reference, "reverse_kl"), reverse)
    torch.testing.assert_close(token_divergence(model, reference, "js"), js)
    assert bool((js <= math.log(2)).all()) and not torch.allclose(kl, reverse)
    assert all(float(token_divergence(model, model, kind).abs().max()) < 1e-6 for kind in ("symmetric_kl", "kl"))


def test_draws_are_disjoint_across_processes_cover_the_set_and_replay_after_resume():
    flashbacks = Flashbacks([[5]] * 6, pad_token_id=0, per_step=2, seed=3)
    first_epoch = [r for draw in range(3) for r in flashbacks.rows(draw)]
    assert sorted(first_epoch) == list(range(6))
    two_ranks = [flashbacks.rows(0, rank, 2) for rank in range(2)]
    assert not set(two_ranks[0]) & set(two_ranks[1])
    assert flashbacks.rows(7) == Flashbacks([[5]] * 6, pad_token_id=0, per_step=2, seed=3).rows(7)


def test_with_flashback_weight_zero_training_equals_tki_loss_for_loss(tmp_path):
    store = noisy_store(tmp_path, scale=0.5)
    settings = dict(kr=True, pcgrad=True, prior_inputs_dir=str(store.path), prior_inputs_learning_rate=0.0)
    plain = TKITrainer(
        tiny_llama(),
        args=TKIConfig(**common(tmp_path, "tki"), **settings),
        train_dataset=rows(),
        processing_class=tiny_tokenizer(),
        peft_config=tki_config(lora_dropout=0.3),
    )
    plain.train()
    silent = flashback_trainer(
        tmp_path, "silent", flashback_weight=0.0, peft_config=tki_config(lora_dropout=0.3), **settings
    )
    silent.train()
    assert losses(silent) == pytest.approx(losses(plain), rel=1e-6)
    assert all(entry["loss_flashback"] > 0 for entry in silent.state.log_history[1:] if "loss_flashback" in entry)


@pytest.mark.parametrize("arrives_as", ["base model", "trained adapter"])
def test_the_divergence_is_zero_at_the_first_step_and_grows_as_the_model_moves(tmp_path, arrives_as):
    model = None
    if arrives_as == "trained adapter":
        model = trained_like(get_peft_model(tiny_llama(), tki_config()))
    trainer = flashback_trainer(tmp_path, arrives_as.replace(" ", "_"), model=model, learning_rate=5e-2)
    trainer.train()
    divergences = [entry["loss_flashback"] for entry in trainer.state.log_history if "loss_flashback" in entry]
    assert divergences[0] == pytest.approx(0.0, abs=1e-6)
    assert divergences[-1] > 1e-4


def test_an_adapter_that_does_not_start_as_the_identity_is_its_own_reference(tmp_path):
    """``init_lora_weights=False`` starts LoRA's B non-zero: switching the adapter off would not give the model
    before training, so the reference is the adapter as initialised."""
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    trainer = flashback_trainer(tmp_path, "random_init", peft_config=lora, lta=False)
    assert flashback_objective(trainer).reference.copies_weights
    assert flashback_value(trainer) == pytest.approx(0.0, abs=1e-6)


def test_the_divergence_is_a_mean_per_flashback_whatever_the_padding(tmp_path, monkeypatch):
    """Two flashbacks of different lengths in one right-padded micro-batch give the mean of each one alone: padded
    positions count for nothing, and a long flashback weighs as much as a short one (so a step's objective does not
    depend on how its flashbacks are split over micro-batches and processes)."""
    trainer = flashback_trainer(tmp_path, "padding", flashback_routing=False)
    perturbed(trainer)
    lengths = [len(ids) for ids in flashback_objective(trainer).flashbacks.token_ids]
    short, long = lengths.index(min(lengths)), lengths.index(max(lengths))
    assert lengths[short] < lengths[long]

    def divergence_of(chosen):
        monkeypatch.setattr(
            flashback_objective(trainer).flashbacks,
            "draw",
            lambda *_: flashback_objective(trainer).flashbacks.batch(chosen),
        )
        return flashback_value(trainer)

    alone = [divergence_of([row]) for row in (short, long)]
    assert alone[0] != pytest.approx(alone[1], rel=1e-2)
    assert divergence_of([short, long]) == pytest.approx(sum(alone) / 2, rel=1e-5)


def test_a_resumed_run_draws_the_flashbacks_the_interrupted_one_would_have(tmp_path):
    """8 rows at micro-batch 3 make an epoch of 3 micro-batches, so with 2 accumulation steps its last optimizer
    step has one micro-batch: draws numbered by micro-batch since the start would shift after a resume."""

    def trainer():
        run = flashback_trainer(
            tmp_path, "run", max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=3,
            gradient_accumulation_steps=2, learning_rate=1e-3,
        )  # fmt: skip
        drawn, draw = [], flashback_objective(run).flashbacks.draw

        def recording(*args):
            batch = draw(*args)
            drawn.append((run.state.global_step, batch.input_ids.tolist()))
            return batch

        flashback_objective(run).flashbacks.draw = recording
        return run, drawn

    straight, straight_draws = trainer()
    straight.train()
    expected = {n: p.detach().clone() for n, p in straight.model.named_parameters() if p.requires_grad}
    resumed, resumed_draws = trainer()
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert [step for step, _ in straight_draws] == [0, 0, 1, 2, 2, 3]
    assert resumed_draws == straight_draws[3:]
    for name, parameter in resumed.model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.detach(), expected[name])


def adapter_after_training(tmp_path, name, flashbacks, pcgrad):
    """An adapter that arrives trained (so the shared LoRA and the bank are not zero) after three steps."""
    model = trained_like(get_peft_model(tiny_llama(), tki_config()))
    if flashbacks:
        trainer = flashback_trainer(tmp_path, name, model=model, pcgrad=pcgrad, learning_rate=5e-2)
    else:
        trainer = TKITrainer(
            model,
            args=TKIConfig(**common(tmp_path, name, learning_rate=5e-2), kr=False, pcgrad=pcgrad),
            train_dataset=rows(),
            processing_class=tiny_tokenizer(),
        )
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}, trainer


def test_the_flashback_gradient_reaches_the_update_with_and_without_pcgrad(tmp_path):
    """From the second step the model differs from the reference, so flashbacks change the update; with PCGrad
    over (SFT, flashback) the update is their plain sum wherever the two never conflicted."""
    plain, _ = adapter_after_training(tmp_path, "plain", flashbacks=False, pcgrad=False)
    summed, _ = adapter_after_training(tmp_path, "summed", flashbacks=True, pcgrad=False)
    projected, trainer = adapter_after_training(tmp_path, "projected", flashbacks=True, pcgrad=True)
    assert any(not torch.allclose(summed[n], plain[n]) for n in plain)
    assert any(not torch.allclose(projected[n], plain[n]) for n in plain)
    logs = [entry for entry in trainer.state.log_history if "pcgrad_cosine_flashback" in entry]
    assert len(logs) == 3 and all(-1 <= entry["pcgrad_cosine_flashback"] <= 1 for entry in logs)
    if all(entry["pcgrad_conflict_rate"] == 0 for entry in logs):
        for name in plain:
            torch.testing.assert_close(projected[name], summed[name], atol=1e-6, rtol=1e-5)
    else:
        assert any(not torch.allclose(projected[n], summed[n]) for n in plain)


def perturbed(trainer, seed=5, scale=0.2):
    """Move every adapter weight away from the reference, so that the divergence and its gradient are not zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * scale)


def flashback_objective(trainer):
    return next(o for o in trainer.objectives if isinstance(o, FlashbackObjective))


def flashback_value(trainer, draw=0):
    trainer.model.zero_grad(set_to_none=True)
    return float(flashback_objective(trainer).step_on_draw(trainer.model, trainer.gradients, draw))


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_the_divergence_gradient_matches_finite_differences(tmp_path, kind):
    trainer = flashback_trainer(tmp_path, kind, model=None, flashback_divergence=kind)
    trainer.model.double()
    trainer.model.train()
    perturbed(trainer)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    flashback_value(trainer)
    analytic = [p.grad.to_dense() if p.grad.is_sparse else p.grad for p in trainable]
    generator = torch.Generator().manual_seed(9)
    direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in trainable]
    step = 5e-4  # central differences in float64; routing weights stay float32, which limits smaller steps
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, v in zip(trainable, direction):
                p.add_(sign * step * v)
        values.append(flashback_value(trainer))
        with torch.no_grad():
            for p, v in zip(trainable, direction):
                p.sub_(sign * step * v)
    numeric = (values[0] - values[1]) / (2 * step)
    expected = sum(float((g * v).sum()) for g, v in zip(analytic, direction))
    assert abs(expected) > 1e-5
    assert numeric == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("routing", [True, False])
def test_flashbacks_train_the_latent_tasks_they_retrieve_only_when_routed(tmp_path, routing):
    trainer = flashback_trainer(tmp_path, f"routing_{routing}", flashback_routing=routing)
    perturbed(trainer)
    flashback_value(trainer)
    banks = [p for n, p in trainer.model.named_parameters() if "tki_latent" in n]
    shared = [p for n, p in trainer.model.named_parameters() if "tki_lora" in n]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in shared)
    if not routing:
        assert all(p.grad is None for p in banks)
        return
    batch = flashback_objective(trainer).flashbacks.draw(0, 0, 1, "cpu")
    from tki_trainer.tuner.model import find_tuner

    tuner = find_tuner(trainer.model)
    indices, _ = tuner.router.retrieve("default", batch.query_embeddings, batch.group_ids)
    for bank in banks:
        assert sorted(bank.grad.coalesce().indices()[0].unique().tolist()) == sorted(indices.unique().tolist())


def test_a_flashback_micro_batch_costs_one_forward_and_one_no_grad_reference_forward(tmp_path):
    calls = {}
    for name, flashbacks in (("without", None), ("with", flashback_rows())):
        if flashbacks is None:
            trainer = TKITrainer(
                tiny_llama(),
                args=TKIConfig(**common(tmp_path, name, max_steps=2), kr=False, pcgrad=False),
                train_dataset=rows(),
                processing_class=tiny_tokenizer(),
                peft_config=tki_config(),
            )
        else:
            trainer = flashback_trainer(tmp_path, name, max_steps=2)
        calls[name] = forwards = []
        decoder = trainer.model.get_base_model().model
        decoder.register_forward_hook(lambda *_, seen=forwards: seen.append(torch.is_grad_enabled()))
        trainer.train()
    assert len(calls["without"]) == 2 and all(calls["without"])
    assert len(calls["with"]) == 6
    assert calls["with"].count(False) == 2


def test_flashbacks_load_from_files_folders_and_messages_without_ids(tmp_path):
    messages = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "ignored"}]} for p in FLASHBACKS
    ]
    path = tmp_path / "old.jsonl"
    path.write_text("\n".join(json.dumps(m) for m in messages))
    from_file = load_flashback_rows(str(path))
    assert from_file.column_names == ["prompt"]
    assert from_file[0]["prompt"] == [{"role": "user", "content": FLASHBACKS[0]}]
    Dataset.from_list([{"prompt": p, "completion": "x"} for p in FLASHBACKS]).save_to_disk(str(tmp_path / "saved"))
    assert load_flashback_rows(str(tmp_path / "saved"))["prompt"] == FLASHBACKS
    trainer = flashback_trainer(
        tmp_path,
        "messages",
        flashbacks=str(path),
        train=rows(with_queries=False),
        query_encoder="embedded",
        peft_config=tki_config(key_dim=384),
    )
    tokenizer = tiny_tokenizer()
    expected = tokenizer.apply_chat_template(from_file[0]["prompt"], add_generation_prompt=True, tokenize=True)
    assert flashback_objective(trainer).flashbacks.token_ids[0] == list(
        expected["input_ids"] if hasattr(expected, "keys") else expected
    )
    assert flashback_objective(trainer).flashbacks.query_embeddings.shape == (len(FLASHBACKS), 384)
    with pytest.raises(ValueError, match="'prompt' or 'messages'"):
        load_flashback_rows(Dataset.from_list([{"question": "x"}]))


def card_of(trainer, tmp_path, name):
    trainer.create_model_card()
    return (tmp_path / name / "README.md").read_text()


def test_the_model_card_says_what_the_adapter_was_kept_close_to(tmp_path):
    path = tmp_path / "old.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in flashback_rows()))
    from_config = TKITrainer(
        tiny_llama(),
        args=TKIConfig(**common(tmp_path, "config"), kr=False, flashback_dataset=str(path)),
        train_dataset=rows(),
        processing_class=tiny_tokenizer(),
        peft_config=tki_config(),
    )
    card = card_of(from_config, tmp_path, "config")
    assert (
        f"{len(FLASHBACKS)} flashback prompts of `{path.name}`, 1 per micro-batch, routed through the latent bank"
        in card
    )
    assert (
        "symmetric KL divergence (weight 1) to the model as it was before this training, over the prompt's positions."
        in card
    )
    bypassed = flashback_trainer(tmp_path, "bypassed", flashback_routing=False, flashback_divergence="js")
    card = card_of(bypassed, tmp_path, "bypassed")
    assert (
        f"{len(FLASHBACKS)} flashback prompts, 2 per micro-batch, bypassing the latent bank; Jensen-Shannon divergence"
        in card
    )
    continued = flashback_trainer(tmp_path, "continued", flashbacks=str(path), flashback_continuation_tokens=2)
    card = card_of(continued, tmp_path, "continued")
    assert f"flashback prompts of `{path.name}`, 2 per micro-batch" in card
    assert "over the prompt's positions and a 2-token continuation the reference generated." in card
    plain = TKITrainer(
        tiny_llama(),
        args=TKIConfig(**common(tmp_path, "plain"), kr=False),
        train_dataset=rows(),
        processing_class=tiny_tokenizer(),
        peft_config=tki_config(),
    )
    assert "flashback" not in card_of(plain, tmp_path, "plain").lower()


def test_reference_continuations_are_generated_once_and_cached_as_safetensors(tmp_path, monkeypatch):
    trainer = flashback_trainer(tmp_path, "continued", flashback_continuation_tokens=3)
    cached = list((tmp_path / "continued" / "_tki_cache" / "flashbacks").glob("*.safetensors"))
    assert len(cached) == 1
    prompts = [tiny_tokenizer()(p)["input_ids"] for p in FLASHBACKS]
    extended = flashback_objective(trainer).flashbacks.token_ids
    assert all(e[: len(p)] == p and 0 < len(e) - len(p) <= 3 for e, p in zip(extended, prompts))

    def refuse(*_args, **_kwargs):
        raise AssertionError("the cached continuations should have been read")

    monkeypatch.setattr(flashback_prompts, "_generate", refuse)
    again = flashback_trainer(tmp_path, "continued", flashback_continuation_tokens=3)
    assert flashback_objective(again).flashbacks.token_ids == extended


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(flashback_weight=-1.0), "flashback_weight"),
        (dict(flashback_divergence="hellinger"), "flashback_divergence"),
        (dict(flashbacks_per_step=0), "flashbacks_per_step"),
        (dict(flashback_dataset="old", fsdp="full_shard", lta=False, kr=False), "train with DDP"),
        (dict(flashback_continuation_tokens=16, max_length=16), "max_length"),
    ],
)
def test_flashback_settings_tki_cannot_honour_are_refused_by_the_config(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        TKIConfig(**common(tmp_path, "bad"), **overrides)


def test_flashbacks_given_to_the_trainer_are_refused_under_an_engine_that_owns_backward(tmp_path):
    args = TKIConfig(**common(tmp_path, "fsdp"), fsdp="full_shard", lta=False, kr=False, pcgrad=False)
    with pytest.raises(ValueError, match="train with DDP"):
        TKITrainer(tiny_llama(), args=args, train_dataset=rows(), processing_class=tiny_tokenizer(),
                   flashback_dataset=flashback_rows(with_queries=False))  # fmt: skip
