"""Load a TKI adapter by repo id in a fresh process (huggingface_hub resolves it through HF_ENDPOINT / the cache)
and write its routed logits on a fixed input: ``python hub_load.py <repo_id> <revision> <output.safetensors>``;
with ``--push-back``, then push it to the same repo with PEFT's own ``push_to_hub`` (token from HF_TOKEN)."""

import sys

import torch
from peft import PeftModel
from safetensors.torch import save_file

import tki_trainer  # noqa: F401 - registers the TKI adapter type with PEFT
from conftest import KEY_DIM, tiny_llama


INPUT_IDS = torch.tensor([[5, 17, 42, 9, 77], [3, 8, 120, 33, 61]])
QUERIES = torch.randn(2, KEY_DIM, generator=torch.Generator().manual_seed(11))


def routed_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS, query_embeddings=QUERIES).logits


if __name__ == "__main__":
    repo_id, revision, output = sys.argv[1:4]
    model = PeftModel.from_pretrained(tiny_llama(), repo_id, revision=None if revision == "-" else revision)
    save_file({"logits": routed_logits(model.eval())}, output)
    if "--push-back" in sys.argv:
        model.push_to_hub(repo_id)
