"""N-shot in-context prompts built from a task's own examples, seeded per task, tokenized once before any forward."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence


@dataclass(frozen=True)
class PromptFormat:
    """How an example reads: ``prompt_template`` holds ``{input}``, ``answer_template`` holds ``{output}`` and
    continues the prompt, ``separator`` ends each demonstration. The defaults are Todd et al.'s ``Q:``/``A:``
    template (the answer after a space, so its first token is the word the model predicts after ``A:``)."""

    prompt_template: str = "Q: {input}\nA:"
    answer_template: str = " {output}"
    separator: str = "\n\n"

    def demonstration(self, source: str, target: str) -> str:
        return self.prompt_template.format(input=source) + self.answer_template.format(output=target) + self.separator


@dataclass
class EncodedPrompt:
    """One in-context prompt: its token ids, and the ids of the answer the model should continue it with."""

    prompt_ids: list[int]
    answer_ids: list[int]
    query: int
    """Index of the queried example within its task."""


def task_generator(seed: int, task: str, purpose: str) -> torch.Generator:
    """A generator seeded by the seed, the task's name and what it draws, so a task's prompts do not depend on
    which other tasks are in the run or in what order they come (a resumed run draws the same prompts)."""
    digest = hashlib.sha256(f"{seed}\0{task}\0{purpose}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def encode_prompt(
    tokenizer: Any,
    template: PromptFormat,
    demonstrations: list[tuple[str, str]],
    query: tuple[str, str],
    index: int,
) -> EncodedPrompt:
    """Prompt and answer are tokenized apart (the prompt with the tokenizer's special tokens, the answer without),
    so no merge across their boundary hides where the answer starts."""
    text = "".join(template.demonstration(*pair) for pair in demonstrations)
    text += template.prompt_template.format(input=query[0])
    prompt_ids = tokenizer(text)["input_ids"]
    answer_ids = tokenizer(template.answer_template.format(output=query[1]), add_special_tokens=False)["input_ids"]
    return EncodedPrompt(prompt_ids, answer_ids, index)


def n_shot_prompts(
    tokenizer: Any,
    template: PromptFormat,
    examples: list[tuple[str, str]],
    queries: list[int],
    shots: int,
    generator: torch.Generator,
    shuffle_labels: bool = False,
) -> list[EncodedPrompt]:
    """For each query, ``shots`` demonstrations drawn from the task's other examples; with ``shuffle_labels`` their
    outputs are permuted among them (the counterfactual prompt of the causal-effect step)."""
    prompts = []
    for query in queries:
        others = torch.tensor([i for i in range(len(examples)) if i != query])
        picked = others[torch.randperm(len(others), generator=generator)[:shots]].tolist()
        outputs = [examples[i][1] for i in picked]
        if shuffle_labels:
            outputs = [outputs[j] for j in torch.randperm(len(outputs), generator=generator).tolist()]
        demonstrations = [(examples[i][0], output) for i, output in zip(picked, outputs)]
        prompts.append(encode_prompt(tokenizer, template, demonstrations, examples[query], query))
    return prompts


def padded_batch(prompts: list[EncodedPrompt], pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The prompts right-padded (positions start at 0 in every row, as in an unpadded forward), with the index of
    each one's last prompt token."""
    ids = [torch.tensor(p.prompt_ids) for p in prompts]
    return {
        "input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_token_id).to(device),
        "attention_mask": pad_sequence([torch.ones_like(i) for i in ids], batch_first=True).to(device),
        "last": torch.tensor([len(i) - 1 for i in ids], device=device),
    }
