"""Sharing a TKI adapter: its model card, rendered from ``model_card_template.md`` with a run's real values, and
the upload of an adapter directory to the Hub."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi
from huggingface_hub.utils import filter_repo_objects

from ._io import staged_file
from .preparation import cache_dir
from .tuner import LatentLoraConfig, export_lora
from .tuner.model import find_tuner


if TYPE_CHECKING:
    from .trainer import TKITrainer


PUSH_IGNORE = ("_*", "checkpoint-*", ".*", "*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")
"""Never uploaded: caches (``_*``), the Trainer's resume checkpoints, hidden files, and anything pickled
(``training_args.bin``, ``optimizer.pt``, ...)."""


def _template() -> str:
    """The repository's ``model_card_template.md``, shipped inside the package."""
    return resources.files("tki_trainer").joinpath("model_card_template.md").read_text()


def hub_id(value: str | os.PathLike | None) -> str | None:
    """The Hub id a model or data source stands for: a Hub id as it is, a local snapshot of the Hub cache (its
    ``models--owner--name`` folders) by the id it was downloaded from, any other local path None."""
    if value is None:
        return None
    text = str(value)
    path = Path(text).expanduser()
    if not (path.is_absolute() or text.startswith((".", "~")) or path.exists()):
        return text
    for part in reversed(path.parts):
        if part.startswith(("models--", "datasets--")):
            return "/".join(part.split("--")[1:])
    return None


def public_name(value: str | os.PathLike | None) -> str | None:
    """How prose in anything uploaded names a model or data source: its `hub_id`, else its file or folder name,
    never a user's directories."""
    if value is None:
        return None
    return hub_id(value) or Path(str(value)).expanduser().resolve().name


def _listing(value) -> str:
    return value if isinstance(value, str) else ", ".join(sorted(value))


def render_model_card(
    config: LatentLoraConfig,
    *,
    repo_id: str,
    training_data: str,
    evaluation: str,
    citations: Sequence[str] = (),
) -> str:
    """The card's Markdown: front matter (base model, ``peft``/``trl``/``tki`` tags), TKI settings, data, results,
    usage for both loading paths, and the BibTeX of ``citations``."""
    return _template().format(
        title=repo_id.split("/")[-1],
        repo_id=repo_id,
        base_model=public_name(config.base_model_name_or_path) or "unknown",
        base_model_line=f"base_model: {found}\n" if (found := hub_id(config.base_model_name_or_path)) else "",
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
        citations="\n\n".join(citations),
    )


def training_summary(
    args: Any,
    rows: int | None,
    dataset_name: str | None,
    objectives: Sequence[str] = (),
    epochs: float | None = None,
) -> str:
    """The card's "Training" line, from a `TKIConfig`: rows, length, epochs (``epochs`` trained, else the
    configured number), rate, effective batch, switches, then what each auxiliary objective says of its training
    (``objectives``). Paths are named by `public_name`."""
    dataset_name = public_name(dataset_name)
    source = f" of `{dataset_name}`" if dataset_name else ""
    counted = "streamed rows" if rows is None else f"{rows} rows"
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    switches = ", ".join(f"{name}={getattr(args, name)}" for name in ("lta", "kr", "pcgrad"))
    epochs = args.num_train_epochs if epochs is None else epochs
    summary = (
        f"{counted}{source}, at most {args.max_length} tokens, {epochs:.3g} epoch(s), learning rate "
        f"{args.learning_rate:g}, effective batch {batch}; {switches}, reinstatement alpha {args.reinstatement_alpha:g}."
    )
    return " ".join([summary, *objectives])


def evaluation_table(log_history: list[dict[str, Any]]) -> str:
    """The last evaluation a run logged, as a Markdown table (the card's "Evaluation" section)."""
    last = next((entry for entry in reversed(log_history) if any(key.startswith("eval_") for key in entry)), None)
    if last is None:
        return "No evaluation was run during training."
    rows = [
        f"| {key.removeprefix('eval_')} | {value:.4g} |"
        for key, value in last.items()
        if key.startswith("eval_") and isinstance(value, (int, float))
    ]
    return f"At step {last.get('step', '?')}:\n\n| metric | value |\n|---|---|\n" + "\n".join(rows)


def add_objectives(adapter_dir: str | os.PathLike, texts: Sequence[str | None], citations: Sequence[str]) -> None:
    """Append to a card SFTTrainer wrote what each auxiliary objective says of its training, and their papers."""
    card = Path(adapter_dir) / "README.md"
    lines = "\n\n".join(text for text in texts if text)
    papers = "".join(f"\n\n```bibtex\n{citation}\n```" for citation in citations)
    write_model_card(adapter_dir, f"{card.read_text().rstrip()}\n\n## Training objectives\n\n{lines}{papers}\n")


def write_model_card(adapter_dir: str | os.PathLike, text: str) -> None:
    """Replace PEFT's generic ``README.md`` in the adapter directory."""
    with staged_file(Path(adapter_dir) / "README.md") as staging:
        staging.write_text(text)


class PushError(RuntimeError):
    """An upload failed; the local files are as they were."""


def push_adapter(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    revision: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload TKI adapter",
    prior_inputs: str | os.PathLike | None = None,
    plain_lora: str | os.PathLike | None = None,
) -> CommitInfo:
    """Upload an adapter directory to the Hub as one commit, so a failed push changes nothing there either.

    Uploads every file of ``folder`` except `PUSH_IGNORE` (the adapter config and safetensors, the model card,
    tokenizer files), plus, when given, a prior-input store under ``prior_inputs/`` (it can be large) and an
    exported plain LoRA (`export_lora`) under ``plain_lora/``. The repo is created if needed. On failure raises
    `PushError`, whose message never holds the token.
    """
    folder = Path(folder)
    missing = [name for name in ("adapter_config.json", "adapter_model.safetensors") if not (folder / name).is_file()]
    full_model = (folder / "config.json").is_file() and any(folder.glob("model*.safetensors"))
    if missing and not full_model:
        raise ValueError(
            f"{folder} is not a saved adapter (missing {missing}) nor a saved model: save it with "
            "model.save_pretrained first."
        )
    if prior_inputs is not None and not Path(prior_inputs, "store.json").is_file():
        raise ValueError(
            f"{prior_inputs} holds no prior-input store (no store.json): pass the directory compute_prior_inputs wrote."
        )
    if plain_lora is not None and not Path(plain_lora, "adapter_config.json").is_file():
        raise ValueError(f"{plain_lora} holds no adapter: write it with tki_trainer.export_lora first.")
    operations = _additions(folder, "")
    operations += _additions(Path(prior_inputs), "prior_inputs") if prior_inputs is not None else []
    operations += _additions(Path(plain_lora), "plain_lora") if plain_lora is not None else []
    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        return api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
    except Exception as error:
        raise PushError(
            f"Pushing {folder} to {repo_id} failed ({_redacted(str(error), token)}). The local files are unchanged: "
            "fix the cause and rerun the push (trainer.push_to_hub() or tki_trainer.push_adapter)."
        ) from None


def _additions(folder: Path, path_in_repo: str) -> list[CommitOperationAdd]:
    """Every uploadable file of ``folder``; an adapter config names its base model by its `hub_id` (a local base
    model's folder name could resolve to another model on the Hub)."""
    files = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
    operations = []
    for name in filter_repo_objects(files, ignore_patterns=list(PUSH_IGNORE)):
        content: str | bytes = str(folder / name)
        if Path(name).name == "adapter_config.json":
            config = json.loads((folder / name).read_text())
            config["base_model_name_or_path"] = hub_id(config.get("base_model_name_or_path"))
            content = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
        operations.append(
            CommitOperationAdd(path_in_repo=f"{path_in_repo}/{name}".lstrip("/"), path_or_fileobj=content)
        )
    return operations


def _redacted(text: str, token: str | None) -> str:
    """``text`` without the token, nor anything shaped like a Hub token."""
    if token:
        text = text.replace(token, "***")
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "***", text)


def write_trainer_card(
    trainer: TKITrainer,
    citations: Sequence[str],
    *,
    model_name: str | None = None,
    dataset_name: str | None = None,
    evaluation: str | None = None,
) -> None:
    """A `TKITrainer`'s card (`model_card_template.md`) from its adapter config, arguments, objectives and logs:
    base model, TKI settings, data, the run's last evaluation (or ``evaluation``, Markdown), usage for both loading
    paths, and the BibTeX of ``citations``."""
    tuner = find_tuner(trainer.model)
    rows = len(trainer.train_dataset) if isinstance(trainer.train_dataset, Dataset) else None
    card = render_model_card(
        tuner.peft_config[tuner.active_adapters[0]],
        repo_id=repo_id_of(trainer, model_name),
        training_data=training_summary(
            trainer.args,
            rows,
            dataset_name,
            [text for objective in trainer.objectives if (text := objective.card_text())],
            epochs=trainer.state.epoch or None,
        ),
        evaluation=evaluation or evaluation_table(trainer.state.log_history),
        citations=citations,
    )
    write_model_card(trainer.args.output_dir, card)


def repo_id_of(trainer: TKITrainer, model_name: str | None = None) -> str:
    """Where a trainer pushes: its Hub model id, else ``model_name``, else its output directory's name."""
    return trainer.hub_model_id or trainer.args.hub_model_id or model_name or Path(trainer.args.output_dir).name


def push_trainer(
    trainer: TKITrainer,
    commit_message: str,
    hub_settings: dict[str, Any],
    prior_inputs: bool,
    plain_lora_query: torch.Tensor | None,
    card_kwargs: dict[str, Any],
) -> CommitInfo | None:
    """`TKITrainer.push_to_hub`: save, write the card (``card_kwargs``: `create_model_card`'s arguments) and upload
    through `push_adapter`; ``hub_settings`` (``token``, ``revision``, ``private``) fall back to the arguments'."""
    uploads = {name: path for objective in trainer.objectives for name, path in objective.uploads().items()}
    if prior_inputs and "prior_inputs" not in uploads:
        raise ValueError(
            "prior_inputs=True needs a prior-input store, which this trainer (kr=False or on_the_fly) has not."
        )
    args = trainer.args
    trainer.callback_handler.on_push_begin(args, trainer.state, trainer.control)
    trainer.save_model(_internal_call=True)
    if not trainer.is_world_process_zero():
        return None
    trainer.create_model_card(**card_kwargs)
    plain_lora = None
    if plain_lora_query is not None:
        plain_lora = cache_dir(args) / "plain_lora"
        export_lora(trainer.accelerator.unwrap_model(trainer.model), plain_lora_query, plain_lora)
    return push_adapter(
        args.output_dir,
        repo_id_of(trainer),
        token=_given(hub_settings["token"], args.hub_token),
        revision=_given(hub_settings["revision"], args.hub_revision),
        private=_given(hub_settings["private"], args.hub_private_repo),
        commit_message=commit_message,
        prior_inputs=uploads["prior_inputs"] if prior_inputs else None,
        plain_lora=plain_lora,
    )


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value
