import math

import pytest
import torch
from peft import PeftConfig, PeftModel, PeftModelForCausalLM, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from conftest import KEY_DIM, tiny_llama, tki_config, trained_like
from tki_trainer import LatentLoraConfig, TKIModel, export_lora, route
from tki_trainer.retrieval import retrieve
from tki_trainer.tuner import TKILayer


def tki_model(seed=0, **overrides):
    return trained_like(get_peft_model(tiny_llama(seed), tki_config(**overrides)))


def layer_named(model, suffix):
    return next(
        module for name, module in model.named_modules() if name.endswith(suffix) and isinstance(module, TKILayer)
    )


def test_registration_makes_tki_a_peft_type():
    assert PEFT_TYPE_TO_CONFIG_MAPPING["TKI"] is LatentLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["TKI"] is TKIModel
    model = get_peft_model(tiny_llama(), tki_config())
    assert isinstance(model, PeftModelForCausalLM)
    assert isinstance(model.base_model, TKIModel)
    assert model.peft_config["default"].peft_type == "TKI"


def test_bank_initialisation_and_trainability():
    model = get_peft_model(tiny_llama(), tki_config())
    q_proj = layer_named(model, "layers.0.self_attn.q_proj")
    bank_a, bank_b = q_proj.tki_latent_A["default"], q_proj.tki_latent_B["default"]
    assert bank_a.shape == (12, 2 * 32) and bank_b.shape == (12, 2 * 32)
    assert torch.count_nonzero(bank_a) == 0
    bound = 1 / math.sqrt(q_proj.in_features)
    assert bank_b.abs().max() <= bound and bank_b.std() > bound / 3
    assert torch.count_nonzero(q_proj.tki_lora_B["default"].weight) == 0
    assert not hasattr(layer_named(model, "layers.0.self_attn.k_proj").tki_latent_A, "default")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("tki_lora_" in name or "tki_latent_" in name for name in trainable)
    keys = model.base_model.tki_keys["default"]
    assert not keys.requires_grad and keys.shape == (12, KEY_DIM)


def reference_layer_output(layer, x, queries, groups, config):
    """The TKI layer written out per example and per latent task, with retrieval done by hand."""
    keys = torch.nn.functional.normalize(layer._router._keys["default"], dim=1)
    outputs = []
    for i in range(x.shape[0]):
        sims = torch.nn.functional.normalize(queries[i], dim=0) @ keys.T
        group = range(groups[i] * config.keys_per_group, (groups[i] + 1) * config.keys_per_group)
        chosen = sorted(group, key=lambda j: -float(sims[j]))[: config.top_k]
        distances = torch.stack([sims[j].clamp_min(1e-6) for j in chosen])
        y = layer.base_layer(x[i])
        y = y + layer.tki_lora_B["default"](layer.tki_lora_A["default"](x[i])) * layer.scaling["default"]
        for weight, j in zip(distances / distances.sum(), chosen):
            b_j = layer.tki_latent_B["default"][j].view(-1, layer.out_features).T
            a_j = layer.tki_latent_A["default"][j].view(-1, layer.in_features)
            y = y + weight * (x[i] @ a_j.T @ b_j.T) * layer.latent_scaling["default"]
        outputs.append(y)
    return torch.stack(outputs)


def test_blended_layer_equals_per_example_loop_for_outputs_and_gradients(queries):
    model = tki_model()
    config = model.peft_config["default"]
    layer = layer_named(model, "layers.1.self_attn.v_proj")
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(4))
    groups = torch.tensor([2, 0, 1])
    target = torch.randn(3, 5, layer.out_features, generator=torch.Generator().manual_seed(5))

    with route(model, queries, groups):
        vectorised = layer(x)
    (vectorised * target).sum().backward()
    grads = [layer.tki_latent_A["default"].grad.to_dense(), layer.tki_latent_B["default"].grad.to_dense()]
    model.zero_grad()

    reference = reference_layer_output(layer, x, queries, groups.tolist(), config)
    (reference * target).sum().backward()
    torch.testing.assert_close(vectorised, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], layer.tki_latent_A["default"].grad.to_dense(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], layer.tki_latent_B["default"].grad.to_dense(), atol=1e-5, rtol=1e-5)


def test_batch_equals_each_example_alone(queries):
    model = tki_model()
    input_ids = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    groups = torch.tensor([1, 2, 0])
    batch = model(input_ids=input_ids, query_embeddings=queries, group_ids=groups).logits
    for i in range(3):
        alone = model(
            input_ids=input_ids[i : i + 1], query_embeddings=queries[i : i + 1], group_ids=groups[i : i + 1]
        ).logits
        torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    swapped = model(input_ids=input_ids, query_embeddings=queries.flip(0), group_ids=groups.flip(0)).logits
    assert not torch.allclose(batch, swapped, atol=1e-4)


def test_inference_gathers_once_per_routing_and_follows_bank_updates(queries):
    """Without autograd the gathered factors are kept for the routing in force (generation reuses them at every
    token); they match the training path, and an in-place update of the bank is seen at once."""
    model = tki_model()
    input_ids = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    with route(model, queries):
        trained = model(input_ids=input_ids).logits.detach()
        with torch.no_grad():
            first, again = model(input_ids=input_ids).logits, model(input_ids=input_ids[:, :3]).logits
            torch.testing.assert_close(first, trained, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(again, first[:, :3], atol=1e-5, rtol=1e-5)
            layer_named(model, "q_proj").tki_latent_A["default"].add_(0.5)
            assert not torch.allclose(model(input_ids=input_ids).logits, first, atol=1e-4)
    with route(model, queries.flip(0)):
        expected = model(input_ids=input_ids).logits.detach()
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=input_ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_only_retrieved_increments_receive_gradient(queries):
    model = tki_model()
    groups = torch.tensor([0, 0, 2])
    input_ids = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    model(input_ids=input_ids, query_embeddings=queries, group_ids=groups).logits.square().mean().backward()
    keys = model.base_model.tki_keys["default"]
    config = model.peft_config["default"]
    retrieved = set(retrieve(queries, keys, config.num_groups, config.top_k, groups)[0].flatten().tolist())
    for name, parameter in model.named_parameters():
        if "tki_latent_" in name:
            assert parameter.grad.is_sparse
            grad = parameter.grad.to_dense()
            touched = {j for j in range(len(parameter)) if grad[j].abs().sum() > 0}
            assert touched == retrieved, name


def test_activation_checkpointing_routes_recomputed_layers_identically(queries):
    def gradients(checkpointing):
        model = tki_model()
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        input_ids = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(0))
        with route(model, queries, torch.tensor([1, 0, 2])):
            model(input_ids=input_ids).logits.square().mean().backward()
        return {n: p.grad.to_dense() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5)


def test_generate_with_beams_routes_every_expanded_row_with_its_example(queries):
    model = tki_model()
    input_ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(1))
    settings = dict(
        max_new_tokens=4,
        num_beams=2,
        num_return_sequences=2,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    batch = model.generate(input_ids=input_ids, query_embeddings=queries, **settings)
    with route(model, queries):
        in_context = model.generate(input_ids=input_ids, **settings)
    assert torch.equal(batch.sequences, in_context.sequences)
    for i in range(3):
        alone = model.generate(input_ids=input_ids[i : i + 1], query_embeddings=queries[i : i + 1], **settings)
        assert torch.equal(batch.sequences[2 * i : 2 * i + 2], alone.sequences)
        torch.testing.assert_close(
            batch.sequences_scores[2 * i : 2 * i + 2], alone.sequences_scores, atol=1e-5, rtol=1e-5
        )
    other = model.generate(input_ids=input_ids, query_embeddings=queries.roll(1, 0), **settings)
    assert not torch.allclose(batch.sequences_scores, other.sequences_scores, atol=1e-5)


def test_routing_survives_a_distributed_data_parallel_wrapper(queries, tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = tki_model()
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        input_ids = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(0))
        with route(wrapped, queries):
            through_ddp = wrapped(input_ids=input_ids).logits
        torch.testing.assert_close(through_ddp, model(input_ids=input_ids, query_embeddings=queries).logits)
    finally:
        torch.distributed.destroy_process_group()


def test_shared_lora_can_be_switched_off():
    model = get_peft_model(tiny_llama(), tki_config(use_shared_lora=False))
    layers = [m for m in model.modules() if isinstance(m, TKILayer)]
    assert len(layers) == 4
    assert all(len(layer.tki_lora_A) == 0 and "default" in layer.tki_latent_A for layer in layers)


def count_embedding_calls(model):
    calls = []
    model.get_input_embeddings().register_forward_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(query_embeddings=torch.randn(3, KEY_DIM + 1)), "key_dim=16"),
        (dict(query_embeddings=torch.randn(3, KEY_DIM), group_ids=torch.tensor([0, 1, 3])), r"\[0, 3\)"),
        (dict(query_embeddings=torch.randn(2, KEY_DIM)), "one query embedding per example"),
        (dict(query_embeddings=torch.randn(KEY_DIM)), r"\[batch, key_dim\]"),
        (dict(group_ids=torch.tensor([0, 1, 2])), "without query_embeddings"),
        ({}, "no query embeddings were given"),
        (
            dict(query_embeddings=torch.randn(3, KEY_DIM).index_fill_(0, torch.tensor([1]), float("nan"))),
            r"\[1\] hold NaN",
        ),
        (dict(query_embeddings=torch.full((3, KEY_DIM), float("inf"))), r"\[0, 1, 2\] hold NaN or inf"),
    ],
)
def test_bad_routing_is_refused_before_model_work(kwargs, message):
    model = tki_model()
    calls = count_embedding_calls(model)
    with pytest.raises(ValueError, match=message):
        model(input_ids=torch.randint(3, 128, (3, 4)), **kwargs)
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids=torch.randint(3, 128, (3, 4)), max_new_tokens=2, **kwargs)
    assert calls == []


def test_disabled_adapter_needs_no_queries():
    model = tki_model()
    input_ids = torch.randint(3, 128, (2, 4))
    with model.disable_adapter():
        logits = model(input_ids=input_ids).logits
    torch.testing.assert_close(logits, tiny_llama()(input_ids=input_ids).logits)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(top_k=5), "lower top_k or raise keys_per_group"),
        (dict(keys_per_group=20, key_dim=16), "lower keys_per_group"),
        (dict(blend="dot"), "'cosine' or 'softmax'"),
        (dict(latent_target_modules=[]), "latent_target_modules is empty"),
        (dict(num_groups=0), "positive integer"),
    ],
)
def test_bad_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        tki_config(**overrides)


def test_a_bank_that_matches_no_layer_is_refused():
    with pytest.raises(ValueError, match="matches no layer.*q_proj"):
        get_peft_model(tiny_llama(), tki_config(latent_target_modules=["vproj"]))


def test_export_refuses_a_non_finite_query(tmp_path):
    with pytest.raises(ValueError, match="NaN or inf"):
        export_lora(tki_model(), torch.full((KEY_DIM,), float("nan")), tmp_path / "plain")
    assert not (tmp_path / "plain").exists()


def test_merging_is_refused_with_the_export_route():
    with pytest.raises(ValueError, match="export_lora"):
        tki_model().merge_and_unload()


def test_second_adapter_loads_and_routes_with_its_own_bank(tmp_path, queries):
    model = tki_model()
    source = trained_like(get_peft_model(tiny_llama(), tki_config(seed=5, num_groups=2)), seed=9)
    source.save_pretrained(tmp_path / "second")
    model.load_adapter(tmp_path / "second", adapter_name="second")
    model.set_adapter("second")
    input_ids = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        model(input_ids=input_ids, query_embeddings=queries).logits,
        source(input_ids=input_ids, query_embeddings=queries).logits,
    )
    assert PeftConfig.from_pretrained(tmp_path / "second").num_groups == 2
    assert isinstance(PeftModel.from_pretrained(tiny_llama(), tmp_path / "second").base_model, TKIModel)
