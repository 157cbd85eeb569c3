"""Sharing: the model card, and push / load against a local endpoint that speaks the Hub's HTTP API."""

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import tiny_llama, tiny_tokenizer, tki_config
from hub_load import routed_logits
from hub_server import LocalHub
from test_trainer import common, rows
from tki_trainer import TKIConfig, TKITrainer
from tki_trainer.hub import PushError, hub_id, public_name, push_adapter, render_model_card


TESTS = Path(__file__).parent
TOKEN = "hf_" + "q7ZtokenNeverWritten" * 2


def test_model_card_renders_real_values_and_parses():
    config = tki_config(
        base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct",
        encoder_name="sentence-transformers/all-MiniLM-L6-v2",
    )
    text = render_model_card(
        config, repo_id="user/tki-smol", training_data="192 P3 rows.", evaluation="| all | 30.1 |"
    )
    assert not re.search(r"\{[a-z_]+\}", text)
    card = ModelCard(text)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"peft", "trl", "tki"} <= set(card.data.tags) and card.data.library_name == "peft"
    assert "3 x 4 = 12" in text and "user/tki-smol" in text and "| all | 30.1 |" in text


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The local endpoint, with this process's huggingface_hub pointed at it (uploads over Git LFS, not Xet)."""
    with LocalHub(tmp_path / "hub", TOKEN) as server:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server


def trained(tmp_path) -> TKITrainer:
    """Two steps of LTA training with one evaluation, so the card has a run's numbers to show."""
    args = TKIConfig(**common(tmp_path, "run", max_steps=2, eval_strategy="steps", eval_steps=2), kr=False)
    trainer = TKITrainer(
        tiny_llama(),
        args=args,
        train_dataset=rows(),
        eval_dataset=rows(),
        processing_class=tiny_tokenizer(),
        peft_config=tki_config(),
    )
    trainer.train()
    return trainer


def load_in_fresh_process(
    hub: LocalHub, tmp_path: Path, repo_id: str, revision: str, offline: bool = False, push_back: bool = False
) -> torch.Tensor:
    """Routed logits of the adapter loaded by repo id in a new process; ``push_back``: then PEFT's own push_to_hub."""
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "PYTHONPATH": str(TESTS),
        "HF_HUB_VERBOSITY": "debug",
        "HF_HUB_DISABLE_XET": "1",
        **({"HF_TOKEN": TOKEN} if push_back else {}),
    }
    output = tmp_path / f"logits-{revision}-{offline}-{push_back}.safetensors"
    command = [
        sys.executable,
        str(TESTS / "hub_load.py"),
        repo_id,
        revision,
        str(output),
        *(["--push-back"] if push_back else []),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert TOKEN not in result.stdout + result.stderr
    return load_file(output)["logits"]


def repo_files(hub: LocalHub, repo_id: str, revision: str = "main") -> set[str]:
    return set(hub.store.resolve(repo_id, revision)[1])


def every_file(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file()]


def test_push_then_load_by_repo_id_at_head_at_a_pinned_revision_and_offline(tmp_path, hub, caplog):
    caplog.set_level(logging.DEBUG)
    trainer = trained(tmp_path)
    model = trainer.model.eval()
    first_logits = routed_logits(model)
    query = torch.randn(16, generator=torch.Generator().manual_seed(5))
    first = trainer.push_to_hub(token=TOKEN, plain_lora_query=query)

    uploaded = repo_files(hub, "user/run")
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "tokenizer.json",
        "plain_lora/adapter_config.json",
    } <= uploaded
    assert not [
        name for name in uploaded if name.endswith((".bin", ".pt", ".pth")) or name.startswith(("_", "checkpoint-"))
    ]
    assert (tmp_path / "run" / "training_args.bin").is_file()
    card_text = hub.store.blob(hub.store.resolve("user/run", "main")[1]["README.md"]["oid"]).decode()
    card = ModelCard(card_text)
    assert {"peft", "trl", "tki"} <= set(card.data.tags) and not re.search(r"\{[a-z_]+\}", card_text)
    assert "| loss |" in card_text and "3 x 4 = 12" in card_text

    torch.testing.assert_close(load_in_fresh_process(hub, tmp_path, "user/run", "-", push_back=True), first_logits)
    assert hub.store.resolve("user/run", "main")[0] != first.oid, "PEFT's push_to_hub made no commit"
    assert "3 x 4 = 12" in hub.store.blob(hub.store.resolve("user/run", "main")[1]["README.md"]["oid"]).decode()

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "tki_latent_A" in name:
                parameter.add_(0.05)
    second_logits = routed_logits(model)
    model.save_pretrained(str(tmp_path / "second"))
    push_adapter(tmp_path / "second", "user/run", token=TOKEN, commit_message="second")

    assert torch.allclose(load_in_fresh_process(hub, tmp_path, "user/run", "-"), second_logits, atol=1e-6)
    assert torch.allclose(load_in_fresh_process(hub, tmp_path, "user/run", first.oid), first_logits, atol=1e-6)
    served = len(hub.requests)
    assert torch.allclose(
        load_in_fresh_process(hub, tmp_path, "user/run", first.oid, offline=True), first_logits, atol=1e-6
    )
    assert len(hub.requests) == served, "the offline load reached the endpoint"
    assert not torch.allclose(first_logits, second_logits)

    logs = caplog.text + "".join(record.getMessage() for record in caplog.records)
    assert TOKEN not in logs
    leaks = [path for path in every_file(tmp_path) if TOKEN.encode() in path.read_bytes()]
    assert not leaks


def test_a_failed_push_names_the_rerun_hides_the_token_and_leaves_the_output_as_it_was(tmp_path, hub):
    trainer = trained(tmp_path)
    trainer.save_model()
    before = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in every_file(tmp_path / "run")}
    wrong = "hf_" + "wrongTokenValue" * 2
    with pytest.raises(PushError) as failure:
        push_adapter(tmp_path / "run", "user/run", token=wrong)
    assert "rerun" in str(failure.value) and wrong not in str(failure.value) and failure.value.__cause__ is None
    assert {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in every_file(tmp_path / "run")} == before
    assert not hub.store.exists("user/run")


def test_the_prior_input_store_is_uploaded_only_when_asked(tmp_path, hub):
    trainer = trained(tmp_path)
    trainer.save_model()
    store = tmp_path / "store"
    store.mkdir()
    (store / "store.json").write_text("{}")
    (store / "shard-0-0.safetensors").write_bytes(b"\0" * 16)
    push_adapter(tmp_path / "run", "user/without", token=TOKEN)
    push_adapter(tmp_path / "run", "user/with", token=TOKEN, prior_inputs=store)
    assert not any(name.startswith("prior_inputs/") for name in repo_files(hub, "user/without"))
    assert {"prior_inputs/store.json", "prior_inputs/shard-0-0.safetensors"} <= repo_files(hub, "user/with")
    with pytest.raises(ValueError, match="no store.json"):
        push_adapter(tmp_path / "run", "user/with", token=TOKEN, prior_inputs=tmp_path)
    with pytest.raises(ValueError, match="not a saved adapter"):
        push_adapter(store, "user/with", token=TOKEN)


def test_pushes_during_training_are_refused(tmp_path):
    with pytest.raises(ValueError, match="hub_strategy='end'"):
        TKIConfig(
            **common(tmp_path, "run"), kr=False, push_to_hub=True, hub_strategy="every_save", hub_model_id="user/run"
        )


def test_a_run_from_local_paths_uploads_no_local_directory_and_the_epochs_it_trained(tmp_path, hub):
    """Model, data and flashbacks given as absolute local paths: the card's prose names them by file or folder name,
    its front matter and the uploaded adapter config name no base model (a folder name could resolve to another
    model on the Hub), and no uploaded file holds a directory of the run's machine. Stopped by max_steps at half an
    epoch, the card says so."""
    base = tmp_path / "models" / "tiny-base"
    tiny_llama().save_pretrained(base)
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir()
    rows().to_json(data)
    flashbacks = tmp_path / "data" / "old.jsonl"
    rows().select_columns(["prompt", "query_embedding"]).to_json(flashbacks)
    args = TKIConfig(**common(tmp_path, "run", max_steps=2), kr=False, flashback_dataset=str(flashbacks))
    model = AutoModelForCausalLM.from_pretrained(str(base))
    trainer = TKITrainer(model, args=args, train_dataset=rows(), processing_class=tiny_tokenizer(),
                         peft_config=tki_config())  # fmt: skip
    trainer.train()
    trainer.push_to_hub(token=TOKEN, dataset_name=str(data))
    files = hub.store.resolve("user/run", "main")[1]
    uploaded = {name: hub.store.blob(entry["oid"]) for name, entry in files.items()}
    card = uploaded["README.md"].decode()
    assert ModelCard(card).data.base_model is None and "adapter for `tiny-base`" in card
    assert "`train.jsonl`" in card and "`old.jsonl`" in card and "0.5 epoch(s)" in card
    assert json.loads(uploaded["adapter_config.json"])["base_model_name_or_path"] is None
    assert not [name for name, content in uploaded.items() if str(tmp_path).encode() in content]


def test_public_names_keep_hub_ids_and_name_local_paths_by_their_last_part(tmp_path):
    snapshot = tmp_path / "hub" / "models--org--model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert public_name("org/model") == hub_id("org/model") == "org/model"
    assert public_name(str(snapshot)) == hub_id(str(snapshot)) == "org/model"
    assert public_name(str(tmp_path / "data" / "rows.jsonl")) == "rows.jsonl"
    assert hub_id(str(tmp_path / "data" / "rows.jsonl")) is None
    assert public_name("./outputs/run") == "run" and public_name(None) is None


@pytest.mark.parametrize(
    "settings,says",
    [
        ({}, ["eq. 6 as written", "pushed away from the prompt (Wasserstein weight -1, eq. 5 as written)"]),
        (
            dict(reinstatement_target="harder", prior_inputs_wasserstein_weight=1.0),
            ["minus sign dropped", "kept near"],
        ),
        (dict(kr=False), []),
    ],
)
def test_the_card_says_which_reading_of_reinstatement_trained_the_adapter(tmp_path, settings, says):
    args = TKIConfig(**common(tmp_path, "run"), **{"kr": True, "prior_inputs_mode": "on_the_fly", **settings})
    trainer = TKITrainer(
        tiny_llama(), args=args, train_dataset=rows(), processing_class=tiny_tokenizer(), peft_config=tki_config()
    )
    trainer.create_model_card()
    text = (tmp_path / "run" / "README.md").read_text()
    assert all(phrase in text for phrase in says)
    assert ("Knowledge reinstatement" in text) == bool(says)
