"""Settings of instruction-vector extraction. Defaults follow the paper (Appendix D) and Todd et al. where the
paper is silent; the authors' code (GangweiJiang/FvForgetting) differs in places, and each of its choices is one
value away, named in the field's help."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from .effects import EFFECT_METRICS
from .prompts import PromptFormat


PATCHES = ("replace", "add")
COUNTERFACTUALS = ("shuffled_labels", "zero_shot")
ACTIVATION_SETTINGS = (
    "shots",
    "activation_prompts",
    "correct_top_k",
    "prompt_template",
    "answer_template",
    "separator",
    "seed",
)
"""The settings a task's mean activations depend on (with its examples, the model and the tokenizer)."""
EFFECT_SETTINGS = (*ACTIVATION_SETTINGS, "effect_prompts", "effect_metric", "patch", "counterfactual")
"""The settings a task's causal effects depend on. Batching, the layer and the number of heads kept are in
neither: changing them reuses every stored task."""


@dataclass
class IVConfig:
    shots: int = field(default=10, metadata={"help": "Demonstrations per in-context prompt (paper: 10)."})
    activation_prompts: int = field(
        default=200,
        metadata={
            "help": "Queries per task whose N-shot prompts give the task-conditioned activations, averaged over "
            "those answered correctly (paper: 200 validation samples; the code averages 100 prompts whose "
            "queries are drawn again and again from the correctly answered ones)."
        },
    )
    effect_prompts: int = field(
        default=20,
        metadata={
            "help": "Counterfactual prompts per task on which every head's causal effect is measured; their queries "
            "are correctly answered ones (Todd et al.). Not in the paper; the code's default n_trials is 20."
        },
    )
    top_heads: int = field(
        default=10, metadata={"help": "Heads with the largest mean causal effect kept (paper: 10)."}
    )
    heads: list[tuple[int, int]] | None = field(
        default=None,
        metadata={
            "help": "Use these (layer, head) pairs instead of scoring causal effects: the paper (Appendix D) and the "
            "code's --universal_set take Todd et al.'s heads for Llama-2-7B."
        },
    )
    layer: int | None = field(
        default=None,
        metadata={
            "help": "Decoder layer whose output the IV is added to; None: num_hidden_layers // 3 (Todd et al.'s "
            "|L|/3). The paper does not give it; the code's training scripts use 9 of Llama-2-7B's 32."
        },
    )
    correct_top_k: int | None = field(
        default=1,
        metadata={
            "help": "A prompt is answered correctly when the answer's first token ranks in the top k (paper: 1, the "
            "greedy answer starts right). The code's --gen keeps rank < 10 among the 100 lowest-NLL prompts "
            "(about 10). None keeps every prompt."
        },
    )
    effect_metric: Literal["probability", "log_likelihood"] = field(
        default="probability",
        metadata={
            "help": "'probability': rise of the correct answer's (first token's) probability (paper, Todd et al.); "
            "'log_likelihood': rise of the whole answer's mean log-likelihood (the code with --gen)."
        },
    )
    patch: Literal["replace", "add"] = field(
        default="replace",
        metadata={
            "help": "'replace': the head outputs its task-conditioned mean (paper, Todd et al.); 'add': the mean is "
            "added to the head's own output (the code's replace_activation_w_avg uses +=)."
        },
    )
    counterfactual: Literal["shuffled_labels", "zero_shot"] = field(
        default="shuffled_labels",
        metadata={
            "help": "The prompts heads are patched into: 'shuffled_labels', N shots with their outputs permuted "
            "(paper); 'zero_shot', the query alone (the code calls compute_indirect_effect with n_shots=0)."
        },
    )
    prompt_template: str = field(default=PromptFormat.prompt_template, metadata={"help": "Query text, {input}."})
    answer_template: str = field(
        default=PromptFormat.answer_template,
        metadata={
            "help": "Answer text continuing the prompt, {output}. The code's scripts use '{input}' / ' {output}'."
        },
    )
    separator: str = field(default=PromptFormat.separator, metadata={"help": "Text after each demonstration."})
    task_column: str = field(default="task", metadata={"help": "Column naming each row's task."})
    input_column: str = field(default="input", metadata={"help": "Column holding the input."})
    output_column: str = field(default="output", metadata={"help": "Column holding the expected output."})
    seed: int = field(default=0, metadata={"help": "Seeds every draw of demonstrations, queries and label orders."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per forward when capturing activations."})
    heads_per_batch: int = field(
        default=64, metadata={"help": "Patched heads per forward when scoring causal effects (one row each)."}
    )
    reuse_prefix: bool = field(
        default=True,
        metadata={
            "help": "Run each counterfactual prompt up to its last token once and only the rest per batch of heads "
            "(same effects, far fewer tokens); False reruns the whole prompt."
        },
    )

    def __post_init__(self) -> None:
        positive = ("shots", "activation_prompts", "effect_prompts", "top_heads", "batch_size", "heads_per_batch")
        low = [f"{name}={getattr(self, name)}" for name in positive if getattr(self, name) < 1]
        if low:
            raise ValueError(f"IVConfig: {', '.join(low)}: each must be at least 1.")
        if self.correct_top_k is not None and self.correct_top_k < 1:
            raise ValueError(f"correct_top_k={self.correct_top_k}: pass k >= 1 (1: top answer), or None for all.")
        for name, allowed in (
            ("effect_metric", EFFECT_METRICS),
            ("patch", PATCHES),
            ("counterfactual", COUNTERFACTUALS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if self.heads is not None:
            self.heads = [(int(layer), int(head)) for layer, head in self.heads]
            if not self.heads:
                raise ValueError("heads=[]: give at least one (layer, head) pair, or None to score causal effects.")
        for name in ("prompt_template", "answer_template"):
            needed = "{input}" if name == "prompt_template" else "{output}"
            if needed not in getattr(self, name):
                raise ValueError(f"{name}={getattr(self, name)!r} must contain {needed}.")

    @property
    def format(self) -> PromptFormat:
        return PromptFormat(self.prompt_template, self.answer_template, self.separator)

    def to_dict(self) -> dict:
        return asdict(self)

    def settings(self, names: tuple[str, ...]) -> dict:
        return {name: getattr(self, name) for name in names}
