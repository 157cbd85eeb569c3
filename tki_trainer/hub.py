"""The model card of a TKI adapter, rendered from ``model_card_template.md`` with a run's real values."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from .tuner import LatentLoraConfig


def _template() -> str:
    """The repository's ``model_card_template.md``, shipped inside the package."""
    return resources.files("tki_trainer").joinpath("model_card_template.md").read_text()


def _listing(value) -> str:
    return value if isinstance(value, str) else ", ".join(sorted(value))


def render_model_card(
    config: LatentLoraConfig,
    *,
    repo_id: str,
    training_data: str,
    evaluation: str,
) -> str:
    """The card's Markdown: front matter (base model, ``peft``/``trl``/``tki`` tags), TKI settings, data, results,
    and usage for both loading paths."""
    return _template().format(
        title=repo_id.split("/")[-1],
        repo_id=repo_id,
        base_model=config.base_model_name_or_path or "unknown",
        num_groups=config.num_groups,
        keys_per_group=config.keys_per_group,
        num_latent_tasks=config.num_latent_tasks,
        top_k=config.top_k,
        blend=config.blend,
        r=config.r if config.use_shared_lora else "off",
        lora_alpha=config.lora_alpha,
        target_modules=_listing(config.target_modules),
        latent_r=config.latent_r,
        latent_alpha=config.latent_alpha,
        latent_target_modules=_listing(config.latent_target_modules),
        encoder_name=config.encoder_name or "the encoder used in training",
        key_dim=config.key_dim,
        inference_retrieval=config.inference_retrieval,
        training_data=training_data,
        evaluation=evaluation,
    )


def write_model_card(adapter_dir: str | os.PathLike, text: str) -> None:
    """Replace PEFT's generic ``README.md`` in the adapter directory."""
    (Path(adapter_dir) / "README.md").write_text(text)
