"""The instruction-LoRA (TAGI) tuner: generated factors applied per row, trained through the hypernetwork only,
saved and loaded as safetensors, exported as a plain LoRA."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, PeftModelForCausalLM, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from safetensors.torch import load_file, save_file

from conftest import KEY_DIM, tiny_llama
from test_tuner import count_embedding_calls
from tki_trainer.tagi import (
    InstructionLoraConfig,
    InstructionLoraModel,
    export_instruction_lora,
    generate_for,
    generate_lora,
)
from tki_trainer.tagi.tuner import LoraHypernetwork, ModuleSpec


def tagi_config(**overrides) -> InstructionLoraConfig:
    """Rank 4 on q/v with a hypernetwork sized for the tiny model."""
    values = dict(
        r=4,
        lora_alpha=8,
        key_dim=KEY_DIM,
        task_embedding_dim=8,
        layer_embedding_dim=4,
        module_embedding_dim=4,
        hidden_dim=32,
        num_blocks=1,
    )
    values.update(overrides)
    return InstructionLoraConfig(**values)


def tagi_model(seed=0, base=tiny_llama, **overrides):
    """A trained-looking model: every hypernetwork weight random (the untrained heads give every task the zero
    update, which would hide mistakes)."""
    model = get_peft_model(base(), tagi_config(**overrides))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.base_model.tagi_hypernet.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model


def instructions(tasks=2, seed=7):
    return torch.randn(tasks, KEY_DIM, generator=torch.Generator().manual_seed(seed))


def input_ids(rows, seed=0):
    return torch.randint(3, 128, (rows, 6), generator=torch.Generator().manual_seed(seed))


def test_registration_and_an_untrained_adapter_is_the_base_model():
    assert PEFT_TYPE_TO_CONFIG_MAPPING["TAGI"] is InstructionLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["TAGI"] is InstructionLoraModel
    model = get_peft_model(tiny_llama(), tagi_config())
    assert isinstance(model, PeftModelForCausalLM) and isinstance(model.base_model, InstructionLoraModel)
    assert model.peft_config["default"].peft_type == "TAGI"
    ids = input_ids(3)
    logits = model(input_ids=ids, instruction_embeddings=instructions(3)).logits
    torch.testing.assert_close(logits, tiny_llama()(input_ids=ids).logits)
    (lora_a, lora_b), *_ = generate_lora(model, instructions(3)).values()
    assert lora_a.shape == (3, 4, 32) and lora_a.abs().sum() > 0 and torch.count_nonzero(lora_b) == 0


def test_generated_lora_through_the_tuner_equals_the_same_factors_in_a_plain_peft_lora():
    model = tagi_model()
    task = instructions(1)
    factors = generate_lora(model, task)
    assert sorted(factors) == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    plain = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, (lora_a, lora_b) in factors.items():
            layer = plain.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(lora_a[0])
            layer.lora_B["default"].weight.copy_(lora_b[0])
    ids = input_ids(3)
    expected = plain(input_ids=ids).logits
    with generate_for(model, task.expand(3, -1)):
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    other = model(input_ids=ids, instruction_embeddings=instructions(1, seed=8).expand(3, -1)).logits
    assert not torch.allclose(other, expected, atol=1e-3)


def test_a_batch_mixing_two_tasks_equals_two_single_task_batches():
    model = tagi_model()
    tasks = instructions(2)
    ids = input_ids(4)
    mixed = tasks[[0, 1, 1, 0]]
    seen = []
    model.base_model.tagi_hypernet["default"].task_encoder.register_forward_hook(
        lambda module, args, output: seen.append(args[0].shape[0])
    )
    batch = model(input_ids=ids, instruction_embeddings=mixed).logits
    assert seen == [2] * 4  # each of the 4 layers generates for the 2 distinct tasks, not the 4 rows
    for task, rows in ((0, [0, 3]), (1, [1, 2])):
        alone = model(input_ids=ids[rows], instruction_embeddings=tasks[task].expand(2, -1)).logits
        torch.testing.assert_close(batch[rows], alone, atol=1e-5, rtol=1e-5)
    swapped = model(input_ids=ids, instruction_embeddings=tasks[[1, 0, 0, 1]]).logits
    assert not torch.allclose(batch, swapped, atol=1e-3)


def test_inference_generates_once_per_call_and_follows_hypernetwork_updates():
    """Without autograd the whole adapter is generated in one hypernetwork call per distinct task and kept while
    the hypernetwork's weights stay: generation reuses it at every token, beams follow their example."""
    model = tagi_model()
    hypernet = model.base_model.tagi_hypernet["default"]
    calls = []
    hypernet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    tasks = instructions(2)[[0, 1, 0]]
    ids = input_ids(3)
    settings = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False, pad_token_id=0)
    settings.update(output_scores=True, return_dict_in_generate=True)
    batch = model.generate(input_ids=ids, instruction_embeddings=tasks, **settings)
    assert calls == [2]
    for i in range(3):
        alone = model.generate(input_ids=ids[i : i + 1], instruction_embeddings=tasks[i : i + 1], **settings)
        assert torch.equal(batch.sequences[2 * i : 2 * i + 2], alone.sequences)
        torch.testing.assert_close(batch.sequences_scores[2 * i : 2 * i + 2], alone.sequences_scores)
    with generate_for(model, tasks), torch.no_grad():
        first = model(input_ids=ids).logits
        hypernet.heads[0].bias.add_(0.5)
        assert not torch.allclose(model(input_ids=ids).logits, first, atol=1e-4)


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non-reentrant"])
def test_gradient_reaches_every_hypernetwork_weight_and_nothing_else(checkpointing):
    def gradients(checkpointing):
        model = tagi_model()
        model.train()
        if checkpointing:
            reentrant = checkpointing == "reentrant"
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        with generate_for(model, instructions(2)[[0, 1, 1]]):
            model(input_ids=input_ids(3)).logits.square().mean().backward()
        return model, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    model, grads = gradients(checkpointing)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    hypernet = {name for name, _ in model.named_parameters() if ".tagi_hypernet.default." in name}
    assert trainable == hypernet == grads.keys()
    assert all(grad.abs().sum() > 0 for grad in grads.values())
    if checkpointing:
        _, plain = gradients(None)
        for name in plain:
            torch.testing.assert_close(grads[name], plain[name], atol=1e-6, rtol=1e-5)


def saved(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    model = tagi_model()
    model.save_pretrained(tmp_path / "adapter")
    ids, tasks = input_ids(3), instructions(2)[[1, 0, 1]]
    save_file({"input_ids": ids, "instructions": tasks}, tmp_path / "inputs.safetensors")
    return model, ids, tasks


def run_fresh(tmp_path, adapter, mode):
    script = Path(__file__).with_name("tagi_load.py")
    paths = [tmp_path / "base", tmp_path / adapter, tmp_path / "inputs.safetensors", tmp_path / "logits.safetensors"]
    result = subprocess.run([sys.executable, script, *map(str, paths), mode], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(tmp_path / "logits.safetensors")["logits"]


def test_save_then_from_pretrained_in_a_fresh_process_gives_identical_logits(tmp_path):
    model, ids, tasks = saved(tmp_path)
    expected = model(input_ids=ids, instruction_embeddings=tasks).logits
    torch.testing.assert_close(run_fresh(tmp_path, "adapter", "tagi"), expected)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert keys and all(key.startswith("base_model.tagi_hypernet.") and ".default." not in key for key in keys)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    reloaded.load_adapter(tmp_path / "adapter", adapter_name="second")
    reloaded.set_adapter("second")
    torch.testing.assert_close(reloaded(input_ids=ids, instruction_embeddings=tasks).logits, expected)


def test_exported_plain_lora_loads_without_tki_trainer_and_matches_the_generated_adapter(tmp_path):
    model, ids, tasks = saved(tmp_path)
    export_instruction_lora(model, tasks[0], tmp_path / "plain")
    (tmp_path / "inputs.safetensors").unlink()
    save_file({"input_ids": ids}, tmp_path / "inputs.safetensors")
    logits = run_fresh(tmp_path, "plain", "plain")
    expected = model(input_ids=ids, instruction_embeddings=tasks[0].expand(3, -1)).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    other = model(input_ids=ids, instruction_embeddings=tasks[1].expand(3, -1)).logits
    assert not torch.allclose(logits, other, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({}, "no instruction embeddings were given.*generate_for"),
        (dict(instruction_embeddings=torch.randn(3, KEY_DIM + 1)), "key_dim=16.*encoder"),
        (
            dict(instruction_embeddings=torch.randn(3, KEY_DIM).index_fill_(0, torch.tensor([1]), float("nan"))),
            r"rows \[1\] hold NaN or inf.*re-encode",
        ),
        (dict(instruction_embeddings=torch.randn(KEY_DIM)), r"\[batch, key_dim\]"),
        (dict(instruction_embeddings=torch.randn(2, KEY_DIM)), "one instruction embedding per example"),
    ],
)
def test_bad_instructions_are_refused_before_model_work(kwargs, message):
    model = tagi_model()
    calls = count_embedding_calls(model)
    ids = input_ids(3)
    with pytest.raises(ValueError, match=message):
        model(input_ids=ids, **kwargs)
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids=ids, max_new_tokens=2, **kwargs)
    if "instruction_embeddings" in kwargs:
        with pytest.raises(ValueError, match=message):
            with generate_for(model, kwargs["instruction_embeddings"]):
                model(input_ids=ids)
    assert calls == []


def test_disabled_adapter_needs_no_instructions():
    model = tagi_model()
    ids = input_ids(2)
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits)


def test_export_refuses_bad_input_and_merging_points_to_export(tmp_path):
    model = tagi_model()
    with pytest.raises(ValueError, match="NaN or inf"):
        export_instruction_lora(model, torch.full((KEY_DIM,), float("nan")), tmp_path / "plain")
    with pytest.raises(ValueError, match="1-D tensor"):
        export_instruction_lora(model, instructions(2), tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    with pytest.raises(ValueError, match="export_instruction_lora"):
        model.merge_and_unload()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(r=0), "positive integer"),
        (dict(encoder_dim=768), "set key_dim to the encoder's dimension"),
        (dict(target_modules=[]), "target_modules is empty"),
        (dict(hypernet_dropout=1.0), r"\[0, 1\)"),
    ],
)
def test_bad_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        tagi_config(**overrides)


def test_modules_of_one_type_with_different_shapes_are_refused():
    """One head serves each module type (its name without layer numbers), so their shapes must agree."""
    modules = {
        f"blocks.{i}.proj": ModuleSpec.of(f"blocks.{i}.proj", torch.nn.Linear(32, 32 // (i + 1))) for i in (0, 1)
    }
    assert modules["blocks.1.proj"] == ModuleSpec((1,), "blocks.proj", 32, 16)
    with pytest.raises(ValueError, match="different shapes.*exclude_modules"):
        LoraHypernetwork(tagi_config(), modules)
