import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from conftest import tiny_llama, tiny_tokenizer
from tki_trainer.data import (
    FitReport,
    add_query_embeddings,
    balanced_subset,
    fit_prompts,
    fitted_subset,
    load_bigbench,
    load_local,
    load_p3,
    load_sni,
    messages_to_prompt_completion,
    sni_splits,
    tokenize_row,
)
from tki_trainer.data.formats import check_prompt_completion_rows
from tki_trainer.data.queries import query_text


FIXTURES = Path(__file__).parent / "fixtures"


def test_p3_rows_keep_prompt_and_completion_as_published():
    rows = [json.loads(line) for line in (FIXTURES / "p3_sample.jsonl").read_text().splitlines()]
    dataset = load_p3(FIXTURES / "p3_sample.jsonl")
    by_id = {row["id"]: row for row in dataset}
    for row in rows:
        assert by_id[row["id"]]["prompt"] == row["prompt"]
        assert by_id[row["id"]]["completion"] == row["completion"]
    assert load_p3(FIXTURES / "p3_sample.jsonl", clusters=["structure_to_text"])["id"] == [
        "bfe32b42cdd13a2e",
        "c3f764ba6f86b93c",
    ]
    conversational = load_p3(FIXTURES / "p3_sample.jsonl", limit=2, seed=3, conversational=True)
    assert conversational[0]["prompt"] == [{"role": "user", "content": by_id[conversational[0]["id"]]["prompt"]}]
    assert conversational[0]["completion"][0]["role"] == "assistant"
    with pytest.raises(ValueError, match="Unknown P3 clusters"):
        load_p3(FIXTURES / "p3_sample.jsonl", clusters=["nope"])


def test_sni_prompt_is_definition_examples_then_instance():
    dataset = load_sni(FIXTURES / "sni", ["task900_capitals"], max_instances=3, num_positive=2, seed=0)
    assert len(dataset) == 3
    row = dataset[0]
    country, capital = {
        "task900-0": ("Italy", "Rome"),
        "task900-1": ("Kenya", "Nairobi"),
        "task900-2": ("Chile", "Santiago"),
        "task900-3": ("Egypt", "Cairo"),
    }[row["id"]]
    assert row["prompt"] == (
        "Definition: Given a country, answer with its capital city.\n\n"
        "Positive Example 1 -\nInput: France\nOutput: Paris\n\n"
        "Positive Example 2 -\nInput: Japan\nOutput: Tokyo\n\n"
        f"Now complete the following example -\nInput: {country}\nOutput: "
    )
    assert row["completion"] == capital and row["references"] == [capital, capital.lower()]
    assert load_sni(FIXTURES / "sni", ["task900_capitals"], max_instances=3, seed=0)["id"] == dataset["id"]


def test_sni_validation_tasks_are_a_seeded_cut_of_the_train_list():
    splits = sni_splits(FIXTURES / "sni", num_validation=1, seed=0)
    assert splits["test"] == ["task901_yesno"]
    assert len(splits["validation"]) == 1 and splits["validation"][0] not in splits["train"]
    assert sorted(splits["train"] + splits["validation"]) == ["task900_capitals", "task902_unused", "task903_unused"]
    assert sni_splits(FIXTURES / "sni", num_validation=1, seed=0) == splits


def test_bigbench_multiple_choice_and_generative_prompts():
    dataset = load_bigbench(FIXTURES / "bigbench", ["toy_choice", "toy_generate"])
    rows = {row["id"]: row for row in dataset}
    assert rows["toy_choice-1"]["prompt"] == "Q: Pick a prime.\n  choice: 4\n  choice: 7\n  choice: 9\nA: "
    assert rows["toy_choice-1"]["completion"] == "7" and rows["toy_choice-1"]["references"] == ["7"]
    assert rows["toy_generate-1"]["prompt"] == "Reverse the word.\nWord: abc\nReversed: "
    assert rows["toy_generate-1"]["references"] == ["cba", "c b a"]
    with pytest.raises(ValueError, match="not found"):
        load_bigbench(FIXTURES / "bigbench", ["missing_task"])


def test_local_messages_are_split_at_the_last_assistant_turn(tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    row = load_local(path)[0]
    assert row["prompt"] == messages[:4] and row["completion"] == messages[4:]
    assert len(row["id"]) == 16 and load_local(path)[0]["id"] == row["id"]
    with pytest.raises(ValueError, match="assistant turn"):
        messages_to_prompt_completion({"messages": messages[:2]})


def trl_prepared(dataset, tokenizer, max_length=None):
    """What SFTTrainer itself makes of the rows: (input_ids, labels) per row."""
    args = SFTConfig(
        output_dir="unused", bf16=False, use_cpu=True, max_length=max_length, report_to="none", dataset_num_proc=None
    )
    trainer = SFTTrainer(model=tiny_llama(), args=args, train_dataset=dataset, processing_class=tokenizer)
    return (
        {row["id"]: row for row in trainer.train_dataset}
        if "id" in trainer.train_dataset.column_names
        else list(trainer.train_dataset)
    )


@pytest.mark.parametrize("conversational", [False, True])
def test_prompt_span_equals_trls_tokenization_even_when_tokens_merge_at_the_boundary(conversational):
    tokenizer = tiny_tokenizer()
    rows = [("The island is", "land."), ("Paris is the", " capital of France."), ("Answer:", " yes")]
    if conversational:
        rows = [([{"role": "user", "content": p}], [{"role": "assistant", "content": c}]) for p, c in rows]
    dataset = Dataset.from_list([{"prompt": p, "completion": c} for p, c in rows])
    prepared = trl_prepared(dataset, tokenizer)
    for (prompt, completion), trl_row in zip(rows, prepared):
        ours = tokenize_row(tokenizer, prompt, completion)
        assert ours.input_ids == trl_row["input_ids"]
        first_label = next(i for i, label in enumerate(trl_row["labels"]) if label != -100)
        assert ours.prompt_length == first_label
    if not conversational:
        merged = tokenize_row(tokenizer, "The island is", "land.")
        alone = tokenizer("The island is")["input_ids"]
        assert merged.prompt_length < len(alone)


def test_left_truncation_keeps_the_end_of_the_prompt_and_the_whole_completion():
    tokenizer = tiny_tokenizer()
    long_prompt = "The island is an island of land. " * 6 + "Paris is the capital of"
    dataset = Dataset.from_list(
        [
            {"id": "long", "prompt": long_prompt, "completion": " France."},
            {"id": "short", "prompt": "Answer:", "completion": " yes"},
            {"id": "hopeless", "prompt": "Answer:", "completion": " yes" * 40},
        ]
    )
    fitted, report = fit_prompts(dataset, tokenizer, max_length=20)
    assert (report.kept, report.truncated, report.dropped) == (1, 1, 1)
    rows = {row["id"]: row for row in fitted}
    assert rows["short"]["prompt"] == "Answer:"
    cut = rows["long"]["prompt"]
    assert long_prompt.endswith(cut) and len(cut) < len(long_prompt)
    assert len(tokenize_row(tokenizer, cut, " France.").input_ids) <= 20
    longer = long_prompt[len(long_prompt) - len(cut) - 4 :]
    assert len(tokenize_row(tokenizer, longer, " France.").input_ids) > 20
    assert rows["long"]["completion"] == " France."
    dropped, report = fit_prompts(dataset, tokenizer, max_length=20, overlong="drop")
    assert dropped["id"] == ["short"] and report.dropped == 2


def test_query_embeddings_are_cached_and_checked_against_key_dim(tmp_path):
    class CountingEncoder:
        """A stand-in with the sentence-transformers surface the function uses."""

        calls = 0
        model_card_data = type("Card", (), {"base_model": "test/encoder"})()

        def get_embedding_dimension(self):
            return 4

        def encode(self, texts, **kwargs):
            CountingEncoder.calls += 1
            return torch.nn.functional.normalize(torch.tensor([[len(t), 1.0, 2.0, 3.0] for t in texts]), dim=1)

    dataset = Dataset.from_list(
        [{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "bcd"}]}] * 2
    )
    first = add_query_embeddings(dataset, CountingEncoder(), cache_dir=tmp_path)
    again = add_query_embeddings(dataset, CountingEncoder(), cache_dir=tmp_path)
    assert CountingEncoder.calls == 1
    assert first["query_embedding"] == again["query_embedding"]
    assert torch.tensor(first["query_embedding"]).norm(dim=1).allclose(torch.ones(2))
    assert query_text(dataset[0]["prompt"]) == "s\nbcd" and query_text("plain") == "plain"
    with pytest.raises(ValueError, match="key_dim=8"):
        add_query_embeddings(dataset, CountingEncoder(), key_dim=8)


@pytest.mark.parametrize(
    "rows,message",
    [
        ([{"id": "a", "prompt": "x", "completion": " "}], "empty completion"),
        ([{"prompt": "x", "completion": "y"}], "needs an 'id' column"),
        ([{"id": "a", "prompt": "x", "completion": "y"}, {"id": "a", "prompt": "z", "completion": "w"}], "duplicates"),
        ([{"id": "a", "messages": [{"role": "user", "content": "x"}]}], "messages_to_prompt_completion"),
    ],
)
def test_rows_reinstatement_cannot_use_are_refused(rows, message):
    with pytest.raises(ValueError, match=message):
        check_prompt_completion_rows(Dataset.from_list(rows))


def test_a_balanced_subset_takes_every_value_in_turn_and_keeps_the_rows_as_they_are():
    rows = Dataset.from_list(
        [{"id": f"{task}-{i}", "task": task} for task, n in (("a", 9), ("b", 2), ("c", 5)) for i in range(n)]
    )
    subset = balanced_subset(rows, "task", 8, seed=3)
    counts = {task: subset["task"].count(task) for task in "abc"}
    assert counts == {"a": 3, "b": 2, "c": 3}
    assert set(subset["id"]) <= set(rows["id"]) and len(set(subset["id"])) == 8
    assert subset["id"] == balanced_subset(rows, "task", 8, seed=3)["id"]
    assert subset["id"] != balanced_subset(rows, "task", 8, seed=4)["id"]
    assert balanced_subset(rows, "task", None)["id"] == rows["id"] == balanced_subset(rows, "task", 99)["id"]


def test_fitted_subset_fits_rows_as_conversations_then_balances_those_that_fit():
    rows = Dataset.from_list(
        [{"id": f"{task}-{i}", "task": task, "prompt": "word " * 200 * (i == 0) + f"Q{i}?", "completion": "A."}
         for task in "ab" for i in range(4)]
    )  # fmt: skip
    fitted, report = fitted_subset(rows, tiny_tokenizer(), 64)
    assert isinstance(report, FitReport) and (report.kept, report.truncated, report.dropped) == (6, 2, 0)
    assert fitted["id"] == rows["id"] and fitted[0]["prompt"][0]["role"] == "user"
    assert fitted[0]["prompt"][0]["content"].endswith("Q0?") and len(fitted[0]["prompt"][0]["content"]) < 1000
    again, _ = fitted_subset(fitted, tiny_tokenizer(), 64)
    assert again["prompt"] == fitted["prompt"]
    subset, _ = fitted_subset(rows, tiny_tokenizer(), 64, column="task", total=4, seed=1)
    assert sorted(subset["task"]) == ["a", "a", "b", "b"]
    assert subset["id"] == balanced_subset(fitted, "task", 4, seed=1)["id"]
