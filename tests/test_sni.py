"""SNI on the slice the recipe ships (recipes/data/sni_slice, real tasks): splits, rows, prompt fitting, heuristics."""

import json
import random
from pathlib import Path

import pytest
from datasets import Dataset

from conftest import tiny_tokenizer
from tki_trainer.data import (
    SniFitReport,
    fit_sni_prompts,
    fitted_subset,
    load_sni,
    sni_from_hub_rows,
    sni_splits,
    tokenize_row,
)
from tki_trainer.data.sni import sni_prompt
from tki_trainer.evaluation import HEURISTICS, heuristic_predictions, score_by, score_heuristics, side_by_side


SLICE = Path(__file__).parents[1] / "recipes" / "data" / "sni_slice"
HELD_OUT_CATEGORIES = {
    "Answerability Classification",
    "Cause Effect Classification",
    "Coreference Resolution",
    "Data to Text",
    "Dialogue Act Recognition",
    "Grammar Error Correction",
    "Keyword Tagging",
    "Overlap Extraction",
    "Question Rewriting",
    "Textual Entailment",
    "Title Generation",
    "Word Analogy",
}


def task_file(task: str) -> dict:
    return json.loads((SLICE / "tasks" / f"{task}.json").read_text())


def task_list(split: str) -> list[str]:
    return (SLICE / "splits" / "default" / f"{split}_tasks.txt").read_text().split()


def prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[0]["content"]


@pytest.fixture(scope="module")
def splits() -> dict[str, list[str]]:
    return sni_splits(SLICE, num_validation=8, seed=0)


@pytest.fixture(scope="module")
def test_rows(splits) -> Dataset:
    return load_sni(SLICE, splits["test"])


def test_slice_splits_hold_out_tasks_and_categories(splits, test_rows):
    assert len(task_list("train")) == 61 and len(task_list("test")) == 75
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (53, 8, 75)
    assert sorted(splits["train"] + splits["validation"]) == sorted(task_list("train"))
    train, validation = load_sni(SLICE, splits["train"]), load_sni(SLICE, splits["validation"])
    validation_instances = sum(len(task_file(task)["Instances"]) for task in splits["validation"])
    assert (len(train), len(validation), len(test_rows)) == (670 - validation_instances, validation_instances, 725)
    ids = [*train["id"], *validation["id"], *test_rows["id"]]
    assert len(set(ids)) == len(ids)
    assert not {*train["task"], *validation["task"]} & set(test_rows["task"])
    assert set(test_rows["category"]) == HELD_OUT_CATEGORIES
    assert not {*train["category"], *validation["category"]} & HELD_OUT_CATEGORIES
    for rows in (train, validation, test_rows):
        for task, category in zip(rows["task"], rows["category"]):
            assert category and category == task_file(task)["Categories"][0]


def test_rows_rebuild_their_prompt_and_carry_the_first_demo_output(splits, test_rows):
    for row in test_rows:
        data = task_file(row["task"])
        assert row["prompt"] == sni_prompt(row["definition"], row["instance_input"], row["positive_examples"])
        assert row["positive_examples"] == [
            {"input": e["input"], "output": e["output"]} for e in data["Positive Examples"]
        ]
        assert row["demo_output"] == data["Positive Examples"][0]["output"]
        assert row["references"][0] == row["completion"]
    no_examples = load_sni(SLICE, splits["test"][:2], num_positive=0, conversational=True)
    assert all(row["positive_examples"] == [] and row["demo_output"] for row in no_examples)
    assert no_examples[0]["prompt"][0]["content"] == sni_prompt(
        no_examples[0]["definition"], no_examples[0]["instance_input"]
    )


def test_validation_tasks_are_a_number_or_a_fraction_of_the_train_list():
    train = task_list("train")
    assert sni_splits(SLICE, num_validation=8, seed=3)["validation"] == sorted(random.Random(3).sample(train, 8))
    assert len(sni_splits(SLICE, num_validation=128 / 756)["validation"]) == 10
    with pytest.raises(ValueError, match="train list has 61"):
        sni_splits(SLICE, num_validation=128)
    with pytest.raises(ValueError, match="fraction"):
        sni_splits(SLICE, num_validation=1.5)


@pytest.mark.parametrize("conversational", [False, True])
def test_fitting_drops_examples_then_cuts_the_instance_and_never_the_definition(splits, conversational):
    tokenizer, max_length = tiny_tokenizer(), 512
    rows = load_sni(SLICE, splits["test"], max_instances=2, conversational=conversational)
    fitted, report = fit_sni_prompts(rows, tokenizer, max_length)
    assert (
        isinstance(report, SniFitReport)
        and min(report.kept, report.examples_dropped, report.instance_cut, report.dropped) > 0
    )
    assert report.kept + report.examples_dropped + report.instance_cut + report.dropped == len(rows)
    assert len(fitted) == len(rows) - report.dropped
    original = {row["id"]: row for row in rows}
    outcome = {"kept": 0, "examples_dropped": 0, "instance_cut": 0}
    for row in fitted:
        before = original[row["id"]]
        text = prompt_text(row["prompt"])
        assert text.startswith(f"Definition: {before['definition'].strip()}\n\n")
        assert text == sni_prompt(before["definition"], row["instance_input"], row["positive_examples"])
        assert text.endswith(f"Now complete the following example -\nInput: {row['instance_input'].strip()}\nOutput: ")
        assert len(tokenize_row(tokenizer, row["prompt"], row["completion"]).input_ids) <= max_length
        examples, instance = before["positive_examples"], before["instance_input"]
        assert row["positive_examples"] == examples[: len(row["positive_examples"])]
        assert instance.endswith(row["instance_input"])
        if row["instance_input"] != instance:
            assert row["positive_examples"] == []
            outcome["instance_cut"] += 1
        else:
            outcome["kept" if row["positive_examples"] == examples else "examples_dropped"] += 1
    assert outcome == {
        "kept": report.kept,
        "examples_dropped": report.examples_dropped,
        "instance_cut": report.instance_cut,
    }
    dropped = [row for row in rows if row["id"] not in set(fitted["id"])]
    empty = sni_prompt(dropped[0]["definition"], "")
    empty = empty if not conversational else [{"role": "user", "content": empty}]
    assert len(tokenize_row(tokenizer, empty, dropped[0]["completion"]).input_ids) > max_length
    again, report = fit_sni_prompts(fitted, tokenizer, max_length)
    assert report.kept == len(fitted) and again["prompt"] == fitted["prompt"]


def test_cuts_are_as_short_as_the_budget_allows():
    tokenizer = tiny_tokenizer()
    examples = [{"input": "The island is land.", "output": "yes"}, {"input": "Paris is the capital.", "output": "no"}]
    instance = " ".join(f"Paris is the capital of France {i}." for i in range(30))
    rows = Dataset.from_list(
        [
            {
                "id": "a",
                "prompt": sni_prompt("Answer yes or no.", instance, examples),
                "completion": " yes",
                "definition": "Answer yes or no.",
                "positive_examples": examples,
                "instance_input": instance,
            }
        ]
    )
    full = len(tokenize_row(tokenizer, rows[0]["prompt"], " yes").input_ids)
    one_example = len(
        tokenize_row(tokenizer, sni_prompt("Answer yes or no.", instance, examples[:1]), " yes").input_ids
    )
    fitted, report = fit_sni_prompts(rows, tokenizer, one_example)
    assert report.examples_dropped == 1 and fitted[0]["positive_examples"] == examples[:1] and one_example < full
    budget = len(tokenize_row(tokenizer, sni_prompt("Answer yes or no.", ""), " yes").input_ids) + 40
    fitted, report = fit_sni_prompts(rows, tokenizer, budget)
    cut = fitted[0]["instance_input"]
    assert report.instance_cut == 1 and instance.endswith(cut) and len(cut) < len(instance)
    assert len(tokenize_row(tokenizer, fitted[0]["prompt"], " yes").input_ids) <= budget
    starts = [
        start
        for start, _ in tokenizer(instance, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    ]
    one_token_more = instance[max(start for start in starts if start < len(instance) - len(cut)) :]
    assert len(tokenize_row(tokenizer, sni_prompt("Answer yes or no.", one_token_more), " yes").input_ids) > budget


def test_hub_rows_are_fitted_by_cutting_their_input():
    hub = Dataset.from_list(
        [
            {
                "task_name": "task1",
                "id": "h1",
                "definition": "Copy the sentence.",
                "inputs": "Paris is the capital of France. " * 40,
                "targets": "Paris.",
            }
        ]
    )
    rows = sni_from_hub_rows(hub, conversational=True)
    assert rows[0]["positive_examples"] == [] and rows[0]["definition"] == "Copy the sentence."
    fitted, report = fit_sni_prompts(rows, tiny_tokenizer(), 160)
    assert report.instance_cut == 1 and len(fitted[0]["instance_input"]) < len(hub[0]["inputs"])
    assert fitted[0]["prompt"][0]["content"].startswith(
        "Definition: Copy the sentence.\n\nNow complete the following example -"
    )


def test_hub_rows_are_capped_per_task_as_a_checkout_is():
    """The same instances per task as `load_sni` draws from the task files, whichever tasks the Hub copy holds."""
    tasks = task_list("test")[:3]
    hub = Dataset.from_list(
        [
            {"task_name": task, "id": instance["id"], "definition": " ".join(data["Definition"]),
             "inputs": instance["input"], "targets": instance["output"][0]}
            for task in tasks
            for data in [task_file(task)]
            for instance in data["Instances"]
        ]
    )  # fmt: skip
    assert (
        sni_from_hub_rows(hub, max_instances=5, seed=2)["id"] == load_sni(SLICE, tasks, max_instances=5, seed=2)["id"]
    )
    assert sni_from_hub_rows(hub)["id"] == hub["id"]


def test_fitted_subset_fits_sni_rows_keeping_the_definition(test_rows):
    rows = test_rows.select(range(0, len(test_rows), 25))
    fitted, report = fitted_subset(rows, tiny_tokenizer(), 384, column="category", total=12)
    assert isinstance(report, SniFitReport) and sum(vars(report).values()) == len(rows)
    assert report.examples_dropped + report.instance_cut > 0 and len(fitted) == 12
    assert all(row["prompt"][0]["content"].startswith(f"Definition: {row['definition']}") for row in fitted)


def test_fitting_refuses_rows_it_cannot_rebuild(test_rows):
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="fit_prompts"):
        fit_sni_prompts(Dataset.from_list([{"prompt": "x", "completion": "y"}]), tokenizer, 64)
    edited = test_rows.select(range(2)).map(lambda row: {"prompt": "Be brief.\n\n" + row["prompt"]})
    with pytest.raises(ValueError, match="is not sni_prompt"):
        fit_sni_prompts(edited, tokenizer, 4096)


def test_heuristics_are_scored_by_the_models_metric_module(test_rows):
    copy_demo = heuristic_predictions(test_rows, "copy_demo")
    assert copy_demo == [task_file(task)["Positive Examples"][0]["output"] for task in test_rows["task"]]
    assert heuristic_predictions(test_rows, "copy_input") == test_rows["instance_input"]
    some = test_rows.select(range(0, len(test_rows), 10))
    assert score_heuristics(some)["copy_demo"] == score_by(some["demo_output"], some["references"], some["category"])
    results = score_heuristics(test_rows)
    assert set(results) == set(HEURISTICS)
    assert set(results["copy_input"]) == {"all", *HELD_OUT_CATEGORIES}
    # The slice's README: 27.0 and 16.5 ROUGE-L over all 725 test prompts and every reference (SNI: 28.5, 14.2).
    assert round(results["copy_demo"]["all"]["rougeL"], 1) == 27.0
    assert round(results["copy_input"]["all"]["rougeL"], 1) == 16.5
    table = side_by_side({"base": results["copy_input"], **results}).splitlines()
    assert table[0] == "| category | base | copy_input | copy_demo |"
    assert table[2] == "| all | 16.5 | 16.5 | 27.0 |"
    assert len(table) == 2 + 1 + len(HELD_OUT_CATEGORIES)
    with pytest.raises(ValueError, match="score the same rows"):
        side_by_side({"a": results["copy_demo"], "b": {"all": results["copy_demo"]["all"]}})
    with pytest.raises(ValueError, match="copy_demo"):
        heuristic_predictions(test_rows, "copy_everything")


@pytest.mark.slow
def test_embedded_tokenizer_fits_the_test_prompts_into_256_tokens(splits):
    from transformers import AutoTokenizer

    from tki_trainer.embedded import embedded_model_path

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    rows = load_sni(SLICE, splits["test"], conversational=True)
    fitted, report = fit_sni_prompts(rows, tokenizer, 256)
    assert report.kept + report.examples_dropped + report.instance_cut + report.dropped == 725
    assert report.examples_dropped > 0 and report.instance_cut > 0
    definitions = {row["id"]: row["definition"].strip() for row in rows}
    for row in fitted:
        assert f"Definition: {definitions[row['id']]}\n\n" in row["prompt"][0]["content"]
        assert len(tokenize_row(tokenizer, row["prompt"], row["completion"]).input_ids) <= 256
