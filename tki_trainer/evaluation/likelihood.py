"""The likelihood of each reference answer: a cheap, low-variance measure beside greedy-answer scores.

Greedy answers change only where the argmax flips, so two similar models answer most prompts alike and a ROUGE-L
difference needs hundreds of prompts to resolve; the mean token negative log-likelihood of the reference moves
with every change to the model and costs one forward per row, no generation.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from ..data.tokenization import tokenize_row, truncate_row
from ..logits import logits_at
from ..modes import evaluation_mode
from ..reinstatement.stage1 import trl_pad_token_id
from ..tuner.model import TKIModel, route


@torch.no_grad()
def completion_nll(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    *,
    max_length: int | None = None,
    query_column: str = "query_embedding",
    batch_size: int = 8,
) -> list[float]:
    """Mean token negative log-likelihood of each row's ``completion`` given its ``prompt``, in dataset order.

    Rows are tokenized as `SFTTrainer` tokenizes them (chat template, ``max_length`` truncation that keeps the
    start); a model holding the TKI tuner is routed by each row's ``query_column`` with no group ids, as for unseen
    inputs. A row left with no completion token within ``max_length`` is refused, since it has nothing to score.
    """
    routed = any(isinstance(module, TKIModel) for module in model.modules())
    if routed and query_column not in dataset.column_names:
        raise ValueError(
            f"The model routes by query but the dataset has no '{query_column}' column: add_query_embeddings first."
        )
    rows = []
    for index, (prompt, completion) in enumerate(zip(dataset["prompt"], dataset["completion"])):
        row = truncate_row(tokenize_row(tokenizer, prompt, completion), max_length)
        if row is None:
            raise ValueError(f"Row {index} has no completion token within max_length={max_length}: raise max_length.")
        rows.append(row)
    collator = DataCollatorForLanguageModeling(pad_token_id=trl_pad_token_id(tokenizer))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    device = next(model.parameters()).device
    losses = [0.0] * len(rows)
    with evaluation_mode(model):
        for start in tqdm(range(0, len(order), batch_size), desc="Scoring reference answers"):
            batch = order[start : start + batch_size]
            examples = [
                {
                    "input_ids": rows[i].input_ids,
                    "labels": [-100] * rows[i].prompt_length + rows[i].input_ids[rows[i].prompt_length :],
                }
                for i in batch
            ]
            inputs = {key: value.to(device) for key, value in collator(examples).items()}
            labels = inputs.pop("labels")
            queries = torch.tensor([dataset[i][query_column] for i in batch]) if routed else None
            targets = labels[:, 1:]
            labelled = targets != -100
            with route(model, queries) if routed else contextlib.nullcontext():
                logits = logits_at(model, F.pad(labelled, (0, 1)), **inputs)
            token_nll = F.cross_entropy(logits.float(), targets[labelled], reduction="none")
            rows_of_tokens = labelled.nonzero()[:, 0]
            summed = torch.zeros(len(batch), device=device).index_add_(0, rows_of_tokens, token_nll)
            per_row = summed / labelled.sum(dim=1)
            for i, value in zip(batch, per_row.tolist()):
                losses[i] = value
    return losses
