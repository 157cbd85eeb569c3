"""Run by tests/test_tagi.py in a fresh process: load an adapter with `PeftModel.from_pretrained`, save its logits.

``python tagi_load.py BASE_DIR ADAPTER_DIR INPUTS OUTPUT MODE``: with MODE ``tagi`` it imports `tki_trainer.tagi`
(which registers the tuner) and applies each row's instruction embedding; with MODE ``plain`` it never imports
tki_trainer, checks so, and expects a plain PEFT LoRA.
"""

import sys

from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM


base_dir, adapter_dir, inputs_file, output_file, mode = sys.argv[1:]
if mode == "tagi":
    import tki_trainer.tagi  # noqa: F401  (registers the tuner with PEFT)
inputs = load_file(inputs_file)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
if mode == "tagi":
    logits = model(input_ids=inputs["input_ids"], instruction_embeddings=inputs["instructions"]).logits
else:
    assert not any(name.startswith("tki_trainer") for name in sys.modules), "tki_trainer was imported"
    assert type(model.peft_config["default"]).__name__ == "LoraConfig"
    logits = model(input_ids=inputs["input_ids"]).logits
save_file({"logits": logits.detach().contiguous()}, output_file)
