"""Adapters go to disk as safetensors and JSON and come back, in a fresh process, with identical logits."""

import subprocess
import sys
import textwrap

import torch
from peft import get_peft_model
from safetensors.torch import load_file, save_file

from conftest import tiny_llama, tki_config, trained_like
from tki_trainer import export_lora, route


LOAD_AND_RUN = """
import sys
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
{imports}
base_dir, adapter_dir, inputs_file, output_file = sys.argv[1:]
inputs = load_file(inputs_file)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
{run}
save_file({{"logits": logits.contiguous()}}, output_file)
"""


def run_in_fresh_process(tmp_path, imports, run):
    script = tmp_path / "load_and_run.py"
    script.write_text(LOAD_AND_RUN.format(imports=imports, run=textwrap.dedent(run)))
    args = [tmp_path / "base", tmp_path / "adapter", tmp_path / "inputs.safetensors", tmp_path / "logits.safetensors"]
    result = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(tmp_path / "logits.safetensors")["logits"]


def saved_model(tmp_path, queries):
    """A trained-looking TKI model saved next to its base, plus the inputs the fresh process will see."""
    tiny_llama().save_pretrained(tmp_path / "base")
    model = trained_like(get_peft_model(tiny_llama(), tki_config(encoder_name="test-encoder", encoder_dim=16)))
    model.save_pretrained(tmp_path / "adapter")
    input_ids = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    groups = torch.tensor([2, 0, 1])
    save_file({"input_ids": input_ids, "queries": queries, "groups": groups}, tmp_path / "inputs.safetensors")
    return model, input_ids, groups


def test_save_then_from_pretrained_in_a_fresh_process_gives_identical_logits(tmp_path, queries):
    model, input_ids, groups = saved_model(tmp_path, queries)
    logits = run_in_fresh_process(
        tmp_path,
        imports="import tki_trainer",
        run="""
        logits = model(input_ids=inputs["input_ids"], query_embeddings=inputs["queries"], group_ids=inputs["groups"]).logits
        """,
    )
    torch.testing.assert_close(logits, model(input_ids=input_ids, query_embeddings=queries, group_ids=groups).logits)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    torch.testing.assert_close(saved["base_model.tki_keys"], model.base_model.tki_keys["default"])
    assert any(".tki_latent_A" in key for key in saved) and any(".tki_lora_B" in key for key in saved)


def test_exported_plain_lora_loads_without_tki_trainer_and_matches_the_routed_adapter(tmp_path, queries):
    model, input_ids, _ = saved_model(tmp_path, queries)
    query = queries[1]
    export_lora(model, query, tmp_path / "adapter_plain")
    (tmp_path / "adapter").rename(tmp_path / "adapter_tki")
    (tmp_path / "adapter_plain").rename(tmp_path / "adapter")
    logits = run_in_fresh_process(
        tmp_path,
        imports="",
        run="""
        assert not any(name.startswith("tki_trainer") for name in sys.modules)
        assert type(model.peft_config["default"]).__name__ == "LoraConfig"
        logits = model(input_ids=inputs["input_ids"]).logits
        """,
    )
    with route(model, query.expand(len(input_ids), -1)):
        routed = model(input_ids=input_ids).logits
    torch.testing.assert_close(logits, routed, atol=1e-5, rtol=1e-5)
    with route(model, queries[0].expand(len(input_ids), -1)):
        assert not torch.allclose(logits, model(input_ids=input_ids).logits, atol=1e-4)
