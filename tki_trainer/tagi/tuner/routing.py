"""Per-example instruction state shared by every layer of one model with a generated LoRA.

As for the TKI tuner, the instructions are held by the tuner, not passed through the layers (transformers does
not forward per-example tensors to a linear layer), and stay in place for the whole call or block, so activation
checkpointing recomputes each layer with the same instructions.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from .config import InstructionLoraConfig


Factors = tuple[torch.Tensor, torch.Tensor]


class _PerExample:
    """A task index for each example of one batch."""

    def __init__(self, task_of_example: torch.Tensor) -> None:
        self.batch_size = task_of_example.shape[0]
        self._task_of_example = task_of_example

    def task_of_row(self, rows: int) -> torch.Tensor:
        """The task index of each of ``rows`` input rows: ``generate`` with beam search or ``num_return_sequences``
        repeats each example's row contiguously (``repeat_interleave``), and so does this."""
        if rows % self.batch_size:
            raise ValueError(
                f"The model received {rows} rows but was given {self.batch_size} instruction embeddings: pass one "
                "instruction embedding per example of the batch."
            )
        return self._task_of_example.repeat_interleave(rows // self.batch_size)


class Instructions(_PerExample):
    """The instruction embeddings of one batch: its distinct tasks, the task of each row, and (without autograd)
    the adapters generated for them."""

    def __init__(self, instruction_embeddings: torch.Tensor) -> None:
        self.tasks, task_of_example = torch.unique(instruction_embeddings, dim=0, return_inverse=True)
        super().__init__(task_of_example)
        self._generated: dict[str, tuple[tuple, dict[str, Factors]]] = {}
        self._gathered: dict[tuple[str, str, int], tuple[tuple, Factors]] = {}

    def cached_factors(self, adapter_name: str, module_name: str, rows: int, hypernet: nn.Module) -> Factors:
        """Without autograd: the whole adapter is generated in one hypernetwork call per distinct task, and each
        module's per-row factors gathered once, kept while the hypernetwork's parameters (their storage and
        in-place version) stay: generation reuses them at every new token."""
        version = tuple((p.data_ptr(), p._version) for p in hypernet.parameters())
        cached = self._gathered.get((adapter_name, module_name, rows))
        if cached is None or cached[0] != version:
            generated = self._generated.get(adapter_name)
            if generated is None or generated[0] != version:
                generated = (version, hypernet(self.tasks))
                self._generated[adapter_name] = generated
            a, b = generated[1][module_name]
            task = self.task_of_row(rows)
            cached = (version, (a[task].transpose(1, 2).contiguous(), b[task]))
            self._gathered[adapter_name, module_name, rows] = cached
        return cached[1]


class GivenLora(_PerExample):
    """LoRA factors given per task instead of generated: a stack of trained LoRAs (TAGI's teachers) applied through
    the tuner's layers, so a batch may mix them in the same gathered product."""

    def __init__(self, factors: Mapping[str, Factors], task_of_example: torch.Tensor, scaling: float) -> None:
        super().__init__(task_of_example)
        self._factors = factors
        self._scaling = scaling

    def factors(self, module_name: str, rows: int) -> Factors:
        """The rows' factors in the layers' layout, ``A^T`` [rows, in, r] and ``B^T`` [rows, r, out], ``B`` divided
        by the layer's scaling because the given factors carry their own (only the gathered rows are touched)."""
        if module_name not in self._factors:
            raise ValueError(
                f"The given LoRA has no factors for {module_name!r}, which the instruction-LoRA adapter targets: "
                "train the LoRA with the adapter's target_modules."
            )
        task = self.task_of_row(rows)
        a, b = self._factors[module_name]
        return a.index_select(0, task).transpose(1, 2), b.index_select(0, task).transpose(1, 2) / self._scaling


def check_instruction_embeddings(
    instruction_embeddings: torch.Tensor, configs: Mapping[str, InstructionLoraConfig], adapter_names: list[str]
) -> None:
    """Refuse, naming the fix, embeddings the given adapters' hypernetworks cannot read."""
    if (
        not isinstance(instruction_embeddings, torch.Tensor)
        or instruction_embeddings.ndim != 2
        or not instruction_embeddings.is_floating_point()
    ):
        raise ValueError(
            "instruction_embeddings must be a float tensor of shape [batch, key_dim], one sentence-encoder embedding "
            "of each example's task instruction; got "
            f"{type(instruction_embeddings).__name__} {tuple(getattr(instruction_embeddings, 'shape', ()))}."
        )
    for adapter_name in adapter_names:
        config = configs[adapter_name]
        if instruction_embeddings.shape[1] != config.key_dim:
            raise ValueError(
                f"instruction_embeddings have dimension {instruction_embeddings.shape[1]} but adapter {adapter_name!r} "
                f"has key_dim={config.key_dim}: encode the instructions with the encoder the adapter was built for"
                + (f" ({config.encoder_name})" if config.encoder_name else "")
                + " or build the adapter with key_dim matching your encoder."
            )
    finite = torch.isfinite(instruction_embeddings).all(dim=1)
    if not bool(finite.all()):
        rows = (~finite).nonzero().flatten().tolist()
        raise ValueError(
            f"instruction_embeddings rows {rows[:5]} hold NaN or inf, which would turn the generated LoRA weights NaN: "
            "re-encode those instructions with the sentence encoder."
        )


class InstructionRouter:
    """Tells each layer which instructions apply now and hands it their generated factors.

    Two sources, the innermost winning: instructions given as keywords to a model call (kept until the next call),
    and instructions set by the `generate_for` context (kept until the block ends).
    """

    def __init__(self, hypernets: nn.ModuleDict, configs: Mapping[str, InstructionLoraConfig]) -> None:
        self._hypernets = hypernets
        self._configs = configs
        self._context: list[Instructions | GivenLora] = []
        self._call: Instructions | None = None

    def resolve(self, instruction_embeddings: torch.Tensor, adapter_names: list[str]) -> Instructions:
        """Validate the embeddings against the given (active) adapters, before any model work."""
        adapter_names = [name for name in adapter_names if name in self._hypernets]
        check_instruction_embeddings(instruction_embeddings, self._configs, adapter_names)
        if adapter_names:
            device = next(self._hypernets[adapter_names[0]].parameters()).device
            instruction_embeddings = instruction_embeddings.to(device)
        return Instructions(instruction_embeddings)

    @contextmanager
    def use_given(self, lora: GivenLora) -> Iterator[None]:
        """Given factors win over a previous call's instructions inside the block (layers reached without the
        tuner's forward, e.g. the decoder called directly, would otherwise see those)."""
        call, self._call = self._call, None
        self._context.append(lora)
        try:
            yield
        finally:
            self._context.pop()
            self._call = call

    @property
    def current(self) -> Instructions | GivenLora | None:
        if self._call is not None:
            return self._call
        return self._context[-1] if self._context else None

    def set_call(self, instruction_embeddings: torch.Tensor | None, adapter_names: list[str]) -> None:
        """Instructions of a model call that received the keyword; a call without it clears them."""
        self._call = None if instruction_embeddings is None else self.resolve(instruction_embeddings, adapter_names)

    @contextmanager
    def use(self, instruction_embeddings: torch.Tensor, adapter_names: list[str]) -> Iterator[None]:
        self._context.append(self.resolve(instruction_embeddings, adapter_names))
        try:
            yield
        finally:
            self._context.pop()

    def require(self) -> Instructions | GivenLora:
        """The instructions in force, or the error that tells the caller how to give them."""
        instructions = self.current
        if instructions is None:
            raise ValueError(
                "The instruction-generated LoRA is active but no instruction embeddings were given: call the model "
                "inside `with tki_trainer.generate_for(model, instruction_embeddings=E):` or pass "
                "`instruction_embeddings=E` to the model or to `generate` (E: [batch, key_dim])."
            )
        return instructions

    def factors(self, adapter_name: str, module_name: str, rows: int) -> Factors:
        """``(A^T [rows, in, r], B^T [rows, r, out])`` of each input row's task for one module.

        With autograd each layer generates its own module's factors for the batch's distinct tasks (the same rows
        through the trunk as one call for all modules): the graph stays local to the layer, so activation
        checkpointing, reentrant or not, recomputes it, and successive forward/backward passes inside one block
        never reach a hypernetwork graph an earlier backward has freed.
        """
        instructions = self.require()
        if isinstance(instructions, GivenLora):
            return instructions.factors(module_name, rows)
        hypernet = self._hypernets[adapter_name]
        if not torch.is_grad_enabled():
            return instructions.cached_factors(adapter_name, module_name, rows, hypernet)
        a, b = hypernet(instructions.tasks, module_name)[module_name]
        task = instructions.task_of_row(rows)
        return a.index_select(0, task).transpose(1, 2), b.index_select(0, task)
