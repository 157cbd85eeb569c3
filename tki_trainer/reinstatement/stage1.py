"""Knowledge reinstatement, stage 1: optimise each prompt's input embeddings towards its target.

For example ``i`` with prompt embeddings ``e_i`` and completion ``y_i``, the model frozen, find
``q_i = argmin CE(f(q_i), y_i) + lam * W(q_i, e_i)`` starting from ``q_i = e_i``. The paper's eq. 5,
``-sum CE(f(q_i), y_i) - W(q_i, e_i)`` with ``CE`` the target's log-likelihood, is ``lam = -1`` (the default): an
input under which the frozen model produces ``y_i`` best, pushed away from the prompt. ``W`` is the Wasserstein
distance between the two sets of token embeddings (uniform weights, squared Euclidean ground cost, whose
gradient is finite at ``q = e``), computed with POT. The ``q_i`` are independent, so all steps of one batch of
examples run before the next batch starts (the paper's "3 epochs" are 3 steps per example).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import ot
import torch
import torch.nn.functional as F
from accelerate import PartialState
from datasets import Dataset
from peft import PeftModel
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from ..data.formats import check_prompt_completion_rows, check_text_ids
from ..data.tokenization import TEMPLATE_COLUMNS, template_arguments, tokenize_row, truncate_row
from ..logits import logits_at
from ..modes import evaluation_mode
from .fingerprint import prompt_hash
from .settings import DEFAULT_MAX_LENGTH, PriorInputConfig
from .store import PriorInputStore


logger = logging.getLogger(__name__)

EMPTY_PROMPT_FIX = (
    "knowledge reinstatement optimises the prompt's token embeddings, so every row needs at least one prompt token; "
    "give these rows a prompt or drop them from the dataset."
)


@dataclass
class PriorInputs:
    """Optimised prompt embeddings of one batch, with the numbers the stage reports."""

    embeddings: torch.Tensor
    """[batch, max_prompt_tokens, hidden]; rows past an example's prompt length are padding."""
    initial: torch.Tensor
    """The real prompt embeddings ``e``, same layout."""
    ce_initial: torch.Tensor
    """[batch] mean completion cross-entropy with the real prompt embeddings."""
    ce_final: torch.Tensor
    """[batch] the same with the optimised embeddings."""
    relative_change: torch.Tensor
    """[batch] |q - e| / |e| over the prompt tokens."""
    wasserstein_gradient_ratio: torch.Tensor
    """[batch] |lam grad W| / |grad CE| at the last step (taken at ``q`` before its last update, the furthest from
    ``e`` a gradient is taken at; 0 without ``W``)."""


def completion_cross_entropy(
    model: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Mean token cross-entropy of each row's labelled tokens, [batch], from the model's own forward, so that stage
    1 lowers the cross-entropy training measures: its LM head with any soft-capping or logit scaling. Logits are
    computed only at the positions that predict a labelled token (`logits_at`), as TRL's fused head does on GPUs;
    on a CPU that head scores every position. A model in bf16 gives its logits in bf16, where TRL's head
    accumulates them in float32: the two CEs then agree to bf16 rounding."""
    targets = labels[:, 1:]
    labelled = targets != -100
    keep = F.pad(labelled, (0, 1))
    lm = model.get_base_model() if isinstance(model, PeftModel) else model
    logits = logits_at(lm, keep, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
    token_ce = F.cross_entropy(logits.float(), targets[labelled], reduction="none")
    rows = labelled.nonzero()[:, 0]
    total = torch.zeros(len(labels), dtype=token_ce.dtype, device=token_ce.device).index_add_(0, rows, token_ce)
    return total / labelled.sum(dim=1).clamp(min=1)


def wasserstein(q: torch.Tensor, e: torch.Tensor, method: str, reg: float) -> torch.Tensor:
    """W between two token clouds [n, hidden] with uniform weights and squared Euclidean cost (POT)."""
    cost = ot.dist(q.double(), e.double())
    weights = torch.full((len(q),), 1.0 / len(q), dtype=torch.float64, device=q.device)
    if method == "emd":
        return ot.emd2(weights, weights, cost)
    return ot.sinkhorn2(weights, weights, cost, reg)


def optimize_prior_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    prompt_lengths: torch.Tensor,
    config: PriorInputConfig,
) -> PriorInputs:
    """Run stage 1 on one right-padded batch whose prompts start at position 0 (TRL's collated layout).

    Gradients are taken with respect to the prompt embeddings only, so the model's weights and their
    ``.grad`` are untouched; the objective is the sum of the examples' objectives, so each ``q_i`` follows its
    own gradient. The caller chooses the model's mode (``eval()`` for no dropout).
    """
    if (prompt_lengths < 1).any():
        rows = (prompt_lengths < 1).nonzero().flatten().tolist()
        raise ValueError(f"Rows {rows} of the batch have no prompt token: {EMPTY_PROMPT_FIX}")
    embedding = model.get_input_embeddings()
    with torch.no_grad():
        embedded = embedding(input_ids)
    width = int(prompt_lengths.max())
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    prompt_mask = (positions < prompt_lengths.unsqueeze(1)).unsqueeze(-1)
    original = embedded[:, :width].clone()
    q = nn.Parameter(original.clone())
    optimizer = torch.optim.Adam([q], lr=config.learning_rate)

    def objective() -> torch.Tensor:
        inputs = torch.where(prompt_mask, F.pad(q, (0, 0, 0, input_ids.shape[1] - width)), embedded)
        return completion_cross_entropy(model, inputs, attention_mask, labels)

    ratio = torch.zeros(len(input_ids), device=input_ids.device)
    for step in range(config.steps):
        ce = objective()
        if step == 0:
            ce_initial = ce.detach()
        (q.grad,) = torch.autograd.grad(ce.sum(), [q])
        if config.wasserstein_weight:
            distances = [
                wasserstein(q[i, :n], original[i, :n], config.wasserstein, config.sinkhorn_reg)
                for i, n in enumerate(prompt_lengths.tolist())
            ]
            (w_grad,) = torch.autograd.grad(torch.stack(distances).sum(), [q])
            w_grad = config.wasserstein_weight * w_grad.to(q.dtype)
            ratio = w_grad.flatten(1).norm(dim=1) / q.grad.flatten(1).norm(dim=1).clamp(min=1e-30)
            q.grad = q.grad + w_grad
        optimizer.step()
    with torch.no_grad():
        ce_final = objective()
    q = q.detach()
    original = original.detach()
    mask = prompt_mask[:, :width]
    delta = ((q - original) * mask).flatten(1).norm(dim=1)
    relative = delta / (original * mask).flatten(1).norm(dim=1).clamp(min=1e-12)
    return PriorInputs(q, original, ce_initial, ce_final, relative, ratio.detach())


def trl_pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The padding id `SFTTrainer` collates with: the tokenizer's pad token, else its end-of-sequence token (padding
    enters no loss, but the same batches make the same numbers)."""
    pad_token = tokenizer.pad_token or tokenizer.eos_token
    if pad_token is None:
        raise ValueError(
            "The tokenizer has neither a pad token nor an eos token to pad with: set tokenizer.pad_token."
        )
    return tokenizer.convert_tokens_to_ids(pad_token)


def compute_prior_inputs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    output_dir: str | os.PathLike,
    *,
    config: PriorInputConfig | None = None,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    chat_template: str | None = None,
) -> PriorInputStore:
    """Knowledge-reinstatement stage 1 over a prompt/completion dataset, written to a resumable store.

    Rows are tokenized exactly as `SFTTrainer` will (prompt span included, ``max_length`` truncation from the
    start, padding as `SFTTrainer` pads); rows TRL would drop are skipped and counted, and a row left without prompt
    tokens is refused before any work. Under ``accelerate launch`` each process takes every n-th example and writes
    its own shards. Rerunning into the same ``output_dir`` continues where the finished
    shards end. Returns the store, whose `summary()` holds the mean CE with ``e`` and ``q`` and |q-e|/|e|.
    """
    config = config or PriorInputConfig()
    check_prompt_completion_rows(dataset)
    check_text_ids(dataset["id"])
    pad_token_id = trl_pad_token_id(tokenizer)
    state = PartialState()
    # Every process tokenizes every row, so that all of them refuse an empty prompt before any work.
    tokenized, skipped, empty = [], 0, []
    template_columns = [c for c in TEMPLATE_COLUMNS if c in dataset.column_names]
    for index, row in enumerate(dataset.select_columns(["id", "prompt", "completion", *template_columns])):
        tokens = tokenize_row(tokenizer, row["prompt"], row["completion"], chat_template, **template_arguments(row))
        tokens = truncate_row(tokens, max_length)
        if tokens is None:
            skipped += 1
        elif tokens.prompt_length == 0:
            empty.append(row["id"])
        elif index % state.num_processes == state.process_index:
            tokenized.append((row["id"], tokens))
    if empty:
        raise ValueError(f"Rows {empty[:5]} ({len(empty)} in all) have no prompt token: {EMPTY_PROMPT_FIX}")
    if not len(dataset):
        raise ValueError("The dataset has no rows: there is nothing to compute prior inputs for.")
    if skipped == len(dataset):
        raise ValueError(
            f"No row keeps a completion token within max_length={max_length} (TRL would drop them all): raise "
            "max_length, or cut the prompts from the left first with tki_trainer.data.fit_prompts."
        )
    store = PriorInputStore.open_or_create(
        output_dir, model, tokenizer, {**config.to_dict(), "max_length": max_length, "chat_template": chat_template}
    )
    pending = [(example_id, tokens) for example_id, tokens in tokenized if example_id not in store.examples]
    pending.sort(key=lambda item: len(item[1].input_ids), reverse=True)
    if skipped and state.is_main_process:
        logger.warning(
            "%d rows have no completion token within max_length=%s and are skipped (TRL drops them)",
            skipped,
            max_length,
        )

    device = next(model.parameters()).device
    collator = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)
    progress = tqdm(total=len(pending), desc="KR stage 1: prior inputs", disable=not state.is_local_main_process)
    with evaluation_mode(model), progress:
        for start in range(0, len(pending), config.batch_size):
            batch = pending[start : start + config.batch_size]
            collated = collator(
                [
                    {
                        "input_ids": row.input_ids,
                        "labels": [-100] * row.prompt_length + row.input_ids[row.prompt_length :],
                    }
                    for _, row in batch
                ]
            )
            collated = {key: value.to(device) for key, value in collated.items()}
            lengths = torch.tensor([row.prompt_length for _, row in batch], device=device)
            result = optimize_prior_inputs(
                model, collated["input_ids"], collated["attention_mask"], collated["labels"], lengths, config
            )
            finite = torch.isfinite(result.embeddings).flatten(1).all(dim=1) & torch.isfinite(result.ce_final)
            if not bool(finite.all()):
                rows = [example_id for (example_id, _), ok in zip(batch, finite.tolist()) if not ok]
                raise ValueError(
                    f"Stage 1 gave non-finite prior inputs for rows {rows[:5]} ({config}); nothing was written for "
                    "them: lower prior_inputs_learning_rate, or use wasserstein='emd' (a small sinkhorn_reg "
                    "overflows)."
                )
            tensors, entries = {}, {}
            for i, (example_id, row) in enumerate(batch):
                delta = result.embeddings[i, : row.prompt_length] - result.initial[i, : row.prompt_length]
                tensors[example_id] = delta.cpu()
                entries[example_id] = {
                    "prompt_hash": prompt_hash(row.prompt_ids),
                    "ce_initial": float(result.ce_initial[i]),
                    "ce_final": float(result.ce_final[i]),
                    "relative_change": float(result.relative_change[i]),
                    "wasserstein_gradient_ratio": float(result.wasserstein_gradient_ratio[i]),
                }
            store.write_shard(f"{state.process_index:03d}-{shard_name(tensors)}", tensors, entries)
            progress.update(len(batch))
            summary = store.summary()
            progress.set_postfix(
                ce=f"{summary['ce_initial']:.3f}->{summary['ce_final']:.3f}", rel=f"{summary['relative_change']:.1e}"
            )
    state.wait_for_everyone()
    store = PriorInputStore(output_dir)
    logger.info("KR stage 1 done: %s", store.summary())
    return store


def shard_name(tensors: dict[str, torch.Tensor]) -> str:
    """A shard's name from the ids it holds, never from what is on disk: a resumed stage that recomputes a deleted
    shard cannot overwrite another."""
    return hashlib.sha256("\0".join(sorted(tensors)).encode()).hexdigest()[:16]


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The base model's behaviour for stage 1 (prior inputs belong to the model before fine-tuning)."""
    with model.disable_adapter() if isinstance(model, PeftModel) else nullcontext():
        yield


def on_the_fly_deltas(model: nn.Module, inputs: dict[str, torch.Tensor], config: PriorInputConfig) -> torch.Tensor:
    """Stage 1 on one collated training batch, with the base model (adapters off, no dropout, as
    `compute_prior_inputs` runs it): ``q - e`` [batch, prompt_tokens, hidden], for ``prior_inputs_mode="on_the_fly"``."""
    labels = inputs["labels"]
    prompt_lengths = (labels != -100).int().argmax(dim=1)
    with evaluation_mode(model), adapters_disabled(model), torch.enable_grad():
        result = optimize_prior_inputs(
            model, inputs["input_ids"], inputs["attention_mask"], labels, prompt_lengths, config
        )
    return (result.embeddings - result.initial).detach()
