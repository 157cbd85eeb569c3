"""What every benchmark records next to its numbers: the machine, the library versions, and the command."""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib.metadata import version
from pathlib import Path

import torch

from tki_trainer.presets import prior_input_config


RESULTS = Path(__file__).parent / "results"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
"""The shared data folder beside the repository."""
P3 = SHARED_DATA / "p3"
SNI = SHARED_DATA / "sni"
STAGE1 = prior_input_config("embedded")
"""KR stage 1 of the embedded preset (recipes/sni_llama.py)."""
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "sentence-transformers", "tki-trainer")


def environment() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "machine": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "python": sys.version.split()[0],
        "versions": {name: version(name) for name in LIBRARIES},
        "command": " ".join(
            [
                *(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_")),
                Path(sys.executable).name,
                *sys.argv,
            ]
        ),
    }


def write_results(name: str, payload: dict, table: str) -> None:
    """``results/<name>.json`` (every number, with the environment) and ``results/<name>.md`` (the short table)."""
    RESULTS.mkdir(exist_ok=True)
    payload = {**payload, "environment": environment()}
    as_json = json.dumps(
        payload, indent=2, default=lambda value: sorted(value) if isinstance(value, set) else str(value)
    )
    (RESULTS / f"{name}.json").write_text(as_json + "\n")
    env = payload["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    (RESULTS / f"{name}.md").write_text(
        f"{table}\n\n{env['machine']['cpu']}, {env['machine']['torch_threads']} threads; {versions}.\n`{env['command']}`\n"
    )
