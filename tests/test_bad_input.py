"""Bad rows handed to TKITrainer: one ValueError that names the fix, at construction, before stage 1 writes
anything (the checks of stage 1, the store, routing and the tuner are tested beside them)."""

import math

import pytest
from datasets import Dataset
from peft import LoraConfig

from conftest import tiny_llama, tiny_tokenizer, tki_config
from test_trainer import common, rows
from tki_trainer import TKIConfig, TKITrainer
from tki_trainer.preparation import CACHE_DIR


def with_queries(transform):
    """The test rows with their query embeddings passed through ``transform(index, query)``."""
    data = rows()
    queries = [transform(i, q) for i, q in enumerate(data["query_embedding"])]
    return data.remove_columns("query_embedding").add_column("query_embedding", queries)


TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@pytest.mark.parametrize(
    "dataset,message",
    [
        (lambda: with_queries(lambda i, q: [math.nan] * len(q) if i == 3 else q), r"Rows \[3\] .* hold NaN or inf"),
        (lambda: with_queries(lambda i, q: q[:-1] if i == 5 else q), "15/16-dimensional"),
        (lambda: rows().add_column("group_id", [0.5] * 8), "holds float64 values"),
        (lambda: rows().add_column("group_id", [7] * 8), "from 7 to 7, but the adapter has num_groups=3"),
        (lambda: rows().select([]), "has no rows"),
        (
            lambda: Dataset.from_list(
                [
                    {
                        "prompt": "The island is",
                        "completion": " land.",
                        "messages": None,
                        "query_embedding": [0.1] * 16,
                    },
                    {"prompt": None, "completion": None, "messages": TURNS, "query_embedding": [0.2] * 16},
                ]
            ),
            "mixes prompt/completion rows and 'messages' rows",
        ),
    ],
)
def test_bad_rows_are_refused_before_stage_1(tmp_path, dataset, message):
    with pytest.raises(ValueError, match=message):
        TKITrainer(tiny_llama(), args=TKIConfig(**common(tmp_path, "run"), kr=True), train_dataset=dataset(),
                   processing_class=tiny_tokenizer(), peft_config=tki_config())  # fmt: skip
    assert not (tmp_path / "run" / CACHE_DIR / "prior_inputs").exists()


def test_a_max_length_without_room_for_a_token_is_refused_for_what_it_is(tmp_path):
    with pytest.raises(ValueError, match="max_length=0 leaves no room for a token"):
        TKIConfig(**common(tmp_path, "run"), max_length=0)


def test_resuming_a_checkpoint_of_another_adapter_type_is_refused_before_loading(tmp_path):
    """Switching lta between a run and its resumption would fail deep inside the optimizer's state loading."""
    settings = common(tmp_path, "run", max_steps=1, save_strategy="steps", save_steps=1)
    first = TKITrainer(tiny_llama(), args=TKIConfig(**settings, kr=False), train_dataset=rows(),
                       processing_class=tiny_tokenizer(), peft_config=tki_config())  # fmt: skip
    first.train()
    resumed = TKITrainer(tiny_llama(), args=TKIConfig(**{**settings, "max_steps": 2}, lta=False, kr=False),
                         train_dataset=rows(), processing_class=tiny_tokenizer(),
                         peft_config=LoraConfig(r=4, target_modules="all-linear"))  # fmt: skip
    with pytest.raises(ValueError, match="holds a TKI checkpoint, but this run trains a LORA one"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
