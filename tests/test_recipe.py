"""recipes/sni_llama.py: the whole pipeline on the tiny model, the paper preset's values, and early refusals."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from conftest import tiny_llama, tiny_tokenizer


ROOT = Path(__file__).parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
spec = importlib.util.spec_from_file_location("sni_llama", ROOT / "recipes" / "sni_llama.py")
sni_llama = importlib.util.module_from_spec(spec)
sys.modules["sni_llama"] = sni_llama
spec.loader.exec_module(sni_llama)


def tiny_model_dir(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


def tiny_argv(tmp_path):
    return [
        "--model_name_or_path",
        tiny_model_dir(tmp_path),
        "--train_data",
        str(FIXTURES / "p3_sample.jsonl"),
        "--eval_data",
        str(FIXTURES / "p3_sample.jsonl"),
        "--num_eval_prompts",
        "2",
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "2",
        "--max_length",
        "96",
        "--num_groups",
        "2",
        "--keys_per_group",
        "3",
        "--r",
        "4",
        "--prior_inputs_steps",
        "1",
        "--per_device_train_batch_size",
        "2",
        "--dataset_num_proc",
        "1",
        "--report_to",
        "none",
    ]


def test_recipe_runs_end_to_end_and_resumes(tmp_path):
    metrics = sni_llama.main(tiny_argv(tmp_path))
    out = tmp_path / "out"
    assert {"adapter", "base"} == set(metrics)
    assert {"all", "extractive_qa", "structure_to_text"} <= set(metrics["adapter"])
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "TKI"
    assert (out / "adapter_model.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "Greedy answers on 2 prompts" in card and "| all |" in card and "base" in card
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2
    assert len((out / "predictions_base.jsonl").read_text().splitlines()) == 2
    assert (out / "_tki_cache" / "prior_inputs" / "store.json").is_file()
    resolved = json.loads((out / "resolved_config.json").read_text())
    assert resolved["max_steps"]["origin"] == "user" and resolved["latent_alpha"]["origin"] == "ours"

    stamps = {
        p: p.stat().st_mtime_ns
        for p in [out / "_tki_cache" / "prior_inputs" / "store.json", out / "predictions.jsonl"]
    }
    again = sni_llama.main(tiny_argv(tmp_path))
    assert again == metrics
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_paper_preset_holds_the_papers_values_and_marks_ours():
    _, config, resolved = sni_llama.parse(["--preset", "paper", "--train_data", "org/sni", "--use_cpu", "true"])
    paper = {key: entry["value"] for key, entry in resolved.items() if entry["origin"] == "paper"}
    assert paper == {
        "model_name_or_path": "meta-llama/Llama-3.1-8B-Instruct",
        "query_encoder": "FacebookAI/roberta-base",
        "num_groups": 16,
        "keys_per_group": 12,
        "top_k": 2,
        "r": 8,
        "lora_target": "all-linear",
        "max_instances_per_task": 100,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 4,
        "learning_rate": 1e-5,
        "num_train_epochs": 3,
        "reinstatement_alpha": 1.0,
        "prior_inputs_steps": 3,
        "prior_inputs_learning_rate": 5e-6,
        "prior_inputs_wasserstein_weight": -1.0,
        "reinstatement_target": "easier",
    }
    ours = {key for key, entry in resolved.items() if entry["origin"] == "ours"}
    assert {"lora_alpha", "latent_r", "latent_target_modules", "max_length", "num_validation_tasks"} <= ours
    assert (config.lta, config.kr, config.pcgrad) == (True, True, True)


def test_the_recipe_takes_every_flashback_setting_on_its_command_line():
    argv = ["--train_data", "org/sni", "--use_cpu", "true", "--flashback_dataset", "org/old-tasks"]
    argv += ["--flashback_weight", "0.5", "--flashbacks_per_step", "3", "--flashback_divergence", "js"]
    argv += ["--flashback_continuation_tokens", "8", "--flashback_routing", "false"]
    _, config, resolved = sni_llama.parse(argv)
    assert (config.flashback_dataset, config.flashback_weight, config.flashbacks_per_step) == ("org/old-tasks", 0.5, 3)
    assert (config.flashback_divergence, config.flashback_continuation_tokens, config.flashback_routing) == (
        "js",
        8,
        False,
    )
    assert resolved["flashback_weight"]["origin"] == "user"
    with pytest.raises(SystemExit):
        sni_llama.parse([*argv, "--flashback_divergence", "hellinger"])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--preset", "fast"], "unknown preset"),
        (["--train_data", "/nonexistent/train.jsonl.gz"], "does not exist"),
        (["--preset", "paper", "--use_cpu", "true"], "needs --train_data"),
    ],
)
def test_bad_invocations_fail_at_once(argv, message, capsys):
    with pytest.raises(SystemExit, match=message):
        sni_llama.main(argv)


def test_push_without_a_token_and_an_oversized_model_fail_at_once(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(SystemExit, match="needs a Hub token"):
        sni_llama.main(["--push_to_hub", "true", "--output_dir", str(tmp_path / "o")])
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "model.safetensors", "wb") as handle:
        handle.truncate(2**40)
    with pytest.raises(SystemExit, match="more than the"):
        sni_llama.main(["--model_name_or_path", str(big), "--output_dir", str(tmp_path / "o")])


def test_recipe_runs_under_two_process_data_parallel(tmp_path):
    """`accelerate launch` with the recipe's DDP config (two CPU processes over gloo): one adapter, one evaluation."""
    import os
    import subprocess

    argv = tiny_argv(tmp_path)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "recipes" / "accelerate" / "ddp.yaml"),
        "--main_process_port",
        "29541",
        str(ROOT / "recipes" / "sni_llama.py"),
        *argv,
    ]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "out"
    assert json.loads((out / "metrics.json").read_text())["metrics"]["adapter"]["all"]["rougeL"] >= 0
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "TKI"


def test_the_recipe_trains_its_own_baseline_plain_lora_sft(tmp_path):
    argv = [
        *tiny_argv(tmp_path),
        "--lta",
        "false",
        "--kr",
        "false",
        "--pcgrad",
        "false",
        "--evaluate_base_model",
        "false",
    ]
    metrics = sni_llama.main(argv)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"]) == ("LORA", 4)
    assert set(metrics) == {"adapter"} and metrics["adapter"]["all"]["rougeL"] >= 0


@pytest.mark.slow
def test_the_embedded_preset_trains_on_the_sni_slice_and_reports_per_category(tmp_path):
    argv = ["--output_dir", str(tmp_path / "out"), "--num_train_rows", "8", "--num_eval_prompts", "6", "--max_steps", "2",
            "--prior_inputs_steps", "1"]  # fmt: skip
    metrics = sni_llama.main(argv)
    assert {"adapter", "base", "copy_input", "copy_demo"} == set(metrics)
    assert len(metrics["adapter"]) > 2 and "all" in metrics["adapter"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "copy_demo" in card and "HuggingFaceTB/SmolLM2-135M-Instruct" in card


def test_the_resolved_config_names_local_paths_without_their_directories(tmp_path):
    """resolved_config.json is uploaded with the adapter: a local model or data path is named by its last part."""
    data = tmp_path / "data" / "sni"
    data.mkdir(parents=True)
    argv = ["--model_name_or_path", str(tmp_path / "base"), "--train_data", str(data), "--output_dir",
            str(tmp_path / "out"), "--use_cpu", "true"]  # fmt: skip
    _, config, resolved = sni_llama.parse(argv)
    assert resolved["train_data"]["value"] == "sni" and resolved["model_name_or_path"]["value"] == "base"
    assert resolved["output_dir"]["value"] == "out" and config.output_dir == str(tmp_path / "out")
    assert str(tmp_path) not in json.dumps(resolved)
