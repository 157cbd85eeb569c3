"""The ``tki-prepare`` command: data, query embeddings and prior inputs in one resumable run."""

import re
from pathlib import Path

import pytest
from datasets import load_from_disk

from conftest import tiny_llama, tiny_tokenizer
from tki_trainer.cli import main
from tki_trainer.reinstatement import PriorInputStore


FIXTURES = Path(__file__).parent / "fixtures"


def test_prepare_writes_dataset_and_store_and_resumes(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    argv = [
        "--data",
        str(FIXTURES / "p3_sample.jsonl"),
        "--output_dir",
        str(tmp_path / "out"),
        "--model",
        str(tmp_path / "model"),
        "--max_length",
        "64",
        "--prior_inputs_steps",
        "2",
        "--prior_inputs_batch_size",
        "2",
    ]
    main(argv)
    dataset = load_from_disk(str(tmp_path / "out" / "dataset"))
    assert len(dataset) == 5 and len(dataset[0]["query_embedding"]) == 384
    store = PriorInputStore(tmp_path / "out" / "prior_inputs")
    assert sorted(store.examples) == sorted(dataset["id"])
    shards = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "prior_inputs").glob("shard-*")}
    main(argv)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "prior_inputs").glob("shard-*")} == shards
    for changed, named in ((["--limit", "2"], "--limit None (asked: 2)"), (["--max_length", "32"], "--max_length 64")):
        with pytest.raises(SystemExit, match=re.escape(named)):
            main([*argv, *changed])
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "prior_inputs").glob("shard-*")} == shards
