"""``python -m tki_trainer.ivg --data tasks.jsonl --output_dir iv/``: extract instruction vectors, resumably.

``--data`` holds rows with a task, an input and an output (a .json/.jsonl/.csv/.parquet file or a saved
dataset folder); every `IVConfig` field is an option (``--heads 9:25,12:15`` for given heads; ``none`` for an
unset ``--layer`` or ``--correct_top_k``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, fields

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..data.local import load_rows
from ..embedded import load_embedded_model
from .config import IVConfig
from .extraction import extract_instruction_vector


def _flag(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


def _optional_int(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def _heads(text: str) -> list[tuple[int, int]] | None:
    if text.lower() == "none":
        return None
    try:
        return [(int(layer), int(head)) for layer, head in (pair.split(":") for pair in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer:head pairs separated by commas, got {text!r}") from None


PARSERS = {"heads": _heads, "layer": _optional_int, "correct_top_k": _optional_int, "reuse_prefix": _flag}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tki_trainer.ivg", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="Rows with task, input and output columns.")
    parser.add_argument("--output_dir", required=True, help="Where per-task results and the IV go (and resume from).")
    parser.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M-Instruct) or a path / Hub id.")
    for field in fields(IVConfig):
        default = field.default if field.default is not MISSING else field.default_factory()
        kind = PARSERS.get(field.name, type(default))
        parser.add_argument(f"--{field.name}", type=kind, default=default, help=field.metadata.get("help"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = vars(parser().parse_args(argv))
    data, output_dir, model_name = args.pop("data"), args.pop("output_dir"), args.pop("model")
    config = IVConfig(**args)
    try:
        rows = load_rows(data, "--data")
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if model_name == "embedded":
        model, tokenizer = load_embedded_model()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_name)
        tokenizer = AutoTokenizer.from_pretrained(model_name)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    vector = extract_instruction_vector(model, tokenizer, rows, config, output_dir=output_dir)
    summary = {
        "tasks": vector.tasks,
        "layer": vector.layer,
        "heads": vector.heads,
        "head_effects": vector.head_effects,
    }
    print(json.dumps({**summary, "left_out": vector.provenance["left_out"], "output_dir": output_dir}, indent=2))


if __name__ == "__main__":
    main()
