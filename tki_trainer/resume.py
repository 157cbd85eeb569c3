"""Resuming a run: a checkpoint must hold the kind of adapter the run trains."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel


def check_resumable(model: torch.nn.Module, checkpoint: str, lta: bool) -> None:
    """Refuse a checkpoint of another adapter type (``lta`` or the adapter switched between the runs), whose
    optimizer state would otherwise fail to load deep inside torch."""
    peft_type = model.active_peft_config.peft_type if isinstance(model, PeftModel) else "full-model"
    now = getattr(peft_type, "value", peft_type)
    name = model.active_adapter if isinstance(model, PeftModel) else ""
    # PEFT saves an adapter not named "default" in a folder of its name
    saved = [p for p in (Path(checkpoint), Path(checkpoint, name)) if (p / "adapter_config.json").is_file()]
    then = json.loads((saved[0] / "adapter_config.json").read_text())["peft_type"] if saved else "full-model"
    if then != now:
        raise ValueError(
            f"{checkpoint} holds a {then} checkpoint, but this run trains a {now} one (lta={lta}): resume with the "
            "settings that wrote it, or start a new run in another output_dir."
        )
