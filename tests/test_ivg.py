import copy
import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from conftest import KEY_DIM, tiny_llama, tiny_tokenizer, tki_config, trained_like
from tki_trainer import route
from tki_trainer.ivg import (
    AttentionHeads,
    EncodedPrompt,
    InstructionVector,
    IVConfig,
    answered_correctly,
    causal_effects,
    extract_instruction_vector,
    intervene,
)
from tki_trainer.ivg.__main__ import main as cli_main
from tki_trainer.ivg.activations import task_activations
from tki_trainer.ivg.prompts import padded_batch


WORDS = ["Paris", "France", "island", "land", "capital", "answer", "The", "of", "yes", "no"]


def task_rows(tasks=("upper", "echo"), per_task=8):
    outputs = {"upper": lambda w: w.upper(), "echo": lambda w: w, "first": lambda w: w[0]}
    return [{"task": t, "input": w, "output": outputs[t](w)} for t in tasks for w in WORDS[:per_task]]


def small_config(**overrides):
    values = dict(shots=2, activation_prompts=4, effect_prompts=2, correct_top_k=None, top_heads=3, heads_per_batch=3)
    return IVConfig(**{**values, **overrides})


def lora_model():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    return get_peft_model(tiny_llama(), config).eval()


class ForwardCounter:
    """Counts the model's forwards (a hook on the outermost module)."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self.count)

    def count(self, *args):
        self.calls += 1


def recomputed_heads(model, input_ids, layer):
    """Each head's attention output at every position of one unpadded row, [tokens, heads, head_dim], recomputed
    by hand from the layer's input: RMSNorm, projections, rotary embedding, causal softmax, grouped values."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    block = base.model.layers[layer]
    hidden = model(input_ids=input_ids, output_hidden_states=True).hidden_states[layer]
    x = block.input_layernorm(hidden)
    tokens = x.shape[1]
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    dim = config.hidden_size // heads
    q = block.self_attn.q_proj(x).view(1, tokens, heads, dim).transpose(1, 2)
    k = block.self_attn.k_proj(x).view(1, tokens, groups, dim).transpose(1, 2)
    v = block.self_attn.v_proj(x).view(1, tokens, groups, dim).transpose(1, 2)
    cos, sin = base.model.rotary_emb(x, torch.arange(tokens)[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = k.repeat_interleave(heads // groups, 1), v.repeat_interleave(heads // groups, 1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(dim)
    scores = scores.masked_fill(torch.ones(tokens, tokens, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)[0]


def prompts_of(lengths, seed=0, answer=(7, 9, 11)):
    generator = torch.Generator().manual_seed(seed)
    return [
        EncodedPrompt([1] + torch.randint(3, 300, (n - 1,), generator=generator).tolist(), list(answer), i)
        for i, n in enumerate(lengths)
    ]


@torch.no_grad()
@pytest.mark.parametrize("peft", [False, True])
def test_captured_activations_equal_attention_recomputed_by_hand(peft):
    model = lora_model() if peft else tiny_llama()
    heads = AttentionHeads.of(model)
    assert heads.shape == (2, 4, 8)
    prompts = prompts_of([6, 9, 4])
    batch = padded_batch(prompts, 0, torch.device("cpu"))
    with heads.capture(batch["last"]) as capture:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    captured = capture.activations
    assert captured.shape == (3, 2, 4, 8)
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([prompt.prompt_ids])
        for layer in range(2):
            reference = recomputed_heads(model, ids, layer)[-1]
            torch.testing.assert_close(captured[row, layer], reference, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_head_shares_of_the_output_projection_are_its_columns_and_include_lora():
    model = lora_model()
    heads = AttentionHeads.of(model)
    merged = copy.deepcopy(model).merge_and_unload()
    activations = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    weight = merged.model.layers[1].self_attn.o_proj.weight
    by_columns = torch.stack([weight[:, h * 8 : (h + 1) * 8] @ activations[h] for h in range(4)])
    torch.testing.assert_close(heads.project(1, activations), by_columns, atol=1e-5, rtol=1e-4)
    plain = AttentionHeads.of(tiny_llama()).project(1, activations)
    assert not torch.allclose(plain, by_columns, atol=1e-3)


def explicit_effect(model, prompt, layer, head, value, metric="probability", add=False):
    """Patch one head at the last prompt token with a hook written here, rerun the whole sequence, and score."""
    width = len(value)
    sequence = prompt.prompt_ids + (prompt.answer_ids[:-1] if metric == "log_likelihood" else [])
    at = len(prompt.prompt_ids) - 1
    ids = torch.tensor([sequence])

    def score():
        log_probs = model(input_ids=ids).logits[0, at:].float().log_softmax(-1)
        picked = log_probs[torch.arange(len(log_probs)), torch.tensor(prompt.answer_ids[: len(log_probs)])]
        return picked[0].exp() if metric == "probability" else picked.mean()

    def hook(module, args):
        x = args[0].clone()
        piece = x[0, at, head * width : (head + 1) * width]
        x[0, at, head * width : (head + 1) * width] = piece + value if add else value
        return (x,)

    clean = score()
    handle = model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(hook)
    patched = score()
    handle.remove()
    return float(patched - clean)


@torch.no_grad()
@pytest.mark.parametrize(
    "metric, reuse_prefix, add",
    [("probability", True, False), ("probability", False, False), ("log_likelihood", True, True)],
)
def test_causal_effect_of_each_head_equals_an_explicit_patch_and_rerun(metric, reuse_prefix, add):
    model = tiny_llama()
    heads = AttentionHeads.of(model)
    mean = 3 * torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(2))
    prompts = prompts_of([7, 5])
    effects = causal_effects(
        model, heads, prompts, mean, metric=metric, add=add, heads_per_batch=3, reuse_prefix=reuse_prefix
    )
    assert effects.shape == (2, 2, 4)
    for p, prompt in enumerate(prompts):
        for layer in range(2):
            for head in range(4):
                expected = explicit_effect(model, prompt, layer, head, mean[layer, head], metric, add)
                assert effects[p, layer, head].item() == pytest.approx(expected, rel=1e-3, abs=1e-7)
    assert effects.abs().max() > 1e-5


@torch.no_grad()
def test_mean_activation_keeps_exactly_the_prompts_answered_correctly():
    model = tiny_llama()
    heads = AttentionHeads.of(model)
    prompts = prompts_of([5, 8, 6, 4, 7], seed=3)
    captured = []
    for prompt in prompts:
        ids = torch.tensor([prompt.prompt_ids])
        with heads.capture(torch.tensor([ids.shape[1] - 1])) as capture:
            logits = model(input_ids=ids).logits[0, -1]
        captured.append(capture.activations[0])
        top = logits.argmax().item()
        prompt.answer_ids = [top if prompt.query % 2 == 0 else (top + 1) % 300]
    mean, correct = task_activations(model, heads, prompts, pad_token_id=0, batch_size=2, correct_top_k=1)
    assert correct.tolist() == [True, False, True, False, True]
    torch.testing.assert_close(mean, torch.stack([captured[i] for i in (0, 2, 4)]).mean(0), atol=1e-5, rtol=1e-4)
    _, loose = task_activations(model, heads, prompts, pad_token_id=0, batch_size=2, correct_top_k=2)
    assert loose.sum() >= 3


def layer_outputs(model, **inputs):
    """Each decoder layer's output, read by hooks registered now (so after any intervention's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    outputs = {}
    handles = [
        layer.register_forward_hook(lambda module, args, out, i=i: outputs.__setitem__(i, out.clone()))
        for i, layer in enumerate(base.model.layers)
    ]
    logits = model(**inputs).logits
    for handle in handles:
        handle.remove()
    return logits, outputs


@torch.no_grad()
@pytest.mark.parametrize("peft", [False, True])
def test_intervention_adds_scale_times_vector_at_the_chosen_layer_and_last_prompt_token(peft):
    model = lora_model() if peft else tiny_llama()
    batch = padded_batch(prompts_of([6, 9]), 0, torch.device("cpu"))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    vector = torch.randn(32, generator=torch.Generator().manual_seed(4))
    clean_logits, clean = layer_outputs(model, **inputs)
    with intervene(model, vector, 0, scale=0.0):
        zero_logits, _ = layer_outputs(model, **inputs)
    assert torch.equal(zero_logits, clean_logits)
    for layer in (0, 1):
        for positions in (None, torch.tensor([2, 3])):
            with intervene(model, vector, layer, scale=2.5, positions=positions):
                _, edited = layer_outputs(model, **inputs)
                states = model(**inputs, output_hidden_states=True).hidden_states
            where = batch["last"] if positions is None else positions
            expected = clean[layer].clone()
            expected[torch.arange(2), where] += 2.5 * vector
            torch.testing.assert_close(edited[layer], expected)
            for before in range(layer):
                assert torch.equal(edited[before], clean[before])
            if layer == 0:
                torch.testing.assert_close(states[1], expected)
    with intervene(model, vector, 1, scale=-1.0):
        _, removed = layer_outputs(model, **inputs)
    torch.testing.assert_close(
        removed[1][torch.arange(2), batch["last"]], clean[1][torch.arange(2), batch["last"]] - vector
    )


@torch.no_grad()
@pytest.mark.parametrize("peft", [False, True])
def test_answered_correctly_equals_each_prompt_run_alone_with_the_vector_added_by_hand(peft):
    model = lora_model() if peft else tiny_llama()
    prompts = prompts_of([5, 9, 7, 4, 8], seed=3)
    vector = 3 * torch.randn(32, generator=torch.Generator().manual_seed(5))
    for prompt in prompts:  # the answer each prompt should start with: its clean greedy token for some, not others
        logits = model(input_ids=torch.tensor([prompt.prompt_ids])).logits[0, -1]
        prompt.answer_ids[0] = int(logits.argmax()) if prompt.query % 2 == 0 else int(logits.argmin())
    for scale, top_k in ((None, 1), (1.0, 1), (-1.0, 1), (2.0, 50)):
        expected = []
        for prompt in prompts:
            ids = torch.tensor([prompt.prompt_ids])
            _, clean = layer_outputs(model, input_ids=ids)
            if scale is None:
                logits = model(input_ids=ids).logits[0, -1]
            else:
                edited = clean[1].clone()  # the last layer: only the final norm and the head follow it
                edited[0, -1] += scale * vector
                base = model.get_base_model() if peft else model
                logits = base.lm_head(base.model.norm(edited))[0, -1]
            expected.append(int((logits > logits[prompt.answer_ids[0]]).sum()) < top_k)
        vector_kwargs = {} if scale is None else {"vector": vector, "layer": 1, "scale": scale}
        right = answered_correctly(model, prompts, pad_token_id=0, top_k=top_k, batch_size=2, **vector_kwargs)
        assert right.tolist() == expected
    assert answered_correctly(model, prompts, pad_token_id=0, vector=vector, layer=1, scale=0.0).tolist() == [
        True,
        False,
        True,
        False,
        True,
    ]
    with pytest.raises(ValueError, match="needs its layer"):
        answered_correctly(model, prompts, pad_token_id=0, vector=vector)


def greedy_by_hand(model, ids, steps, add_at):
    """Greedy decoding by full reruns, adding the vector with a hook written here at the positions ``add_at``
    gives for each length."""
    for _ in range(steps):
        at = add_at(ids.shape[1])
        logits = model(input_ids=ids).logits if at is None else at(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@torch.no_grad()
@pytest.mark.parametrize("generated_tokens", [False, True])
def test_intervention_under_generate_adds_at_the_prompts_last_token(generated_tokens):
    model = tiny_llama()
    ids = torch.tensor([prompts_of([6], seed=5)[0].prompt_ids])
    vector = 20 * torch.randn(32, generator=torch.Generator().manual_seed(6))
    layer, start = 0, ids.shape[1] - 1

    def run_with(positions):
        def hook(module, args, out):
            out = out.clone()
            out[:, positions] += vector
            return out

        def forward(x):
            handle = model.model.layers[layer].register_forward_hook(hook)
            try:
                return model(input_ids=x).logits
            finally:
                handle.remove()

        return forward

    def add_at(length):
        return run_with(list(range(start, length)) if generated_tokens else [start])

    expected = greedy_by_hand(model, ids, 5, add_at)
    with intervene(model, vector, layer, generated_tokens=generated_tokens):
        generated = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generated.tolist() == expected.tolist()
    plain = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert plain.tolist() != generated.tolist()
    with intervene(model, vector, layer, scale=0.0):
        assert (
            model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0).tolist() == plain.tolist()
        )


def test_instruction_vector_round_trip_is_safetensors_and_json(tmp_path):
    vector = InstructionVector(
        vectors=torch.randn(2, 32, generator=torch.Generator().manual_seed(7)),
        tasks=["upper", "echo"],
        layer=1,
        heads=[(1, 3), (0, 2)],
        head_effects=[0.5, 0.25],
        provenance={"model": "tiny", "settings": {"shots": 2}},
    )
    vector.save(tmp_path / "iv")
    assert sorted(p.name for p in (tmp_path / "iv").iterdir()) == [
        "instruction_vector.json",
        "instruction_vector.safetensors",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["iv"]
    json.loads((tmp_path / "iv" / "instruction_vector.json").read_text())
    loaded = InstructionVector.load(tmp_path / "iv")
    assert torch.equal(loaded.vectors, vector.vectors)
    assert (loaded.tasks, loaded.layer, loaded.heads, loaded.head_effects, loaded.provenance) == (
        vector.tasks,
        vector.layer,
        vector.heads,
        vector.head_effects,
        vector.provenance,
    )
    assert torch.equal(loaded.vector("echo"), vector.vectors[1])
    model = tiny_llama()
    ids = torch.tensor([[1, 5, 6, 7]])
    with loaded.intervention(model, "echo", scale=0.0):
        assert torch.equal(model(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits)


def stored(directory, stage):
    tensors = {}
    for path in sorted((directory / "tasks").glob(f"{stage}-*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            tensors[json.loads(handle.metadata()["metadata"])["task"]] = {
                k: handle.get_tensor(k) for k in handle.keys()
            }
    return tensors


@torch.no_grad()
def test_extraction_builds_the_vector_from_stored_task_results_and_resumes(tmp_path):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    config = small_config()
    vector = extract_instruction_vector(model, tokenizer, task_rows(), config, output_dir=tmp_path)
    activations, effects = stored(tmp_path, "activations"), stored(tmp_path, "effects")
    assert sorted(activations) == sorted(effects) == ["echo", "upper"] == sorted(vector.tasks)
    assert all(a["correct"].tolist() == [True] * 4 for a in activations.values())
    assert all(e["effects"].shape == (2, 2, 4) for e in effects.values())

    mean_effect = torch.stack([effects[t]["effects"].mean(0) for t in ("upper", "echo")]).mean(0)
    ranked = sorted(((mean_effect[i, h].item(), (i, h)) for i in range(2) for h in range(4)), reverse=True)
    assert vector.heads == [pair for _, pair in ranked[:3]]
    assert vector.head_effects == pytest.approx([value for value, _ in ranked[:3]])
    for task in vector.tasks:
        by_hand = sum(
            model.model.layers[i].self_attn.o_proj.weight[:, h * 8 : (h + 1) * 8] @ activations[task]["mean"][i, h]
            for i, h in vector.heads
        )
        torch.testing.assert_close(vector.vector(task), by_hand, atol=1e-5, rtol=1e-4)
    assert vector.layer == 0 and vector.provenance["tasks"]["upper"] == {
        "prompts": 4,
        "correct": 4,
        "effect_prompts": 2,
    }
    loaded = InstructionVector.load(tmp_path)
    assert torch.equal(loaded.vectors, vector.vectors) and loaded.heads == vector.heads

    counter = ForwardCounter(model)
    again = extract_instruction_vector(model, tokenizer, task_rows(), small_config(top_heads=2), output_dir=tmp_path)
    assert counter.calls == 0 and again.heads == vector.heads[:2]
    extract_instruction_vector(model, tokenizer, task_rows(), small_config(effect_prompts=1), output_dir=tmp_path)
    assert counter.calls > 0 and len(stored(tmp_path, "activations")) == 2
    with pytest.raises(ValueError, match="another output_dir"):
        extract_instruction_vector(tiny_llama(seed=1), tokenizer, task_rows(), config, output_dir=tmp_path)


@torch.no_grad()
def test_extraction_with_given_heads_skips_effects_and_leaves_out_tasks_never_answered():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    counter = ForwardCounter(model)
    vector = extract_instruction_vector(model, tokenizer, task_rows(), small_config(heads=[(1, 2), (0, 1)]))
    assert vector.heads == [(1, 2), (0, 1)] and vector.head_effects is None
    assert counter.calls == 2  # one activation batch per task, no causal-effect forwards
    with pytest.raises(ValueError, match="correct_top_k"):
        extract_instruction_vector(model, tokenizer, task_rows(), small_config(correct_top_k=1))


@torch.no_grad()
def test_peft_model_extraction_equals_the_merged_model():
    model, tokenizer = lora_model(), tiny_tokenizer()
    merged = copy.deepcopy(model).merge_and_unload()
    from_peft = extract_instruction_vector(model, tokenizer, task_rows(), small_config())
    from_merged = extract_instruction_vector(merged, tokenizer, task_rows(), small_config())
    assert from_peft.heads == from_merged.heads
    torch.testing.assert_close(from_peft.vectors, from_merged.vectors, atol=1e-4, rtol=1e-3)


def test_cli_extracts_into_output_dir(tmp_path, monkeypatch, capsys):
    data = tmp_path / "tasks.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in task_rows()))
    monkeypatch.setattr("tki_trainer.ivg.__main__.load_embedded_model", lambda: (tiny_llama(), tiny_tokenizer()))
    cli_main(
        ["--data", str(data), "--output_dir", str(tmp_path / "iv"), "--shots", "2", "--activation_prompts", "3"]
        + ["--correct_top_k", "none", "--heads", "1:0,0:3", "--layer", "1"]
    )
    vector = InstructionVector.load(tmp_path / "iv")
    assert vector.heads == [(1, 0), (0, 3)] and vector.layer == 1 and vector.tasks == ["upper", "echo"]
    assert json.loads(capsys.readouterr().out)["heads"] == [[1, 0], [0, 3]]


BAD_EXTRACTIONS = {
    "empty task set": ([], {}, "no rows"),
    "layer out of range": (task_rows(), {"layer": 7}, "2 decoder layers"),
    "too few examples": (task_rows(per_task=2), {}, "Lower IVConfig.shots"),
    "missing column": ([{"task": "t", "prompt": "a", "output": "b"}] * 4, {}, "input_column"),
    "head out of range": (task_rows(), {"heads": [(0, 9)]}, "not in this model"),
    "empty output": ([{"task": "t", "input": w, "output": w[4:]} for w in WORDS], {}, "empty output"),
}


@pytest.mark.parametrize("case", list(BAD_EXTRACTIONS))
def test_bad_extraction_input_raises_before_any_forward(case):
    rows, overrides, message = BAD_EXTRACTIONS[case]
    model = tiny_llama()
    counter = ForwardCounter(model)
    with pytest.raises(ValueError, match=message):
        extract_instruction_vector(model, tiny_tokenizer(), rows, small_config(**overrides))
    assert counter.calls == 0


@pytest.mark.parametrize(
    "vector, layer, scale, message",
    [
        (torch.zeros(32), 2, 1.0, r"pass an index in 0\.\.1"),
        (torch.zeros(16), 0, 1.0, "hidden size is 32"),
        (torch.full((32,), float("nan")), 0, 1.0, "NaN"),
        (torch.zeros(32), 0, float("nan"), "finite"),
    ],
)
def test_bad_intervention_raises_before_any_forward(vector, layer, scale, message):
    model = tiny_llama()
    counter = ForwardCounter(model)
    with pytest.raises(ValueError, match=message):
        with intervene(model, vector, layer, scale=scale):
            model(input_ids=torch.tensor([[1, 2, 3]]))
    assert counter.calls == 0


def test_bad_settings_and_vectors_are_refused():
    with pytest.raises(ValueError, match="at least 1"):
        IVConfig(shots=0)
    with pytest.raises(ValueError, match="effect_metric"):
        IVConfig(effect_metric="nll")
    with pytest.raises(ValueError, match="NaN"):
        InstructionVector(torch.full((1, 32), float("nan")), ["t"], 0, [(0, 0)])
    with pytest.raises(ValueError, match="name one of"):
        InstructionVector(torch.zeros(2, 32), ["a", "b"], 0, [(0, 0)]).vector()


@pytest.mark.slow
@torch.no_grad()
def test_embedded_smollm2_capture_effects_and_intervention():
    from tki_trainer import load_embedded_model

    model, tokenizer = load_embedded_model()
    model.eval()
    heads = AttentionHeads.of(model)
    assert heads.shape == (30, 9, 64)
    ids = tokenizer("Q: hot\nA: cold\n\nQ: up\nA: down\n\nQ: big\nA:")["input_ids"]
    with heads.capture(torch.tensor([len(ids) - 1])) as capture:
        model(input_ids=torch.tensor([ids]))
    for layer in (0, 17):
        reference = recomputed_heads(model, torch.tensor([ids]), layer)[-1]
        torch.testing.assert_close(capture.activations[0, layer], reference, atol=1e-4, rtol=1e-3)
    prompt = EncodedPrompt(ids, tokenizer(" small", add_special_tokens=False)["input_ids"], 0)
    mean = capture.activations[0].float()
    effects = causal_effects(model, heads, [prompt], mean * 2, heads_per_batch=135)
    for layer, head in ((3, 1), (20, 8)):
        expected = explicit_effect(model, prompt, layer, head, 2 * mean[layer, head])
        assert effects[0, layer, head].item() == pytest.approx(expected, rel=1e-2, abs=1e-6)
    vector = torch.randn(576, generator=torch.Generator().manual_seed(0))
    _, clean = layer_outputs(model, input_ids=torch.tensor([ids]))
    with intervene(model, vector, 10, scale=3.0):
        _, edited = layer_outputs(model, input_ids=torch.tensor([ids]))
    expected = clean[10].clone()
    expected[0, -1] += 3 * vector
    torch.testing.assert_close(edited[10], expected)


@torch.no_grad()
def test_answered_correctly_routes_each_prompt_of_a_latent_bank_model_by_its_query():
    model = trained_like(get_peft_model(tiny_llama(), tki_config())).eval()
    for name, parameter in model.named_parameters():
        if "tki_" in name:
            parameter.mul_(10)  # a bank strong enough that another route changes the greedy token
    prompts = prompts_of([5, 9, 7, 4, 8], seed=3)
    queries = torch.randn(len(prompts), KEY_DIM, generator=torch.Generator().manual_seed(2))
    for i, prompt in enumerate(prompts):  # each prompt's answer: its greedy token under its own route
        with route(model, queries[i : i + 1]):
            prompt.answer_ids[0] = int(model(input_ids=torch.tensor([prompt.prompt_ids])).logits[0, -1].argmax())
    assert answered_correctly(model, prompts, pad_token_id=0, query_embeddings=queries, batch_size=2).all()
    swapped = answered_correctly(model, prompts, pad_token_id=0, query_embeddings=queries.flip(0), batch_size=2)
    assert not swapped.all()  # routed by another prompt's query, some answers change
    with pytest.raises(ValueError, match="give one per prompt"):
        answered_correctly(model, prompts, pad_token_id=0, query_embeddings=queries[:2])
    with pytest.raises(ValueError, match="top 1 or more"):
        answered_correctly(model, prompts, pad_token_id=0, top_k=0)
