"""The command line. ``tki-prepare``: everything TKI computes before training, in one resumable command.

Loads prompt/completion rows, fits them into ``max_length`` (prompts cut from the left), adds query
embeddings, and runs knowledge-reinstatement stage 1. Writes ``<output_dir>/dataset`` (Arrow, with the
``query_embedding`` column) and ``<output_dir>/prior_inputs`` (the store ``TKIConfig(prior_inputs_dir=...)``
reads). Under ``accelerate launch`` the processes split stage 1's examples.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from accelerate import PartialState
from datasets import Dataset, load_from_disk
from transformers import HfArgumentParser

from ._io import staged_file
from .config import PriorInputArguments
from .data import add_query_embeddings, fit_prompts, load_local, load_p3
from .embedded import load_model
from .preparation import as_prompt_completion, query_encoder, with_ids
from .reinstatement import compute_prior_inputs
from .reinstatement.settings import DEFAULT_MAX_LENGTH


@dataclass
class PrepareArguments:
    """``tki-prepare``'s arguments besides the stage-1 settings, which are `TKIConfig`'s ``prior_inputs_*`` ones."""

    data: str = field(
        metadata={"help": "A P3 .jsonl.gz file, or a .json/.jsonl file of prompt/completion or messages rows."}
    )
    output_dir: str = field(metadata={"help": "Where dataset/ and prior_inputs/ are written (and resumed from)."})
    model: str = field(
        default="embedded", metadata={"help": "'embedded' (SmolLM2-135M-Instruct) or a model path / Hub id."}
    )
    encoder: str = field(
        default="embedded",
        metadata={"help": "'embedded' (all-MiniLM-L6-v2) or a sentence-transformers path / Hub id."},
    )
    conversational: bool = field(
        default=False, metadata={"help": "Wrap P3 rows as chat turns (uses the chat template)."}
    )
    limit: Optional[int] = field(default=None, metadata={"help": "Keep a seeded sample of this many rows."})
    seed: int = field(default=0, metadata={"help": "Seed of the sample."})
    max_length: Optional[int] = field(
        default=DEFAULT_MAX_LENGTH, metadata={"help": "Token budget per row, as TKIConfig.max_length."}
    )
    overlong: str = field(
        default="truncate_left", metadata={"help": "'truncate_left' or 'drop' rows over max_length."}
    )


def load_rows(args: PrepareArguments) -> Dataset:
    path = Path(args.data)
    if path.name.endswith(".jsonl.gz"):
        return load_p3(path, limit=args.limit, seed=args.seed, conversational=args.conversational)
    dataset = load_local(path)
    return dataset.shuffle(seed=args.seed).select(range(min(args.limit, len(dataset)))) if args.limit else dataset


DATASET_RECORD = "tki_prepare.json"
"""Inside ``dataset/``: the arguments it was made with, so a rerun with others is refused instead of reusing it."""


def check_dataset_arguments(dataset_dir: Path, args: PrepareArguments) -> None:
    """Refuse a ``dataset/`` made with other data arguments (every argument but ``output_dir``)."""
    record = dataset_dir / DATASET_RECORD
    if not (dataset_dir / "dataset_info.json").is_file():
        return
    if not record.is_file():
        raise SystemExit(
            f"tki-prepare: {dataset_dir} has no record of the arguments it was made with ({DATASET_RECORD}): pass "
            f"another --output_dir, or delete {dataset_dir.parent} to prepare it again."
        )
    made = json.loads(record.read_text())
    asked = {key: value for key, value in asdict(args).items() if key != "output_dir"}
    differ = [
        f"--{key} {made.get(key)!r} (asked: {value!r})" for key, value in asked.items() if made.get(key) != value
    ]
    if differ:
        raise SystemExit(
            f"tki-prepare: {dataset_dir} was made with {', '.join(differ)}: pass another --output_dir, or delete "
            f"{dataset_dir.parent} to prepare it again with these arguments."
        )


def main(argv: list[str] | None = None) -> None:
    args, stage1 = HfArgumentParser((PrepareArguments, PriorInputArguments)).parse_args_into_dataclasses(args=argv)
    if not Path(args.data).is_file():
        raise SystemExit(f"tki-prepare: no data file at {args.data}")
    config = stage1.prior_input_config
    state = PartialState()
    output_dir = Path(args.output_dir)
    check_dataset_arguments(output_dir / "dataset", args)
    model, tokenizer = load_model(args.model)
    model.to(state.device)

    dataset_dir = output_dir / "dataset"
    with state.main_process_first():
        if (dataset_dir / "dataset_info.json").is_file():
            dataset = load_from_disk(str(dataset_dir))
        else:
            dataset = as_prompt_completion(with_ids(load_rows(args)))
            report = None
            if args.max_length:
                dataset, report = fit_prompts(dataset, tokenizer, args.max_length, args.overlong)
            dataset = add_query_embeddings(dataset, query_encoder(args.encoder), cache_dir=output_dir / "_cache")
            if state.is_main_process:
                dataset.save_to_disk(str(dataset_dir))
                made = {key: value for key, value in asdict(args).items() if key != "output_dir"}
                with staged_file(dataset_dir / DATASET_RECORD) as staging:
                    staging.write_text(json.dumps(made, indent=2))
                if report is not None:
                    state.print(f"fit to {args.max_length} tokens: {report}")
    store = compute_prior_inputs(
        model, tokenizer, dataset, output_dir / "prior_inputs", config=config, max_length=args.max_length
    )
    state.print(f"dataset with query embeddings: {dataset_dir} ({len(dataset)} rows)")
    state.print(f"prior inputs: {store.path}\n{json.dumps(store.summary(), indent=2)}")


if __name__ == "__main__":
    main()
