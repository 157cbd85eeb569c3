import json
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer
from trl.trainer.utils import add_fused_lm_head

from conftest import VOCAB_SIZE, tiny_llama, tiny_tokenizer
from tki_trainer.data import tokenize_row
from tki_trainer.reinstatement import (
    PriorInputConfig,
    PriorInputStore,
    compute_prior_inputs,
    optimize_prior_inputs,
    stage1,
)
from tki_trainer.reinstatement.fingerprint import prompt_hash
from tki_trainer.reinstatement.stage1 import completion_cross_entropy, wasserstein
from tki_trainer.reinstatement.store import FORMAT_VERSION


ROWS = [
    ("a", "The island is", " an island of land."),
    ("b", "Paris is the capital of", " France."),
    ("c", "Answer: yes or no.", " yes"),
    ("d", "The capital of France is", " Paris."),
    ("e", "Is land an island?", " no"),
]
FAST = PriorInputConfig(steps=8, learning_rate=5e-3, wasserstein_weight=1.0, batch_size=2)


def dataset():
    return Dataset.from_list([{"id": i, "prompt": p, "completion": c} for i, p, c in ROWS])


def collated_batch(tokenizer):
    rows = [tokenize_row(tokenizer, p, c) for _, p, c in ROWS]
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        attention_mask[i, :n] = 1
        labels[i, row.prompt_length : n] = input_ids[i, row.prompt_length : n]
    return input_ids, attention_mask, labels, torch.tensor([r.prompt_length for r in rows])


def test_stage1_lowers_every_examples_cross_entropy():
    result = optimize_prior_inputs(tiny_llama(), *collated_batch(tiny_tokenizer()), FAST)
    assert (result.ce_final < result.ce_initial).all()
    assert (result.relative_change > 0).all()


def test_the_paper_setting_barely_moves_the_prompt():
    result = optimize_prior_inputs(tiny_llama(), *collated_batch(tiny_tokenizer()), PriorInputConfig.paper())
    assert result.relative_change.max() < 1e-3


def mean_wasserstein(result, lengths):
    return sum(
        float(wasserstein(result.embeddings[i, :n], result.initial[i, :n], "emd", 0.0))
        for i, n in enumerate(lengths.tolist())
    ) / len(lengths)


def test_a_larger_wasserstein_weight_keeps_q_closer_to_e():
    model, batch = tiny_llama(), collated_batch(tiny_tokenizer())
    distances = [
        mean_wasserstein(
            optimize_prior_inputs(
                model, *batch, PriorInputConfig(steps=8, learning_rate=5e-3, wasserstein_weight=lam)
            ),
            batch[3],
        )
        for lam in (0.0, 30.0, 300.0)
    ]
    assert distances[0] > distances[1] > distances[2] > 0


@pytest.mark.parametrize("method", ["emd", "sinkhorn"])
def test_wasserstein_gradient_is_finite_at_q_equal_e(method):
    e = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    q = e.clone().requires_grad_(True)
    wasserstein(q, e, method, 0.05).backward()
    assert torch.isfinite(q.grad).all()
    assert q.grad.abs().max() < 1e-6


def test_store_round_trip_equals_the_optimised_embeddings(tmp_path):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    one_batch = PriorInputConfig(**{**FAST.to_dict(), "batch_size": 5})
    store = compute_prior_inputs(model, tokenizer, dataset(), tmp_path / "store", config=one_batch)
    assert sorted(store.examples) == ["a", "b", "c", "d", "e"]
    direct = optimize_prior_inputs(model, *collated_batch(tokenizer), one_batch)
    for i, (example_id, prompt, completion) in enumerate(ROWS):
        row = tokenize_row(tokenizer, prompt, completion)
        e = model.get_input_embeddings()(torch.tensor(row.prompt_ids)).detach()
        loaded = e + store.load_delta(example_id)
        expected = direct.embeddings[i, : row.prompt_length]
        torch.testing.assert_close(loaded, expected, atol=2e-3 * expected.abs().max().item(), rtol=0)
        assert store.examples[example_id].prompt_hash == prompt_hash(row.prompt_ids)
    summary = store.summary()
    assert summary["examples"] == 5 and summary["ce_final"] < summary["ce_initial"]
    assert json.loads((tmp_path / "store" / "store.json").read_text())["format"] == FORMAT_VERSION
    assert {p.suffix for p in (tmp_path / "store").iterdir()} == {".json", ".safetensors"}


def test_an_interrupted_stage_resumes_to_the_same_result(tmp_path, monkeypatch):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    original_write = PriorInputStore.write_shard
    written = []

    def write_then_fail(self, name, tensors, entries):
        if written:
            raise KeyboardInterrupt
        written.append(name)
        original_write(self, name, tensors, entries)

    monkeypatch.setattr(PriorInputStore, "write_shard", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        compute_prior_inputs(model, tokenizer, dataset(), tmp_path / "resumed", config=FAST)
    assert len(PriorInputStore(tmp_path / "resumed").examples) == 2
    monkeypatch.setattr(PriorInputStore, "write_shard", original_write)
    resumed = compute_prior_inputs(model, tokenizer, dataset(), tmp_path / "resumed", config=FAST)
    straight = compute_prior_inputs(model, tokenizer, dataset(), tmp_path / "straight", config=FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resumed", "straight"]
    assert len(list((tmp_path / "resumed").glob("shard-*"))) == 3
    for example_id, *_ in ROWS:
        assert torch.equal(resumed.load_delta(example_id), straight.load_delta(example_id))
    with pytest.raises(ValueError, match="different settings"):
        compute_prior_inputs(model, tokenizer, dataset(), tmp_path / "resumed", config=PriorInputConfig(steps=2))


def prompt_hashes(tokenizer, rows=ROWS):
    return {i: prompt_hash(tokenize_row(tokenizer, p, c).prompt_ids) for i, p, c in rows}


def test_compatibility_check_accepts_trls_config_edits_and_refuses_other_models(tmp_path):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    store = compute_prior_inputs(model, tokenizer, dataset(), tmp_path / "store", config=PriorInputConfig(steps=1))

    args = SFTConfig(
        output_dir=str(tmp_path / "sft"), bf16=False, use_cpu=True, report_to="none", dataset_num_proc=None
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset(), processing_class=tokenizer)
    trainer.model.config.use_cache = not trainer.model.config.use_cache
    trainer.model.config.pad_token_id = 1
    store.check(trainer.model, tokenizer, prompt_hashes(tokenizer))

    with pytest.raises(ValueError, match="input-embedding weights differ"):
        store.check(tiny_llama(seed=5), tokenizer, prompt_hashes(tokenizer))
    other_tokenizer = tiny_tokenizer()
    other_tokenizer.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="vocabulary differs"):
        store.check(model, other_tokenizer, prompt_hashes(tokenizer))
    changed = [(i, p + " Really?", c) if i == "b" else (i, p, c) for i, p, c in ROWS]
    with pytest.raises(ValueError, match="1 examples tokenize to other prompt tokens"):
        store.check(model, tokenizer, prompt_hashes(tokenizer, changed))
    with pytest.raises(ValueError, match="have no stored prior input"):
        store.check(model, tokenizer, {**prompt_hashes(tokenizer), "z": "0"})


def test_a_tokenizer_without_pad_token_pads_with_eos_like_sft_trainer(tmp_path):
    """Llama-3-like tokenizers have no pad token: stage 1 pads with eos as SFTTrainer does, and padding changes
    nothing (one batch of five rows of different lengths)."""
    model, with_pad, without_pad = tiny_llama(), tiny_tokenizer(), tiny_tokenizer()
    without_pad.pad_token = None
    one_batch = PriorInputConfig(**{**FAST.to_dict(), "batch_size": 5})
    padded = compute_prior_inputs(model, with_pad, dataset(), tmp_path / "pad", config=one_batch)
    eos_padded = compute_prior_inputs(model, without_pad, dataset(), tmp_path / "eos", config=one_batch)
    assert without_pad.pad_token is None
    for example_id, *_ in ROWS:
        torch.testing.assert_close(eos_padded.load_delta(example_id), padded.load_delta(example_id), rtol=0, atol=0)


def test_an_empty_prompt_is_refused_before_any_model_work(tmp_path, monkeypatch):
    optimised = []
    monkeypatch.setattr(stage1, "optimize_prior_inputs", lambda *args: optimised.append(args))
    rows = Dataset.from_list([*dataset(), {"id": "blank", "prompt": "", "completion": " yes"}])
    with pytest.raises(
        ValueError, match=r"Rows \['blank'\] \(1 in all\) have no prompt token.*give these rows a prompt"
    ):
        compute_prior_inputs(tiny_llama(), tiny_tokenizer(), rows, tmp_path / "store", config=FAST)
    assert not optimised and not (tmp_path / "store").exists()
    input_ids, attention_mask, labels, lengths = collated_batch(tiny_tokenizer())
    lengths[1] = 0
    with pytest.raises(ValueError, match=r"Rows \[1\] of the batch have no prompt token"):
        optimize_prior_inputs(tiny_llama(), input_ids, attention_mask, labels, lengths, FAST)


def tiny_gemma2() -> Gemma2ForCausalLM:
    """Gemma-2 soft-caps its logits (``final_logit_softcapping``) inside its own LM head; a large head makes the
    cap matter."""
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, final_logit_softcapping=5.0, tie_word_embeddings=False, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(100)
    return model


def tiny_cohere() -> CohereForCausalLM:
    """Cohere scales its logits (``logit_scale``) inside its own LM head; a large head makes the scale matter."""
    torch.manual_seed(0)
    config = CohereConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, logit_scale=0.0625, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    model = CohereForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(100)
    return model


@pytest.mark.parametrize("build", [tiny_gemma2, tiny_cohere])
def test_stage1_cross_entropy_at_q_equal_e_is_the_one_training_computes(build):
    """``ce_initial`` equals SFTTrainer's per-example CE (its fused LM head, soft-capping and logit scale included),
    whether or not the model already carries TRL's head; a CE from the decoder and the output embeddings differs."""
    model = build()
    input_ids, attention_mask, labels, lengths = collated_batch(tiny_tokenizer())
    standalone = optimize_prior_inputs(model, input_ids, attention_mask, labels, lengths, PriorInputConfig(steps=1))
    assert "forward" not in model.__dict__

    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    patched = model.__dict__["forward"]
    with torch.no_grad():
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    training = -outputs.log_probs.sum(dim=1) / outputs.label_mask.sum(dim=1)
    torch.testing.assert_close(standalone.ce_initial, training)
    in_trainer = optimize_prior_inputs(model, input_ids, attention_mask, labels, lengths, PriorInputConfig(steps=1))
    torch.testing.assert_close(in_trainer.ce_initial, training)
    assert model.__dict__["forward"] is patched

    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = model.get_output_embeddings()(hidden[:, :-1])
    token_ce = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none")
    decoder_head = token_ce.sum(dim=1) / (labels[:, 1:] != -100).sum(dim=1)
    assert (decoder_head - training).abs().min() > 1e-3


def test_check_refuses_a_store_computed_with_other_stage1_settings(tmp_path):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    computed = PriorInputConfig(steps=1, learning_rate=1e-3, batch_size=2)
    store = compute_prior_inputs(model, tokenizer, dataset(), tmp_path / "store", config=computed, max_length=64)
    hashes = prompt_hashes(tokenizer)
    store.check(model, tokenizer, hashes, settings=computed)
    # The batch size does not change the prior inputs, nor does the Sinkhorn setting of the exact method.
    store.check(
        model,
        tokenizer,
        hashes,
        settings=PriorInputConfig(steps=1, learning_rate=1e-3, batch_size=5, sinkhorn_reg=1.0),
    )
    for changed, message in [
        (dict(steps=3), "steps=1 (asked: 3)"),
        (dict(learning_rate=5e-6), "learning_rate=0.001 (asked: 5e-06)"),
        (dict(wasserstein_weight=2.0), "wasserstein_weight=-1.0 (asked: 2.0)"),
        (dict(wasserstein="sinkhorn"), "wasserstein='emd' (asked: 'sinkhorn')"),
    ]:
        asked = PriorInputConfig(**{**computed.to_dict(), **changed})
        with pytest.raises(ValueError, match=f"other stage-1 settings: {re.escape(message)}[;.]"):
            store.check(model, tokenizer, hashes, settings=asked)


class EveryPositionLlama(LlamaForCausalLM):
    """A causal LM whose forward ignores ``logits_to_keep`` (as remote-code models may) and returns every position."""

    def forward(self, *args, logits_to_keep: int = 0, **kwargs):
        return super().forward(*args, **kwargs)


def test_stage1_is_the_same_for_a_model_that_returns_every_positions_logits():
    model = tiny_llama()
    every_position = EveryPositionLlama(model.config).eval()
    every_position.load_state_dict(model.state_dict())
    batch = collated_batch(tiny_tokenizer())
    kept = optimize_prior_inputs(model, *batch, FAST)
    full = optimize_prior_inputs(every_position, *batch, FAST)
    torch.testing.assert_close(full.ce_initial, kept.ce_initial)
    torch.testing.assert_close(full.embeddings, kept.embeddings)


def test_stage1_projects_only_the_positions_that_predict_a_labelled_token():
    model = tiny_llama()
    input_ids, attention_mask, labels, lengths = collated_batch(tiny_tokenizer())
    projected = []
    model.lm_head.register_forward_hook(lambda module, args, output: projected.append(args[0].shape[:-1]))
    optimize_prior_inputs(model, input_ids, attention_mask, labels, lengths, PriorInputConfig(steps=2))
    labelled = int((labels[:, 1:] != -100).sum())
    assert projected == [torch.Size([labelled])] * 3


def test_the_wasserstein_gradient_ratio_is_the_norm_ratio_at_the_last_step():
    """Eq. 5 as written (lam = -1) and lam = 0: the reported ratio is |lam grad W| / |grad CE| at the last step,
    recomputed here from the optimised embeddings one step before the end."""
    model, batch = tiny_llama(), collated_batch(tiny_tokenizer())
    input_ids, attention_mask, labels, lengths = batch
    without = optimize_prior_inputs(model, *batch, replace(FAST, wasserstein_weight=0.0))
    assert (without.wasserstein_gradient_ratio == 0).all()
    before_last = optimize_prior_inputs(model, *batch, replace(FAST, steps=FAST.steps - 1, wasserstein_weight=-1.0))
    result = optimize_prior_inputs(model, *batch, replace(FAST, wasserstein_weight=-1.0))
    for i, n in enumerate(lengths.tolist()):
        q = before_last.embeddings[i : i + 1].clone().requires_grad_(True)
        embedded = model.get_input_embeddings()(input_ids[i : i + 1]).detach()
        inputs = torch.cat([q[:, :n], embedded[:, n:]], dim=1)
        ce = completion_cross_entropy(model, inputs, attention_mask[i : i + 1], labels[i : i + 1]).sum()
        (ce_grad,) = torch.autograd.grad(ce, [q])
        distance = wasserstein(q[0, :n], before_last.initial[i, :n], "emd", 0.0)
        (w_grad,) = torch.autograd.grad(distance, [q])
        expected = float(w_grad.norm() / ce_grad.norm())
        assert float(result.wasserstein_gradient_ratio[i]) == pytest.approx(expected, rel=1e-3)


def test_a_deleted_shard_is_recomputed_without_overwriting_another(tmp_path):
    """Shards are named after the examples they hold, not after how many are on disk: deleting one (the repair of a
    corrupt shard) and rerunning restores the store whole."""
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    store = compute_prior_inputs(model, tokenizer, dataset(), tmp_path / "store", config=FAST)
    shards = sorted((tmp_path / "store").glob("shard-*"))
    assert len(shards) == 3
    deleted = next(shard for shard in shards if len(store_ids(shard)) == 2)
    kept = {shard.name: shard.read_bytes() for shard in shards if shard != deleted}
    deleted.unlink()
    rerun = compute_prior_inputs(model, tokenizer, dataset(), tmp_path / "store", config=FAST)
    assert sorted(rerun.examples) == ["a", "b", "c", "d", "e"]
    assert {
        shard.name: shard.read_bytes() for shard in (tmp_path / "store").glob("shard-*") if shard.name in kept
    } == kept
    for example_id in rerun.examples:
        torch.testing.assert_close(rerun.load_delta(example_id), store.load_delta(example_id))


def store_ids(shard):
    with safe_open(shard, framework="pt") as handle:
        return list(handle.keys())


@pytest.mark.parametrize(
    "rows,kwargs,message",
    [
        ([{"id": 1, "prompt": "Answer:", "completion": " no"}], {}, "holds int values"),
        ([{"id": None, "prompt": "Answer:", "completion": " no"}], {}, "holds NoneType values"),
        (
            [{"id": "a", "prompt": "Paris is the capital of", "completion": " France."}],
            dict(max_length=3),
            "max_length=3",
        ),
        ([], {}, "no rows"),
    ],
)
def test_rows_stage_1_cannot_use_are_refused_before_the_store_is_written(tmp_path, rows, kwargs, message):
    rows = Dataset.from_list(rows) if rows else Dataset.from_dict({"id": [], "prompt": [], "completion": []})
    with pytest.raises(ValueError, match=message):
        compute_prior_inputs(tiny_llama(), tiny_tokenizer(), rows, tmp_path / "store", config=FAST, **kwargs)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(learning_rate=-1.0), "must be >= 0"),
        (dict(wasserstein="sinkhorn", sinkhorn_reg=0.0), "sinkhorn_reg=0.0"),
    ],
)
def test_stage_1_settings_that_cannot_work_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        PriorInputConfig(**settings)


def test_non_finite_prior_inputs_are_never_written(tmp_path, monkeypatch):
    """A stage-1 batch that diverges is refused before its shard is written; the batches before it stay."""
    original = stage1.optimize_prior_inputs
    calls = []

    def diverging(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            result.embeddings[0] = float("nan")
        return result

    monkeypatch.setattr(stage1, "optimize_prior_inputs", diverging)
    with pytest.raises(ValueError, match="non-finite prior inputs"):
        compute_prior_inputs(tiny_llama(), tiny_tokenizer(), dataset(), tmp_path / "store", config=FAST)
    assert len(PriorInputStore(tmp_path / "store").examples) == 2


def test_a_damaged_store_names_the_file_and_the_repair(tmp_path):
    store = compute_prior_inputs(tiny_llama(), tiny_tokenizer(), dataset(), tmp_path / "store", config=FAST)
    shard = store.examples["a"].shard
    tensors = load_file(shard)
    with safe_open(shard, framework="pt") as handle:
        metadata = handle.metadata()
    tensors["a"] = torch.full_like(tensors["a"], float("nan"))
    save_file(tensors, shard, metadata=metadata)
    with pytest.raises(ValueError, match=f"example 'a' in {re.escape(str(shard))} holds NaN"):
        PriorInputStore(tmp_path / "store").load_delta("a")
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(ValueError, match=f"{re.escape(str(shard))} is not a readable shard.*delete it"):
        PriorInputStore(tmp_path / "store")
    shard.write_bytes(b"")
    with pytest.raises(ValueError, match="not a readable shard"):
        PriorInputStore(tmp_path / "store")
    (tmp_path / "store" / "store.json").write_text("{")
    with pytest.raises(ValueError, match="store.json is not valid JSON"):
        PriorInputStore(tmp_path / "store")
