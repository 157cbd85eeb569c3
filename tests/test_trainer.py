import dataclasses

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig
from torch.nn.utils.rnn import pad_sequence
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from conftest import KEY_DIM, tiny_llama, tiny_tokenizer, tki_config
from test_pcgrad import yu_et_al
from tki_trainer import TKIConfig, TKITrainer, compute_prior_inputs
from tki_trainer.collator import EXAMPLE_IDS
from tki_trainer.config import prior_input_arguments
from tki_trainer.reinstatement import PriorInputConfig


ROWS = [
    ("The island is", " an island of land."),
    ("Paris is the capital of", " France."),
    ("Answer: yes or no.", " yes"),
    ("The capital of France is", " Paris."),
    ("Is land an island?", " no"),
    ("Paris is", " the capital of France."),
    ("Answer:", " no"),
    ("The island of", " land."),
]


def rows(with_queries=True):
    generator = torch.Generator().manual_seed(3)
    data = [{"id": f"r{i}", "prompt": p, "completion": c} for i, (p, c) in enumerate(ROWS)]
    if with_queries:
        for row in data:
            row["query_embedding"] = torch.randn(KEY_DIM, generator=generator).tolist()
    return Dataset.from_list(data)


def shared_lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")


def common(tmp_path, name, **overrides):
    values = dict(
        output_dir=str(tmp_path / name),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        bf16=False,
        use_cpu=True,
        seed=0,
        dataset_num_proc=None,
        save_strategy="no",
        activation_checkpointing=False,
    )
    values.update(overrides)
    return values


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_with_every_switch_off_it_trains_exactly_like_sft_trainer(tmp_path):
    sft = SFTTrainer(
        tiny_llama(),
        args=SFTConfig(**common(tmp_path, "sft")),
        train_dataset=rows(False),
        processing_class=tiny_tokenizer(),
        peft_config=shared_lora(),
    )
    sft.train()
    tki = TKITrainer(
        tiny_llama(),
        args=TKIConfig(**common(tmp_path, "tki"), lta=False, kr=False, pcgrad=False),
        train_dataset=rows(False),
        processing_class=tiny_tokenizer(),
        peft_config=shared_lora(),
    )
    tki.train()
    assert len(losses(sft)) == 3
    assert losses(tki) == pytest.approx(losses(sft), rel=1e-6)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_silent_bank_leaves_tkis_sft_term_equal_to_sft_trainer(tmp_path, checkpointing):
    """lta=True, latent_alpha=0: every batch is routed through the bank, which adds nothing."""
    settings = common(tmp_path, "x", activation_checkpointing=checkpointing)
    sft = SFTTrainer(
        tiny_llama(),
        args=SFTConfig(**{**settings, "output_dir": str(tmp_path / "sft")}),
        train_dataset=rows(False),
        processing_class=tiny_tokenizer(),
        peft_config=shared_lora(),
    )
    tki = TKITrainer(
        tiny_llama(),
        args=TKIConfig(**{**settings, "output_dir": str(tmp_path / "tki")}, kr=False),
        train_dataset=rows(),
        processing_class=tiny_tokenizer(),
        peft_config=tki_config(latent_alpha=0),
    )
    with torch.no_grad():
        shared = {
            n.replace("lora_", "tki_lora_").replace(".default", ""): p
            for n, p in sft.model.named_parameters()
            if "lora_" in n
        }
        for name, parameter in tki.model.named_parameters():
            key = name.replace(".default", "")
            if key in shared:
                parameter.copy_(shared[key])
    sft.train()
    tki.train()
    assert losses(tki) == pytest.approx(losses(sft), rel=1e-5)
    assert "latent_usage_entropy" in tki.state.log_history[0]


ADAPTERS = {
    "tki": lambda: tki_config(),
    "lora": shared_lora,
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", use_dora=True),
}


def kr_trainer(tmp_path, name, store_dir=None, adapter="tki", **overrides):
    """A KR trainer; a given store was written with learning rate 0 (q = e) or then overwritten, as said."""
    stage1 = {"prior_inputs_learning_rate": 0.0} if store_dir else {}
    settings = {**common(tmp_path, name), **stage1, **overrides}
    return TKITrainer(
        tiny_llama(),
        args=TKIConfig(**settings, prior_inputs_dir=store_dir, lta=adapter == "tki"),
        train_dataset=rows(),
        processing_class=tiny_tokenizer(),
        peft_config=ADAPTERS[adapter](),
    )


def test_prior_inputs_equal_to_the_prompt_make_reinstatement_equal_sft(tmp_path):
    store = compute_prior_inputs(
        tiny_llama(), tiny_tokenizer(), rows(), tmp_path / "store", config=PriorInputConfig(learning_rate=0.0)
    )
    trainer = kr_trainer(tmp_path, "kr", store_dir=str(store.path))
    trainer.train()
    for entry in (e for e in trainer.state.log_history if "loss_sft" in e):
        assert entry["loss_reinst"] == pytest.approx(entry["loss_sft"], rel=1e-5)
        assert entry["pcgrad_conflict_rate"] == 0
        assert entry["pcgrad_cosine"] == pytest.approx(1.0, abs=1e-4)


def adapter_after_one_step(tmp_path, name, store_dir, batch, accumulation, adapter="tki", **overrides):
    trainer = kr_trainer(
        tmp_path,
        name,
        store_dir=store_dir,
        adapter=adapter,
        max_steps=1,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-3,
        **overrides,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return before, after, trainer


def noisy_store(tmp_path, scale):
    """Prior inputs ``q = e + noise``: harder than the prompt for most rows, so both objectives have gradients."""
    store = compute_prior_inputs(
        tiny_llama(), tiny_tokenizer(), rows(), tmp_path / "store", config=PriorInputConfig(learning_rate=0.0)
    )
    generator = torch.Generator().manual_seed(0)
    deltas = {i: torch.randn(store.load_delta(i).shape, generator=generator) * scale for i in store.examples}
    entries = {i: dataclasses.asdict(e) for i, e in store.examples.items()}
    for entry in entries.values():
        del entry["shard"]
    store.write_shard("999-00000", deltas, entries)
    return store


@pytest.mark.parametrize("target", ["easier", "harder"])
@pytest.mark.parametrize("adapter,passes", [("tki", 2), ("lora", 2), ("dora", 3)])
def test_pcgrad_update_is_the_same_for_accumulation_and_one_large_batch(tmp_path, adapter, passes, target):
    """Micro-batches of one example never mix; the batch of four does (some rows with q harder, some with x), under
    either reading. It takes two backward passes where the per-example capture covers every trainable parameter
    (checked here against the micro-batch route), three where it cannot (DoRA's magnitudes)."""
    store = noisy_store(tmp_path, scale=0.5)
    reading = {"reinstatement_target": target}
    before, accumulated, trainer = adapter_after_one_step(
        tmp_path, "ga", str(store.path), batch=1, accumulation=4, adapter=adapter, **reading
    )
    _, large, large_trainer = adapter_after_one_step(
        tmp_path, "large", str(store.path), batch=4, accumulation=1, adapter=adapter, **reading
    )
    assert any(not torch.equal(before[n], large[n]) for n in large)
    for name in large:
        torch.testing.assert_close(accumulated[name], large[name], atol=1e-6, rtol=1e-5)
    log = next(e for e in large_trainer.state.log_history if "loss_sft" in e)
    assert 0 < log["reinst_q_win_rate"] < 1
    assert log["reinst_gap"] == pytest.approx(log["loss_reinst"] - log["loss_sft"], abs=1e-6)
    assert (log["reinst_gap"] > 0) == (target == "harder")
    assert log["pcgrad_backward_passes"] == passes
    assert log["loss"] == pytest.approx(log["loss_sft"] + log["loss_reinst"], rel=1e-4)
    accumulated_log = next(e for e in trainer.state.log_history if "loss_sft" in e)
    assert accumulated_log["loss_sft"] == pytest.approx(log["loss_sft"], rel=1e-5)


@pytest.mark.parametrize(
    "overrides,data,message",
    [
        (dict(kr=True), Dataset.from_list([{"id": "a", "text": "The island is land."}]), "set kr=False"),
        ({}, rows().map(lambda row: {"prompt": ""}), "empty prompt"),
        ({}, rows().map(lambda row, i: {"id": "same"}, with_indices=True), "duplicates"),
        (
            dict(kr=False),
            Dataset.from_list([{"id": "a", "content": "The island is land."}]),
            "'prompt', 'messages' or 'text'",
        ),
    ],
)
def test_bad_input_is_refused_at_construction(tmp_path, overrides, data, message):
    args = TKIConfig(**{**common(tmp_path, "bad"), **overrides})
    with pytest.raises(ValueError, match=message):
        TKITrainer(
            tiny_llama(),
            args=args,
            train_dataset=data if data is not None else rows(),
            processing_class=tiny_tokenizer(),
            peft_config=tki_config(),
        )


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(packing=True), "packing"),
        (dict(completion_only_loss=False, kr=True), "completion_only_loss=True"),
        (dict(label_smoothing_factor=0.1, kr=True), "label_smoothing_factor"),
        (dict(activation_offloading=True, kr=True), "activation_offloading=False"),
        (dict(fsdp="full_shard"), "FSDP"),
        (dict(optim="adamw_8bit"), "optim='adamw_torch'"),
        (dict(neftune_noise_alpha=5.0, kr=True), "neftune_noise_alpha=None"),
        (dict(truncation_mode="keep_end", kr=True), "keep_start"),
        (dict(eval_packing=True), "eval_packing=False"),
        (dict(prior_inputs_mode="on_the_fly", prior_inputs_dir="x"), "unset prior_inputs_dir"),
        (dict(prior_inputs_dir="/nonexistent"), "no prior-input store"),
    ],
)
def test_configurations_tki_cannot_honour_are_refused_by_the_config(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        TKIConfig(**{**common(tmp_path, "bad"), **overrides})


def test_a_lora_config_with_lta_becomes_the_tki_adapter_and_fields_it_cannot_carry_are_refused(tmp_path):
    trainer = TKITrainer(
        tiny_llama(),
        args=TKIConfig(**common(tmp_path, "lora"), kr=False),
        train_dataset=rows(),
        processing_class=tiny_tokenizer(),
        peft_config=shared_lora(),
    )
    config = trainer.model.peft_config["default"]
    assert (config.peft_type, config.r, config.lora_alpha) == ("TKI", 4, 8)
    assert len(config.target_modules) == 14  # all-linear: 7 linear layers in each of 2 blocks
    assert (config.num_groups, config.keys_per_group, config.key_dim) == (16, 12, KEY_DIM)
    with pytest.raises(ValueError, match="use_dora"):
        TKITrainer(
            tiny_llama(),
            args=TKIConfig(**common(tmp_path, "dora"), kr=False),
            train_dataset=rows(),
            processing_class=tiny_tokenizer(),
            peft_config=ADAPTERS["dora"](),
        )
    with pytest.raises(ValueError, match="key_dim=32"):
        TKITrainer(
            tiny_llama(),
            args=TKIConfig(**common(tmp_path, "bad")),
            train_dataset=rows(),
            processing_class=tiny_tokenizer(),
            peft_config=tki_config(key_dim=32),
        )


def test_a_foreign_prior_input_store_is_refused(tmp_path):
    store = compute_prior_inputs(
        tiny_llama(seed=9), tiny_tokenizer(), rows(), tmp_path / "store", config=PriorInputConfig(steps=1)
    )
    with pytest.raises(ValueError, match="input-embedding weights differ"):
        kr_trainer(tmp_path, "foreign", store_dir=str(store.path))


def test_resuming_from_a_checkpoint_reproduces_the_uninterrupted_run(tmp_path):
    store = noisy_store(tmp_path, scale=0.5)

    def trainer(name):
        return kr_trainer(
            tmp_path,
            name,
            store_dir=str(store.path),
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            learning_rate=1e-3,
        )

    straight = trainer("run")
    straight.train()
    expected = {n: p.detach().clone() for n, p in straight.model.named_parameters() if p.requires_grad}
    resumed = trainer("run")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert len(losses(resumed)) == 4
    assert losses(resumed)[2:] == pytest.approx(losses(straight)[2:], rel=1e-6)
    for name, parameter in resumed.model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.detach(), expected[name])
    saved = {p.name for p in (tmp_path / "run" / "checkpoint-2").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt"} <= saved


def test_drop_in_path_computes_queries_and_prior_inputs_and_uses_the_papers_bank(tmp_path):
    """A plain LoraConfig, no query_embedding column, no prior-input store: the trainer builds the TKI adapter (the
    paper's bank), the queries and the prior inputs."""
    args = TKIConfig(**common(tmp_path, "dropin", max_steps=1), query_encoder="embedded", prior_inputs_steps=1)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = TKITrainer(
        tiny_llama(), args=args, train_dataset=rows(with_queries=False), processing_class=tiny_tokenizer(),
        peft_config=lora,
    )  # fmt: skip
    config = trainer.model.peft_config["default"]
    assert (config.num_groups, config.keys_per_group, config.top_k, config.r, config.key_dim) == (16, 12, 2, 8, 384)
    cache = tmp_path / "dropin" / "_tki_cache"
    assert (cache / "prior_inputs" / "store.json").is_file() and list((cache / "queries").glob("*.safetensors"))
    trainer.train()
    assert "loss_reinst" in trainer.state.log_history[0]


def test_on_the_fly_prior_inputs_train_without_a_store(tmp_path):
    args = TKIConfig(
        **common(tmp_path, "fly", max_steps=2),
        prior_inputs_mode="on_the_fly",
        prior_inputs_steps=2,
        prior_inputs_learning_rate=5e-2,
    )
    trainer = TKITrainer(
        tiny_llama(), args=args, train_dataset=rows(), processing_class=tiny_tokenizer(), peft_config=tki_config()
    )
    trainer.train()
    assert not (tmp_path / "fly" / "_tki_cache" / "prior_inputs").exists()
    logs = [e for e in trainer.state.log_history if "loss_sft" in e]
    assert len(logs) == 2 and all(e["loss_reinst"] <= e["loss_sft"] for e in logs)


def test_evaluation_routes_each_example_as_in_training(tmp_path):
    args = TKIConfig(**common(tmp_path, "eval", max_steps=1, per_device_eval_batch_size=8), kr=False)
    trainer = TKITrainer(
        tiny_llama(),
        args=args,
        train_dataset=rows(),
        eval_dataset=rows(),
        processing_class=tiny_tokenizer(),
        peft_config=tki_config(),
    )
    trainer.train()
    metrics = trainer.evaluate()
    batch = next(iter(trainer.get_eval_dataloader()))
    with torch.no_grad():
        expected = trainer.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            query_embeddings=batch["query_embeddings"],
            group_ids=batch["group_ids"],
        ).loss
        unrouted_groups = (batch["group_ids"] + 1) % 3
        other = trainer.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            query_embeddings=batch["query_embeddings"],
            group_ids=unrouted_groups,
        ).loss
    assert metrics["eval_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert float(other) != pytest.approx(float(expected), rel=1e-6)
    assert "eval_latent_usage_entropy" in metrics


def test_tki_config_parses_from_the_command_line_like_sft_config():
    from trl import TrlParser

    (args,) = TrlParser((TKIConfig,)).parse_args_and_config(
        [
            "--output_dir",
            "x",
            "--use_cpu",
            "true",
            "--kr",
            "false",
            "--reinstatement_alpha",
            "0.5",
            "--query_encoder",
            "embedded",
        ]
    )
    assert (args.kr, args.lta, args.reinstatement_alpha, args.query_encoder) == (False, True, 0.5, "embedded")


def test_a_trainable_head_read_by_the_fused_lm_head_falls_back_to_the_third_backward(tmp_path):
    """TRL's fused LM head reads ``lm_head.weight`` without calling the module, so the capture never sees the head;
    a mixed micro-batch must then take the third backward, and give the update of four micro-batches of one."""
    store = noisy_store(tmp_path, scale=0.5)
    ADAPTERS["head"] = lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                                          modules_to_save=["lm_head"])  # fmt: skip
    try:
        _, accumulated, _ = adapter_after_one_step(
            tmp_path, "ga", str(store.path), batch=1, accumulation=4, adapter="head"
        )
        _, large, trainer = adapter_after_one_step(
            tmp_path, "large", str(store.path), batch=4, accumulation=1, adapter="head"
        )
    finally:
        del ADAPTERS["head"]
    log = next(e for e in trainer.state.log_history if "loss_sft" in e)
    assert 0 < log["reinst_q_win_rate"] < 1 and log["pcgrad_backward_passes"] == 3
    assert any("lm_head" in name for name in large)
    for name in large:
        torch.testing.assert_close(accumulated[name], large[name], atol=1e-6, rtol=1e-5)


def test_without_a_token_count_the_pcgrad_step_scales_like_the_trainers(tmp_path, monkeypatch):
    """With ``num_items_in_batch`` None the Trainer divides each micro-batch's loss by the accumulation steps; the
    PCGrad step must too. With q = e the two objectives are equal, so PCGrad (no conflict) and the plain sum of the
    losses (the Trainer's own step) log the same loss and gradient norm."""
    store = compute_prior_inputs(
        tiny_llama(), tiny_tokenizer(), rows(), tmp_path / "store", config=PriorInputConfig(learning_rate=0.0)
    )
    logs = {}
    for pcgrad in (True, False):
        trainer = kr_trainer(tmp_path, f"scale-{pcgrad}", store_dir=str(store.path), pcgrad=pcgrad, max_steps=2,
                             gradient_accumulation_steps=2, learning_rate=1e-3)  # fmt: skip
        batches = trainer.get_batch_samples
        monkeypatch.setattr(trainer, "get_batch_samples", lambda *a, batches=batches, **k: (batches(*a, **k)[0], None))
        trainer.train()
        logs[pcgrad] = [
            value for e in trainer.state.log_history if "grad_norm" in e for value in (e["loss"], e["grad_norm"])
        ]
    assert len(logs[True]) == 4
    assert logs[True] == pytest.approx(logs[False], rel=1e-5)


def test_deepspeed_or_fsdp_from_an_accelerate_config_is_refused_with_lta(tmp_path, monkeypatch):
    """``accelerate launch --config_file <fsdp config>`` says so only through the environment."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP reduces and shards"):
        TKIConfig(**common(tmp_path, "fsdp"))


def test_a_dataset_given_to_evaluate_is_prepared_like_the_eval_dataset(tmp_path):
    args = TKIConfig(**common(tmp_path, "eval", max_steps=1), kr=False)
    trainer = TKITrainer(tiny_llama(), args=args, train_dataset=rows(), processing_class=tiny_tokenizer(),
                         peft_config=tki_config())  # fmt: skip
    unseen = rows().remove_columns("id").select(range(4))
    metrics = trainer.evaluate(unseen)
    assert metrics["eval_loss"] > 0 and "eval_latent_usage_entropy" in metrics


def test_a_lora_config_without_target_modules_targets_what_peft_lora_targets(tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM")
    trainer = TKITrainer(tiny_llama(), args=TKIConfig(**common(tmp_path, "lora"), kr=False), train_dataset=rows(),
                         processing_class=tiny_tokenizer(), peft_config=lora)  # fmt: skip
    assert trainer.model.peft_config["default"].target_modules == {"q_proj", "v_proj"}


class GradientsBeforeTheStep(TrainerCallback):
    """The gradients the optimizer is about to apply (after PCGrad; clipping is off in the test)."""

    def __init__(self, model):
        self.model, self.gradients = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.gradients is None:
            self.gradients = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}


def test_prior_inputs_all_easier_take_the_prior_input_plan_and_pcgrad_follows_the_formula(tmp_path):
    """Eq. 6 as written, on a store whose every prior input is easier than its prompt: one micro-batch of all eight
    rows trains its reinstatement term through ``q`` alone (one backward through each graph), and the update PCGrad
    hands the optimizer is Yu et al.'s formula on the two objectives' gradients computed here by hand (the formula
    itself, projection included, is tested on hand-made gradients in test_pcgrad.py)."""
    config = PriorInputConfig(steps=8, learning_rate=1e-2, batch_size=8)
    store = compute_prior_inputs(tiny_llama(), tiny_tokenizer(), rows(), tmp_path / "store", config=config)
    assert all(e.ce_final < e.ce_initial for e in store.examples.values())
    trainer = TKITrainer(
        tiny_llama(),
        args=TKIConfig(**common(tmp_path, "easier", max_steps=1, per_device_train_batch_size=8, max_grad_norm=0.0),
                       lta=False, prior_inputs_dir=str(store.path), **prior_input_arguments(config)),
        train_dataset=rows(),
        processing_class=tiny_tokenizer(),
        peft_config=shared_lora(),
    )  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    example_ids = batch.pop(EXAMPLE_IDS)
    model = trainer.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    prompt = model(**batch)
    embeddings = model.get_input_embeddings()(batch["input_ids"]).detach()
    deltas = pad_sequence([store.load_delta(i) for i in example_ids], batch_first=True)
    prior_inputs = embeddings + F.pad(deltas, (0, 0, 0, embeddings.shape[1] - deltas.shape[1]))
    prior = model(inputs_embeds=prior_inputs, attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert prior.loss.item() < prompt.loss.item()
    g1 = torch.cat([g.flatten() for g in torch.autograd.grad(prompt.loss, trainable)])
    g2 = torch.cat([g.flatten() for g in torch.autograd.grad(prior.loss, trainable)])
    expected = yu_et_al(g1, g2)

    captured = GradientsBeforeTheStep(model)
    trainer.add_callback(captured)
    trainer.train()
    log = next(e for e in trainer.state.log_history if "loss_sft" in e)
    assert log["reinst_q_win_rate"] == 1 and log["pcgrad_backward_passes"] == 2
    assert log["pcgrad_conflict_rate"] == float(torch.dot(g1, g2) < 0)
    assert log["pcgrad_cosine"] == pytest.approx(float(torch.cosine_similarity(g1, g2, dim=0)), abs=1e-5)
    assert log["loss_reinst"] == pytest.approx(prior.loss.item(), rel=1e-4)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    update = torch.cat([captured.gradients[n].flatten() for n in names])
    torch.testing.assert_close(update, expected, atol=1e-6, rtol=1e-4)
