"""The prior-input store: stage-1 results as safetensors shards, keyed by example id, read lazily.

Layout of a store directory::

    store.json                       fingerprint of model and tokenizer, stage settings
    shard-<rank>-<n>.safetensors     one tensor per example id: q - e, [prompt_tokens, hidden], bf16;
                                     header metadata: per-example prompt hash and stage-1 numbers

A shard is written under a temporary name and renamed, so it is either complete or absent; a rerun picks up
from the shards that exist. Tensors are read memory-mapped, one example at a time.

What is stored is the delta ``q - e`` (the prior input minus the real prompt embeddings, which the reader
adds back from the model's own, frozen, embedding matrix). In bf16 its error is relative to the small change
``q - e``; storing ``q`` itself in bf16 would put an error relative to the whole embedding on top of a change
of about 1% (``bench/prepare_speed.py`` measures both).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from .._io import staged_directory
from .fingerprint import model_fingerprint, tokenizer_fingerprint
from .settings import RESULT_SETTINGS, PriorInputConfig, result_settings


INDEX = "store.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class StoredExample:
    shard: Path
    prompt_hash: str
    ce_initial: float
    ce_final: float
    relative_change: float
    wasserstein_gradient_ratio: float | None = None
    """Absent from stores written before stage 1 reported it."""


class PriorInputStore:
    """Read access to a store directory, plus the writing and checking that `compute_prior_inputs` and the
    trainer need."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        index = self.path / INDEX
        if not index.is_file():
            raise ValueError(
                f"{self.path} is not a prior-input store (no {INDEX}): write one with tki_trainer.compute_prior_inputs."
            )
        try:
            self.index = json.loads(index.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{index} is not valid JSON ({error}): delete {self.path} and recompute the store with "
                "tki_trainer.compute_prior_inputs."
            ) from None
        self.examples: dict[str, StoredExample] = {}
        for shard in sorted(self.path.glob("shard-*.safetensors")):
            try:
                with safe_open(shard, framework="pt") as handle:
                    entries = json.loads(handle.metadata()["examples"])
            except Exception as error:  # safetensors raises its own error types for truncated or foreign files
                raise ValueError(
                    f"{shard} is not a readable shard ({type(error).__name__}: {error}): delete it and rerun "
                    "compute_prior_inputs into the same directory, which recomputes its examples."
                ) from None
            for example_id, entry in entries.items():
                self.examples[example_id] = StoredExample(shard, **entry)
        self._handles: dict[Path, object] = {}

    @classmethod
    def open_or_create(
        cls,
        path: str | os.PathLike,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        settings: dict,
    ) -> PriorInputStore:
        """The store at ``path``, created if absent; an existing store must have the same model, tokenizer and
        settings (resuming), else it is refused."""
        index = {
            "format": FORMAT_VERSION,
            "model": model_fingerprint(model),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "settings": settings,
        }
        path = Path(path)
        if (path / INDEX).is_file():
            existing = json.loads((path / INDEX).read_text())
            if existing != json.loads(json.dumps(index)):
                differs = sorted(key for key in index if existing.get(key) != json.loads(json.dumps(index[key])))
                raise ValueError(
                    f"{path} already holds prior inputs computed with a different {', '.join(differs)}: pass another "
                    "output_dir, or delete it to recompute."
                )
        else:
            with staged_directory(path) as staging:
                (staging / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        return cls(path)

    def write_shard(self, name: str, tensors: dict[str, torch.Tensor], entries: dict[str, dict]) -> None:
        """Write one shard atomically and make its examples readable."""
        filename = f"shard-{name}.safetensors"
        tensors = {key: value.to(torch.bfloat16).contiguous() for key, value in tensors.items()}
        with staged_directory(self.path) as staging:
            save_file(tensors, staging / filename, metadata={"examples": json.dumps(entries)})
        for example_id, entry in entries.items():
            self.examples[example_id] = StoredExample(self.path / filename, **entry)

    def load_delta(self, example_id: str) -> torch.Tensor:
        """``q - e`` of one example, float32 [prompt_tokens, hidden], read memory-mapped from its shard."""
        shard = self.examples[example_id].shard
        if shard not in self._handles:
            self._handles[shard] = safe_open(shard, framework="pt")
        delta = self._handles[shard].get_tensor(example_id).float()
        if not bool(torch.isfinite(delta).all()):
            raise ValueError(
                f"The prior input of example {example_id!r} in {shard} holds NaN or inf: delete that shard and rerun "
                "compute_prior_inputs into the same directory, which recomputes its examples."
            )
        return delta

    def summary(self) -> dict[str, float]:
        """Means over the stored examples of CE with ``e``, CE with ``q``, |q-e|/|e|, and the ratio of the W
        gradient's norm to the CE gradient's at stage 1's last step (whether W did anything)."""
        values = list(self.examples.values())
        count = max(len(values), 1)
        ce_initial = sum(v.ce_initial for v in values) / count
        ce_final = sum(v.ce_final for v in values) / count
        ratios = [v.wasserstein_gradient_ratio for v in values if v.wasserstein_gradient_ratio is not None]
        return {
            "examples": len(values),
            "ce_initial": ce_initial,
            "ce_final": ce_final,
            "ce_reduction": 1 - ce_final / ce_initial if ce_initial else 0.0,
            "relative_change": sum(v.relative_change for v in values) / count,
            "wasserstein_gradient_ratio": sum(ratios) / len(ratios) if ratios else None,
        }

    def check(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        prompt_hashes: dict[str, str],
        settings: PriorInputConfig | None = None,
    ) -> None:
        """Refuse, with one `ValueError` naming what differs, a store that does not belong to this model,
        tokenizer and these examples' prompt tokens (``{id: prompt_hash}`` of the caller's own tokenization), or,
        given ``settings``, whose stage-1 settings would give other prior inputs than these."""
        problems = []
        stored, asked = self.index["settings"], settings.to_dict() if settings is not None else None
        if asked is not None and result_settings(stored) != result_settings(asked):
            differ = [
                f"{key}={stored.get(key)!r} (asked: {asked[key]!r})"
                for key in RESULT_SETTINGS
                if stored.get(key) != asked[key]
            ]
            problems.append(f"it was computed with other stage-1 settings: {', '.join(differ)}")
        model_now = model_fingerprint(model)
        for key, value in self.index["model"].items():
            if model_now.get(key) != value:
                what = "input-embedding weights" if key == "embedding_sha256" else f"model {key}"
                problems.append(f"{what} differ from the model the store was computed with")
        if tokenizer_fingerprint(tokenizer) != self.index["tokenizer"]:
            problems.append("the tokenizer's vocabulary differs")
        missing = [i for i in prompt_hashes if i not in self.examples]
        changed = [i for i, h in prompt_hashes.items() if i in self.examples and self.examples[i].prompt_hash != h]
        if missing:
            problems.append(f"{len(missing)} examples have no stored prior input (e.g. {missing[:3]})")
        if changed:
            problems.append(
                f"{len(changed)} examples tokenize to other prompt tokens than when stored (e.g. {changed[:3]}; "
                "a different prompt, chat template or max_length)"
            )
        if problems:
            raise ValueError(
                f"The prior-input store {self.path} does not match: "
                + "; ".join(problems)
                + ". Recompute it with tki_trainer.compute_prior_inputs for this model, tokenizer, dataset and "
                "stage-1 settings."
            )
