"""TAGITrainer: the hypernetwork's training loss against hand computations (prediction, distillation from teachers
read as plain PEFT LoRAs, parameter matching), what trains, the card, and bad input refused before any work."""

import copy
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import CohereConfig, CohereForCausalLM, GraniteConfig, GraniteForCausalLM, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

from conftest import KEY_DIM, TINY_DECODER, tiny_llama, tiny_tokenizer
from test_tagi import tagi_model
from test_trainer import ROWS, common
from tki_trainer.data.tokenization import tokenize_row
from tki_trainer.evaluation import generate_answers
from tki_trainer.tagi import (
    InstructionLoraConfig,
    TAGIConfig,
    TAGITrainer,
    generate_for,
    generate_lora,
    pretraining_rows,
    teacher_prompt,
    teacher_rows,
    train_teachers,
)


INSTRUCTIONS = {"a": "Complete the sentence.", "b": "Answer the question."}
LAYOUT = "aaabaaab"
"""Three rows of one task to one of the other: a mean over tasks would weigh the two alike, a mean over rows not."""


def rows(layout="abababab"):
    """The tiny rows, each row's task and teacher named by its letter of ``layout``."""
    generator = torch.Generator().manual_seed(5)
    embeddings = {name: torch.randn(KEY_DIM, generator=generator).tolist() for name in INSTRUCTIONS}
    data = []
    for (prompt, completion), teacher in zip(ROWS, layout, strict=True):
        data.append(
            {
                "prompt": prompt,
                "completion": completion,
                "instruction": INSTRUCTIONS[teacher],
                "instruction_embedding": embeddings[teacher],
                "teacher": teacher,
            }
        )
    return Dataset.from_list(data)


def tiny_granite():
    """A tiny Granite: its forward divides the head's logits by ``logits_scaling``."""
    torch.manual_seed(0)
    return GraniteForCausalLM(GraniteConfig(**TINY_DECODER, logits_scaling=4.0)).eval()


def tiny_cohere():
    """A tiny Cohere: its forward multiplies the head's logits by ``logit_scale``."""
    torch.manual_seed(0)
    return CohereForCausalLM(CohereConfig(**TINY_DECODER, logit_scale=0.5)).eval()


def save_teacher(path, seed, base=tiny_llama, **overrides):
    """A plain PEFT LoRA on q/v with every weight random, as SFTTrainer would save a trained one."""
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **overrides})
    model = get_peft_model(base(), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.save_pretrained(path)
    return str(path)


def save_close_teacher(path, task, noise, base=tiny_llama):
    """A plain PEFT LoRA (r 4, alpha 8, as `tagi_model`'s) near the update `tagi_model` generates for ``task``'s
    instruction, so that its matching distance is small enough (about 1) for the sigmoid gate to differ from 1."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base(), config)
    embedding = torch.tensor([next(row["instruction_embedding"] for row in rows() if row["teacher"] == task)])
    generated = generate_lora(tagi_model(base=base), embedding)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module, (lora_a, lora_b) in generated.items():
            layer = model.get_submodule(f"base_model.model.{module}")
            layer.lora_A["default"].weight.copy_(lora_a[0])
            layer.lora_B["default"].weight.copy_(lora_b[0] + noise * torch.randn(lora_b[0].shape, generator=generator))
    model.save_pretrained(path)
    return str(path)


def teachers(tmp_path, base=tiny_llama):
    """Teacher "a" near the update generated for its task (a gate below 1), teacher "b" far (a gate of 1)."""
    return {
        "a": save_close_teacher(tmp_path / "teacher-a", "a", 0.02, base),
        "b": save_teacher(tmp_path / "teacher-b", 2, base, lora_alpha=4),
    }


def tagi_args(tmp_path, **overrides):
    values = common(tmp_path, "tagi", max_steps=1, per_device_train_batch_size=len(ROWS))
    values.update(overrides)
    return TAGIConfig(**values)


def logged(trainer, name):
    return [entry[name] for entry in trainer.state.log_history if name in entry]


def answer_logits(model, prompt, completion, tokenizer):
    """Logits predicting the answer tokens of one row, as an explicit per-row forward."""
    row = tokenize_row(tokenizer, prompt, completion)
    logits = model(input_ids=torch.tensor([row.input_ids])).logits[0]
    return logits[row.prompt_length - 1 : len(row.input_ids) - 1]


@pytest.mark.parametrize("base", [tiny_llama, tiny_granite, tiny_cohere], ids=["llama", "granite", "cohere"])
def test_the_logged_terms_equal_a_per_row_computation_with_plain_peft_teachers(tmp_path, base):
    tokenizer = tiny_tokenizer()
    paths = teachers(tmp_path, base)
    model = tagi_model(base=base)
    before = copy.deepcopy(model)
    trainer = TAGITrainer(
        model,
        args=tagi_args(tmp_path, teachers=paths, kl_weight=1.0, matching_weight=1.0, learning_rate=1e-3),
        train_dataset=rows(LAYOUT),
        processing_class=tokenizer,
    )
    trainer.train()

    data = rows(LAYOUT)
    student_logits, teacher_logits, predictions = [], [], []
    plain = {name: PeftModel.from_pretrained(base(), path).eval() for name, path in paths.items()}
    before.eval()
    with torch.no_grad():
        for row in data:
            embedding = torch.tensor([row["instruction_embedding"]])
            with generate_for(before, embedding):
                student = answer_logits(before, row["prompt"], row["completion"], tokenizer)
            prompt = teacher_prompt(row["prompt"], row["instruction"])
            teacher = answer_logits(plain[row["teacher"]], prompt, row["completion"], tokenizer)
            student_logits.append(student)
            teacher_logits.append(teacher)
            target = tokenize_row(tokenizer, row["prompt"], row["completion"])
            predictions.append(
                F.cross_entropy(student, torch.tensor(target.input_ids[target.prompt_length :]), reduction="sum")
            )
    kl = [
        F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1).mean()
        for s, t in zip(student_logits, teacher_logits)
    ]  # each row's mean over its answer tokens, then the mean over rows
    assert logged(trainer, "loss_kl") == pytest.approx([torch.stack(kl).mean().item()], rel=1e-4)
    tokens = sum(len(s) for s in student_logits)
    assert logged(trainer, "loss_pred") == pytest.approx([(sum(predictions) / tokens).item()], rel=1e-4)

    embeddings = torch.tensor([next(r["instruction_embedding"] for r in data if r["teacher"] == t) for t in "ab"])
    generated = generate_lora(before, embeddings)
    distance = {}
    for task, name in enumerate("ab"):
        weights = load_file(f"{paths[name]}/adapter_model.safetensors")
        scaling = {"a": 8 / 4, "b": 4 / 4}[name]
        distance[name] = torch.zeros(())
        for module, (lora_a, lora_b) in generated.items():
            key = f"base_model.model.{module}"
            update = 2.0 * lora_b[task] @ lora_a[task]  # lora_alpha 8 / r 4
            target = scaling * weights[f"{key}.lora_B.weight"] @ weights[f"{key}.lora_A.weight"]
            distance[name] = distance[name] + ((update - target) ** 2).sum()
    per_row = torch.stack([distance[row["teacher"]] for row in data])  # each row once: 6 of "a", 2 of "b"
    assert 0.1 < torch.sigmoid(distance["a"]) < 0.9 < torch.sigmoid(distance["b"])  # both gates matter
    assert logged(trainer, "loss_match") == pytest.approx([per_row.mean().item()], rel=1e-4)
    assert logged(trainer, "match_gate") == pytest.approx([torch.sigmoid(per_row).mean().item()], rel=1e-4)

    after = dict(trainer.model.named_parameters())
    changed = {name for name, p in before.named_parameters() if not torch.equal(p, after[name])}
    assert changed and all("tagi_hypernet" in name for name in changed)


class ShiftedLlama(LlamaForCausalLM):
    """A decoder whose forward adds a constant to its head's logits, as no model of transformers does."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits + 1.0
        return output


def test_distilling_a_model_whose_logits_are_not_its_heads_is_refused_at_construction(tmp_path):
    def shifted():
        return ShiftedLlama(tiny_llama().config).eval()

    with pytest.raises(ValueError, match="ShiftedLlama makes its logits otherwise"):
        TAGITrainer(
            tagi_model(base=shifted),
            args=tagi_args(tmp_path, teachers=teachers(tmp_path, shifted), kl_weight=1.0),
            train_dataset=rows(),
            processing_class=tiny_tokenizer(),
        )
    TAGITrainer(  # without the KL term no logits are projected
        tagi_model(base=shifted),
        args=tagi_args(tmp_path, teachers=teachers(tmp_path, shifted), kl_weight=0.0, matching_weight=1.0),
        train_dataset=rows(),
        processing_class=tiny_tokenizer(),
    )


def test_evaluation_with_teachers_scores_the_students_prediction_loss(tmp_path):
    trainer = TAGITrainer(
        tagi_model(),
        args=tagi_args(tmp_path, teachers=teachers(tmp_path), gradient_accumulation_steps=2),
        train_dataset=rows(),
        eval_dataset=rows().remove_columns("teacher"),
        processing_class=tiny_tokenizer(),
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] != before and logged(trainer, "loss_kl") and logged(trainer, "loss_match")


def test_without_teachers_the_loss_is_the_students_prediction_loss(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tagi_model()
    before = copy.deepcopy(model).eval()
    trainer = TAGITrainer(
        model,
        args=tagi_args(tmp_path, kl_weight=0, matching_weight=0, activation_checkpointing=True),
        train_dataset=rows().remove_columns("teacher"),
        processing_class=tokenizer,
    )
    trainer.train()
    total, tokens = torch.zeros(()), 0
    with torch.no_grad():
        for row in rows():
            with generate_for(before, torch.tensor([row["instruction_embedding"]])):
                logits = answer_logits(before, row["prompt"], row["completion"], tokenizer)
            target = tokenize_row(tokenizer, row["prompt"], row["completion"])
            total += F.cross_entropy(logits, torch.tensor(target.input_ids[target.prompt_length :]), reduction="sum")
            tokens += len(logits)
    assert logged(trainer, "loss") == pytest.approx([(total / tokens).item()], rel=1e-4)
    assert not logged(trainer, "loss_kl") and not logged(trainer, "loss_match")


def test_instructions_are_encoded_when_the_rows_lack_embeddings_and_the_card_names_the_teachers(tmp_path):
    encoder_dim = 384
    model = get_peft_model(
        tiny_llama(), InstructionLoraConfig(r=4, target_modules=["q_proj", "v_proj"], key_dim=encoder_dim)
    )
    trainer = TAGITrainer(
        model,
        args=tagi_args(tmp_path, kl_weight=0, matching_weight=0),
        train_dataset=rows().remove_columns(["instruction_embedding", "teacher"]),
        processing_class=tiny_tokenizer(),
    )
    assert len(trainer.train_dataset[0]["instruction_embedding"]) == encoder_dim
    trainer.train()
    trainer.save_model()
    trainer.create_model_card()
    card = (tmp_path / "tagi" / "README.md").read_text()
    assert "Adapters generated from instructions (TAGI)" in card and "instructions of 2 tasks" in card


def test_pretraining_rows_split_each_text_in_three_and_skip_short_ones():
    text = " ".join(f"w{i}" for i in range(30))
    data = pretraining_rows([text, "too short"])
    assert len(data) == 1
    row = data[0]
    assert row["instruction"].split() == [f"w{i}" for i in range(10)]
    assert row["prompt"].split() == [f"w{i}" for i in range(10, 20)]
    assert row["completion"] == " " + " ".join(f"w{i}" for i in range(20, 30))
    with pytest.raises(ValueError, match="24 words or more"):
        pretraining_rows(["too short"])


def test_teacher_rows_put_the_instruction_in_the_prompt():
    data = teacher_rows(rows())
    assert data[0]["prompt"] == f"{INSTRUCTIONS['a']}\n\n{ROWS[0][0]}"
    turns = teacher_prompt([{"role": "system", "content": "s"}, {"role": "user", "content": "x"}], "Do it.")
    assert turns[1]["content"] == "Do it.\n\nx" and turns[0]["content"] == "s"


def test_train_teachers_trains_each_teachers_rows_as_sft_trainer_does_and_keeps_saved_ones(tmp_path):
    data, tokenizer = rows(), tiny_tokenizer()
    args = SFTConfig(**common(tmp_path, "teacher-run", max_steps=2))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    paths = train_teachers(tiny_llama, data, args, config, tmp_path / "teachers", tokenizer)
    assert sorted(paths) == ["a", "b"]

    own = data.filter(lambda teacher: teacher == "b", input_columns="teacher")
    reference = SFTTrainer(
        tiny_llama(),
        args=args,
        train_dataset=teacher_rows(own).select_columns(["prompt", "completion"]),
        processing_class=tokenizer,
        peft_config=config,
    )
    reference.train()
    trained = PeftModel.from_pretrained(tiny_llama(), paths["b"])
    expected = {name: p for name, p in reference.model.named_parameters() if "lora_" in name}
    for name, parameter in trained.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(parameter, expected[name])

    def refuse():
        raise AssertionError("a saved teacher was trained again")

    assert train_teachers(refuse, data, args, config, tmp_path / "teachers", tokenizer) == paths
    other_rate = SFTConfig(**common(tmp_path, "teacher-run", max_steps=2, learning_rate=1e-3))
    with pytest.raises(ValueError, match="trained with other training than asked now: delete that directory"):
        train_teachers(refuse, data, other_rate, config, tmp_path / "teachers", tokenizer)
    other_rows = data.map(lambda row: {"completion": row["completion"] + "!"})
    with pytest.raises(ValueError, match="trained with other rows than asked now"):
        train_teachers(refuse, other_rows, args, config, tmp_path / "teachers", tokenizer)
    dora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    with pytest.raises(ValueError, match="uses \\['use_dora'\\]: a teacher is a plain LoRA"):
        train_teachers(refuse, data, args, dora, tmp_path / "other", tokenizer)
    for names in ({"a": "a", "b": "A"}, {"a": "?", "b": "?"}):  # "a" and "A" share a directory, "?" has none
        renamed = data.map(lambda row, names=names: {"teacher": names[row["teacher"]]})
        with pytest.raises(ValueError, match="one directory each"):
            train_teachers(refuse, renamed, args, config, tmp_path / "other", tokenizer)
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(config=LoraConfig(r=4, target_modules=["q_proj"])),
            "peft_config=tki_trainer.tagi.InstructionLoraConfig",
        ),
        (dict(drop="instruction"), "lack ['instruction']"),
        (dict(drop="teacher"), "lack ['teacher']"),
        (dict(teachers={"a": "A"}), "teachers does not hold"),
        (dict(modules=["q_proj"]), "adapt other modules than the instruction-LoRA adapter"),
        (dict(args=dict(teachers=None)), "teachers is None"),
        (dict(args=dict(kl_weight=0, matching_weight=0)), "no term would read them"),
        (dict(args=dict(padding_free=True)), "padding_free"),
        (dict(args=dict(matching_gate="exp")), "matching_gate"),
        (dict(dora=True), "plain LoRA"),
    ],
)
def test_bad_input_is_refused_before_training_with_the_fix(tmp_path, change, message, monkeypatch):
    paths = teachers(tmp_path)
    if "teachers" in change:
        paths = {"a": paths["a"]}
    if "modules" in change:
        paths = {name: save_teacher(tmp_path / f"q-{name}", 3, target_modules=change["modules"]) for name in paths}
    if change.get("dora"):
        paths["a"] = save_teacher(tmp_path / "dora", 5, use_dora=True)
    data = rows()
    if "drop" in change:
        data = data.remove_columns(
            [change["drop"], "instruction_embedding"] if change["drop"] == "instruction" else change["drop"]
        )
    with pytest.raises(ValueError, match=re.escape(message)):
        TAGITrainer(
            tiny_llama(),
            args=tagi_args(tmp_path, **{"teachers": paths, **change.get("args", {})}),
            train_dataset=data,
            processing_class=tiny_tokenizer(),
            peft_config=change.get(
                "config", InstructionLoraConfig(r=4, target_modules=["q_proj", "v_proj"], key_dim=KEY_DIM)
            ),
        )


def test_generated_answers_of_a_mixed_batch_equal_each_rows_own_generation():
    tokenizer, model = tiny_tokenizer(), tagi_model()
    data = rows().select(range(4))
    together = generate_answers(model, tokenizer, data, max_new_tokens=4, batch_size=4)
    alone = [generate_answers(model, tokenizer, data.select([i]), max_new_tokens=4)[0] for i in range(len(data))]
    assert together == alone
    with pytest.raises(ValueError, match="no 'instruction_embedding' column"):
        generate_answers(model, tokenizer, data.remove_columns("instruction_embedding"))


@pytest.mark.slow
def test_the_tagi_recipe_trains_teachers_and_the_hypernetwork_and_resumes(tmp_path):
    path = Path(__file__).parents[1] / "recipes" / "sni_tagi.py"
    spec = importlib.util.spec_from_file_location("sni_tagi", path)
    recipe = importlib.util.module_from_spec(spec)
    sys.modules["sni_tagi"] = recipe
    spec.loader.exec_module(recipe)
    argv = ["--num_train_rows", "24", "--num_eval_prompts", "8", "--teacher_epochs", "1", "--num_train_epochs",
            "1", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    results = recipe.main(argv)
    assert set(results) == {"tagi", "base, instruction in prompt"}
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["prompt_tokens"]["input alone"] < metrics["prompt_tokens"]["instruction + input"]
    teachers = sorted(p.name for p in (tmp_path / "out" / "teachers").iterdir())
    assert len(teachers) > 1 and all(
        (tmp_path / "out" / "teachers" / t / "adapter_model.safetensors").is_file() for t in teachers
    )
    assert recipe.main(argv)["tagi"] == results["tagi"]  # every stage resumed from what the first run left
