"""`TAGITrainer`: `trl.SFTTrainer` that trains the hypernetwork of an instruction-generated LoRA.

The student is the frozen base model with the LoRA the hypernetwork generates from each row's instruction, reading
the row's input alone; its prediction loss is SFTTrainer's own. With teachers (one plain LoRA per task category,
trained with the instruction in the prompt) two terms join it: the distillation of the teacher's answer
distribution (`losses.distillation`) and the distance of the generated update from the teacher's
(`losses.parameter_matching`). The teachers run through the same layers as the student (`apply_lora`), a batch
mixing categories in one forward without gradients; the student's answer logits come from the hidden states of
the Trainer's own forward, so the distillation costs no second student forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from datasets import Dataset
from peft import PeftConfig, PeftModel
from transformers import PreTrainedModel
from trl import SFTTrainer

from .. import hub
from ..gradients import micro_batch_weight
from ..logits import check_head_logits, head_logits
from ..modes import evaluation_mode
from ..preparation import default_processing_class
from .collator import (
    INSTRUCTION_EMBEDDINGS,
    ROW_COLUMNS,
    STUDENT_DISTILLED,
    TEACHER_ATTENTION_MASK,
    TEACHER_DISTILLED,
    TEACHER_INDEX,
    TEACHER_INPUT_IDS,
    TEACHER_KEYS,
    InstructionCollator,
)
from .config import TAGIConfig
from .losses import distillation, parameter_matching
from .preparation import check_rows, prepare_rows
from .teachers import TeacherLoras
from .tuner import InstructionLoraConfig, apply_lora, find_instruction_tuner, generate_for, generate_lora


class TAGITrainer(SFTTrainer):
    """Trains an instruction-generated LoRA (`InstructionLoraConfig`) as TAGI does: ``L_pred + kl_weight * KL +
    matching_weight * g(d) * d`` (`TAGIConfig`).

    Takes what `SFTTrainer` takes; the model is a base model with ``peft_config`` an `InstructionLoraConfig`, or a
    `PeftModel` holding one. Rows are prompt/completion rows (standard or conversational) whose prompt holds the
    input alone, the instruction in ``args.instruction_column`` and, with teachers, the teacher's name in
    ``args.teacher_column``. Logs ``loss_pred``, and with teachers ``loss_kl``, ``loss_match`` (the squared
    distance, before its weight) and ``match_gate``.
    """

    _tag_names = ["trl", "sft", "tagi"]
    _paper = {
        "title": "Learning to Generate Adapters from Instructions",
        "citation": "@inproceedings{tagi,\n  title = {Learning to Generate Adapters from Instructions},\n  booktitle "
        "= {Advances in Neural Information Processing Systems},\n  year = {2024}\n}",
    }

    def __init__(
        self,
        model: str | PreTrainedModel | PeftModel,
        args: TAGIConfig | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: Any = None,
        peft_config: PeftConfig | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, TAGIConfig):
            raise ValueError(
                f"TAGITrainer takes a TAGIConfig (got {type(args).__name__}): TAGIConfig(output_dir=..., teachers=...)."
            )
        adapter = _adapter_config(model, peft_config)
        teachers = TeacherLoras.load(args.teachers) if args.uses_teachers else None
        check_rows(train_dataset, args, "train", teachers is not None)
        evaluation = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
        for name, rows in evaluation.items():
            check_rows(rows, args, name, False)
        if processing_class is None:  # loaded here, as SFTTrainer would, to tokenize the teacher's side
            processing_class = default_processing_class(model, args)
        train_dataset = prepare_rows(train_dataset, args, processing_class, adapter.key_dim, teachers)
        evaluation = {
            name: prepare_rows(rows, args, processing_class, adapter.key_dim) for name, rows in evaluation.items()
        }
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=evaluation if isinstance(eval_dataset, dict) else evaluation["eval"],
            processing_class=processing_class,
            peft_config=peft_config,
            **kwargs,
        )
        tuner = find_instruction_tuner(self.model)
        if teachers is not None:
            _check_teacher_modules(teachers, tuner)
            if args.kl_weight > 0:
                unwrapped = self.accelerator.unwrap_model(self.model)
                with unwrapped.disable_adapter():
                    check_head_logits(unwrapped, unwrapped.get_base_model().get_decoder(), "The KL term (kl_weight)")
            teachers = teachers.to(self.args.device)
        self.teachers = teachers
        """The teachers' LoRAs, stacked per module (`TeacherLoras`); None without teachers."""
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        self.data_collator = InstructionCollator(
            base=self.data_collator,
            embedding_column=args.instruction_embedding_column,
            pad_token_id=tokenizer.pad_token_id,
        )

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        extra = [self.args.instruction_embedding_column, *(ROW_COLUMNS if self.teachers is not None else ())]
        self._signature_columns = [*self._signature_columns, *(c for c in extra if c not in self._signature_columns)]

    # Training ------------------------------------------------------------------------------------------------------

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """The Trainer's step with the batch's generated LoRAs in force for its backward too (activation
        checkpointing recomputes the layers there)."""
        with generate_for(model, inputs[INSTRUCTION_EMBEDDINGS]):
            return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """SFTTrainer's loss with each row's generated LoRA; in training with teachers, plus the distillation and
        parameter-matching terms, each a mean over the micro-batch weighted so that a step averages its
        micro-batches (`micro_batch_weight`)."""
        mode = "train" if self.model.training else "eval"
        embeddings = inputs.pop(INSTRUCTION_EMBEDDINGS)
        teacher = {key: inputs.pop(key) for key in TEACHER_KEYS if key in inputs}
        unwrapped = self.accelerator.unwrap_model(model)
        distilled = bool(teacher) and self.args.kl_weight > 0 and mode == "train"
        with generate_for(model, embeddings), _last_hidden_state(unwrapped, enabled=distilled) as hidden:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        weight = micro_batch_weight(self, num_items_in_batch)
        self._record("loss_pred", loss / weight, mode)
        if teacher and mode == "train":
            if distilled:
                divergence = self._distillation(unwrapped, hidden[0], teacher)
                loss = loss + weight * self.args.kl_weight * divergence
                self._record("loss_kl", divergence, mode)
            if self.args.matching_weight > 0:
                distance = self._matching(unwrapped, embeddings, teacher[TEACHER_INDEX])
                gate = torch.sigmoid(distance) if self.args.matching_gate == "sigmoid" else torch.ones_like(distance)
                loss = loss + weight * self.args.matching_weight * (gate * distance).mean()
                self._record("loss_match", distance.mean(), mode)
                self._record("match_gate", gate.mean(), mode)
        return (loss, result[1]) if return_outputs else loss

    def _distillation(
        self, model: torch.nn.Module, hidden: torch.Tensor, teacher: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """KL(teacher || student) over the answer tokens both sides predict: the student's logits from the hidden
        states of the Trainer's forward, the teacher's from one forward without gradients."""
        student_logits = _answer_logits(model, hidden, teacher[STUDENT_DISTILLED])
        if student_logits.shape[0] == 0:  # no answer token survived truncation in this micro-batch
            return student_logits.sum()
        with torch.no_grad(), evaluation_mode(model), apply_lora(model, self.teachers.factors, teacher[TEACHER_INDEX]):
            decoder = model.get_base_model().get_decoder()
            teacher_hidden = decoder(
                input_ids=teacher[TEACHER_INPUT_IDS], attention_mask=teacher[TEACHER_ATTENTION_MASK], use_cache=False
            ).last_hidden_state
            teacher_logits = _answer_logits(model, teacher_hidden, teacher[TEACHER_DISTILLED])
        rows = teacher[STUDENT_DISTILLED][:, 1:].nonzero()[:, 0]
        return distillation(student_logits, teacher_logits, rows, self.args.kl_temperature)

    def _matching(self, model: torch.nn.Module, embeddings: torch.Tensor, teachers: torch.Tensor) -> torch.Tensor:
        """Each row's task's squared distance of the generated update from its teacher's, [rows]: one hypernetwork
        call for the micro-batch's distinct tasks. Gated and averaged over rows, the term counts each row once, so
        it splits over equal micro-batches and processes as one batch does (a mean over tasks would not)."""
        tasks, task_of_row = torch.unique(embeddings, dim=0, return_inverse=True)
        teacher_of_task = torch.empty(len(tasks), dtype=teachers.dtype, device=teachers.device)
        teacher_of_task.scatter_(0, task_of_row, teachers)  # one teacher per instruction (checked on the rows)
        tuner = find_instruction_tuner(model)
        config = tuner.peft_config[tuner.active_adapters[0]]
        generated = generate_lora(model, tasks)
        per_task = parameter_matching(
            generated, self.teachers.gather(teacher_of_task), config.lora_alpha / config.r, 1.0
        )
        return per_task[task_of_row]

    def _record(self, name: str, value: torch.Tensor, mode: str) -> None:
        self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value.detach()).mean().item())

    # Sharing -------------------------------------------------------------------------------------------------------

    def create_model_card(
        self, model_name: str | None = None, dataset_name: str | None = None, tags: Any = None
    ) -> None:
        """SFTTrainer's card, with how the hypernetwork was trained and from which instructions."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self.is_world_process_zero():
            hub.add_objectives(self.args.output_dir, [self._card_text()], [self._paper["citation"]])

    def _card_text(self) -> str:
        args = self.args
        rows = self.train_dataset
        count = (
            len(set(rows[args.instruction_column]))
            if rows is not None and args.instruction_column in rows.column_names
            else None
        )
        text = (
            "Adapters generated from instructions (TAGI): a hypernetwork turns the sentence embedding "
            f"({args.instruction_encoder}) of a task's instruction into the LoRA weights of every targeted module; "
            "the model reads each example's input alone."
        )
        if count is not None:
            text += f" Trained on the instructions of {count} tasks."
        if self.teachers is None:
            return text + " Trained on the prediction loss alone (no teachers)."
        return text + (
            f" Teachers: {len(self.teachers.names)} LoRAs trained with the instruction in the prompt "
            f"({', '.join(self.teachers.names[:12])}{', ...' if len(self.teachers.names) > 12 else ''}); loss = "
            f"prediction + {args.kl_weight} x KL(teacher || student) at temperature {args.kl_temperature} + "
            f"{args.matching_weight} x {'sigmoid(d) x ' if args.matching_gate == 'sigmoid' else ''}d, d the squared "
            "distance of the generated update from the teacher's."
        )


def _adapter_config(model: Any, peft_config: PeftConfig | None) -> InstructionLoraConfig:
    """The instruction-LoRA config that will be trained, or the error that names how to give one."""
    if isinstance(model, PeftModel):
        if peft_config is not None:
            raise ValueError("The model is already a PeftModel: pass peft_config=None (its adapter is trained).")
        tuner = find_instruction_tuner(model)
        return tuner.peft_config[tuner.active_adapters[0]]
    if not isinstance(peft_config, InstructionLoraConfig):
        raise ValueError(
            f"TAGITrainer trains an instruction-generated LoRA, but peft_config is {type(peft_config).__name__}: pass "
            "peft_config=tki_trainer.tagi.InstructionLoraConfig(r=..., target_modules=[...])."
        )
    return peft_config


def _check_teacher_modules(teachers: TeacherLoras, tuner: torch.nn.Module) -> None:
    """The teachers must adapt exactly the adapter's modules, at their shapes (a teacher of another model refused
    here rather than in the first forward)."""
    hypernet = tuner.tagi_hypernet[tuner.active_adapters[0]]
    modules = set(hypernet.module_names)
    held = set(teachers.factors)
    if held != modules:
        raise ValueError(
            f"The teachers adapt other modules than the instruction-LoRA adapter (only teachers: "
            f"{sorted(held - modules)[:3]}, only the adapter: {sorted(modules - held)[:3]}): train the teachers with "
            "the InstructionLoraConfig's target_modules."
        )
    layers = dict(tuner.model.named_modules())
    for name, (lora_a, lora_b) in teachers.factors.items():
        layer = layers[name]
        if (lora_a.shape[-1], lora_b.shape[-2]) != (layer.in_features, layer.out_features):
            raise ValueError(
                f"The teachers' LoRA on {name} is {lora_b.shape[-2]} x {lora_a.shape[-1]} but the layer is "
                f"{layer.out_features} x {layer.in_features}: train the teachers on this base model."
            )


@contextlib.contextmanager
def _last_hidden_state(model: torch.nn.Module, enabled: bool) -> Iterator[list[torch.Tensor]]:
    """Record the decoder's last hidden state in the block's forward (SFTTrainer's fused LM head builds no
    logits; the answer positions' logits are projected from it)."""
    hidden: list[torch.Tensor] = []
    if not enabled:
        yield hidden
        return
    decoder = model.get_base_model().get_decoder()
    handle = decoder.register_forward_hook(lambda _module, _args, output: hidden.append(output.last_hidden_state))
    try:
        yield hidden
    finally:
        handle.remove()


def _answer_logits(model: torch.nn.Module, hidden: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Logits [answer tokens, vocab] of the predictions of the ``answer`` positions (a position predicts the token
    after it), in row-major order."""
    predicting = answer[:, 1:].to(hidden.device)
    return head_logits(model, hidden[:, :-1][predicting])
