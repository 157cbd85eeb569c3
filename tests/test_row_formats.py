"""TKITrainer on every row format SFTTrainer trains on: without an adapter nobody asked for, with ``kr`` decided from
the rows when unset, and without crashing on pretokenized, formatted, non-ChatML, tool-call, per-row chat-template or
streamed rows."""

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset, IterableDataset
from peft import LoraConfig, PeftModel
from transformers import TrainingArguments
from trl import SFTConfig, SFTTrainer

from conftest import KEY_DIM, tiny_llama, tiny_tokenizer, tki_config
from test_trainer import common
from tki_trainer import TKIConfig, TKITrainer
from tki_trainer.data.formats import with_ids
from tki_trainer.data.queries import row_query_text
from tki_trainer.data.tokenization import tokenize_row


TEXT = Dataset.from_list([{"text": "The island is an island of land."}, {"text": "Paris is the capital of France."}])
PROMPT_COMPLETION = Dataset.from_list(
    [
        {"prompt": "The island is", "completion": " land."},
        {"prompt": "Paris is the capital of", "completion": " France."},
    ]
)

TOOL_TEMPLATE = (
    "{% set loud = shout is defined and shout %}{% for m in messages %}<s>{{ m['role'] | upper if loud else m['role'] }}"
    "\n{% if m['tool_calls'] %}{{ m['tool_calls'] | tojson }}{% else %}{{ m['content'] }}{% endif %}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>{{ 'ASSISTANT' if loud else 'assistant' }}\n{% endif %}"
)
"""Renders tool calls, and upper-case roles under ``shout=True`` (a per-row chat-template argument)."""


def args(name, tmp_path, **overrides):
    settings = {"max_steps": 2, "query_encoder": "embedded", "prior_inputs_steps": 1, **overrides}
    return TKIConfig(**common(tmp_path, name, **settings))


def lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")


def losses(trainer):
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def tool_call_rows():
    """Conversations whose answer is a tool call (no content), each rendered under its own template arguments."""
    call = [{"type": "function", "function": {"name": "capital", "arguments": {"country": "France"}}}]
    rows = []
    for question, shout in [("Which is the capital of France?", False), ("Where is Paris?", True)]:
        messages = [
            {"role": "user", "content": question, "tool_calls": None},
            {"role": "assistant", "content": None, "tool_calls": call},
        ]
        rows.append({"messages": messages, "chat_template_kwargs": {"shout": shout}, "tools": json.dumps([])})
    return Dataset.from_list(rows * 2)


def tool_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TOOL_TEMPLATE
    return tokenizer


def test_switched_off_it_trains_every_parameter_like_sft_trainer(tmp_path):
    sft = SFTTrainer(tiny_llama(), args=SFTConfig(**common(tmp_path, "sft", max_steps=2)), train_dataset=TEXT,
                     processing_class=tiny_tokenizer())  # fmt: skip
    tki = TKITrainer(tiny_llama(), args=args("tki", tmp_path, lta=False, kr=False, pcgrad=False), train_dataset=TEXT,
                     processing_class=tiny_tokenizer())  # fmt: skip
    assert not isinstance(tki.model, PeftModel)
    before = {n: p.detach().clone() for n, p in tki.model.named_parameters()}
    assert all(p.requires_grad for p in tki.model.parameters())
    sft.train()
    tki.train()
    assert losses(tki) == pytest.approx(losses(sft), rel=1e-6)
    assert all(not torch.equal(before[n], p) for n, p in tki.model.named_parameters())


def test_lta_without_a_peft_config_on_a_plain_model_is_refused_naming_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"peft_config=LatentLoraConfig\(\.\.\.\) or a peft\.LoraConfig.*lta=False"):
        TKITrainer(tiny_llama(), args=args("x", tmp_path), train_dataset=TEXT, processing_class=tiny_tokenizer())


def test_training_arguments_are_taken_as_sft_trainer_takes_them(tmp_path):
    plain = TrainingArguments(output_dir=str(tmp_path / "plain"), report_to="none", use_cpu=True, max_steps=1)
    rows = PROMPT_COMPLETION.add_column("query_embedding", torch.eye(2, KEY_DIM).tolist())  # no encoder offline
    trainer = TKITrainer(tiny_llama(), args=plain, train_dataset=rows, processing_class=tiny_tokenizer(),
                         peft_config=tki_config())  # fmt: skip
    assert isinstance(trainer.args, TKIConfig) and trainer.args.max_steps == 1
    assert (trainer.args.lta, trainer.args.kr, trainer.args.pcgrad) == (True, True, True)


@pytest.mark.parametrize(
    "rows,overrides,expected",
    [
        (TEXT, {}, False),
        (TEXT.map(lambda row: tiny_tokenizer()(row["text"]), remove_columns="text"), {}, False),
        (PROMPT_COMPLETION, {}, True),
        (PROMPT_COMPLETION, {"neftune_noise_alpha": 5.0}, False),
        (PROMPT_COMPLETION, {"completion_only_loss": False}, False),
    ],
)
def test_kr_left_unset_is_decided_from_the_rows_and_settings(tmp_path, rows, overrides, expected):
    given = args("auto", tmp_path, lta=False, **overrides)
    trainer = TKITrainer(tiny_llama(), args=given, train_dataset=rows, processing_class=tiny_tokenizer(),
                         peft_config=lora())  # fmt: skip
    assert trainer.args.kr is expected and given.kr is None
    assert (Path(given.output_dir, "_tki_cache", "prior_inputs", "store.json").is_file()) is expected
    trainer.train()
    assert ("loss_reinst" in trainer.state.log_history[0]) is expected


def test_kr_true_where_it_cannot_train_stays_a_refusal(tmp_path):
    with pytest.raises(ValueError, match="language-modelling \\('text'\\) rows.*kr=False"):
        TKITrainer(tiny_llama(), args=args("x", tmp_path, lta=False, kr=True), train_dataset=TEXT,
                   processing_class=tiny_tokenizer(), peft_config=lora())  # fmt: skip
    with pytest.raises(ValueError, match="neftune_noise_alpha=None"):
        args("x", tmp_path, kr=True, neftune_noise_alpha=5.0)


def test_every_row_format_gets_distinct_ids_from_all_its_columns():
    tokenizer = tiny_tokenizer()
    pretokenized = TEXT.map(lambda row: tokenizer(row["text"]), remove_columns="text")
    conversations = Dataset.from_list(
        [
            {"conversations": [{"from": "user", "value": t}, {"from": "assistant", "value": "yes"}]}
            for t in TEXT["text"]
        ]
    )
    for rows in (pretokenized, conversations, tool_call_rows()):
        ids = with_ids(rows)["id"]
        assert len(set(ids)) == len(ids) == len(rows)
    assert with_ids(pretokenized)["id"] == with_ids(pretokenized)["id"]


def test_query_text_is_what_the_model_reads_before_its_answer():
    tokenizer = tiny_tokenizer()
    conversation = [{"from": "user", "value": "Is land an island?"}, {"from": "assistant", "value": "no"}]
    assert row_query_text({"conversations": conversation}) == "Is land an island?"
    assert row_query_text(tokenizer("Paris is land.").data, tokenizer=tokenizer) == "Paris is land."
    assert row_query_text({"body": "x y"}, text_field="body") == "x y"
    tool_turns = tool_call_rows()[0]["messages"]
    text = row_query_text(
        {"messages": [*tool_turns, {"role": "tool", "content": "Paris"}, {"role": "assistant", "content": "Paris."}]}
    )
    assert text.startswith("Which is the capital of France?\n") and '"capital"' in text and text.endswith("Paris")


@pytest.mark.parametrize("name", ["pretokenized", "formatting_func", "conversations"])
def test_lta_routes_rows_of_every_format(tmp_path, name):
    tokenizer = tiny_tokenizer()
    extra = {}
    if name == "pretokenized":
        rows = TEXT.map(lambda row: tokenizer(row["text"]), remove_columns="text")
    elif name == "formatting_func":
        rows = PROMPT_COMPLETION.rename_columns({"prompt": "question", "completion": "answer"})
        extra = {"formatting_func": lambda row: f"Q: {row['question']} A:{row['answer']}"}
    else:
        rows = Dataset.from_list(
            [{"conversations": [{"from": "user", "value": p}, {"from": "assistant", "value": c}]} for p, c in
             zip(PROMPT_COMPLETION["prompt"], PROMPT_COMPLETION["completion"])]
        )  # fmt: skip
    trainer = TKITrainer(tiny_llama(), args=args(name, tmp_path), train_dataset=rows, processing_class=tokenizer,
                         peft_config=lora(), **extra)  # fmt: skip
    assert trainer.args.kr is (name == "conversations")
    trainer.train()
    assert "latent_usage_entropy" in trainer.state.log_history[0]


def test_tool_call_turns_and_per_row_template_arguments_reach_stage_1_and_the_store(tmp_path):
    tokenizer = tool_tokenizer()
    trainer = TKITrainer(tiny_llama(), args=args("tools", tmp_path), train_dataset=tool_call_rows(),
                         processing_class=tokenizer, peft_config=lora())  # fmt: skip
    store = Path(trainer.args.output_dir, "_tki_cache", "prior_inputs", "store.json")
    assert trainer.args.kr and store.is_file()  # the store checked every prompt's tokens at construction
    rows = trainer.train_dataset
    shouted = [row for row in rows if row["chat_template_kwargs"]["shout"]]
    assert shouted and all(tokenizer.decode(row["input_ids"]).startswith("<s>USER") for row in shouted)
    row = shouted[0]
    expected = tokenize_row(tokenizer, row["prompt"], row["completion"], tools=[], shout=True)
    assert row["input_ids"] == expected.input_ids
    trainer.train()
    assert "loss_reinst" in trainer.state.log_history[0]


def test_streamed_rows_are_routed_as_they_stream_and_refused_for_kr(tmp_path):
    def stream():
        yield from PROMPT_COMPLETION

    rows = IterableDataset.from_generator(stream)
    saving = {"save_strategy": "steps", "save_steps": 1}  # a checkpoint writes the card, which counts the rows
    trainer = TKITrainer(tiny_llama(), args=args("stream", tmp_path, **saving), train_dataset=rows,
                         processing_class=tiny_tokenizer(), peft_config=lora())  # fmt: skip
    assert trainer.args.kr is False
    trainer.train()
    assert "latent_usage_entropy" in trainer.state.log_history[0]
    assert "streamed rows" in Path(trainer.args.output_dir, "README.md").read_text()
    with pytest.raises(ValueError, match="streaming IterableDataset.*kr=False"):
        TKITrainer(tiny_llama(), args=args("x", tmp_path, kr=True), train_dataset=rows,
                   processing_class=tiny_tokenizer(), peft_config=lora())  # fmt: skip
