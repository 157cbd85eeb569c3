"""A Trainer callback that scores routed greedy answers on a held-out set at every evaluation."""

from __future__ import annotations

from datasets import Dataset
from transformers import Trainer, TrainerCallback

from .generation import answer_budgets, generate_answers
from .scoring import score_by


class GenerationEvaluationCallback(TrainerCallback):
    """On each evaluation, generate answers for ``dataset`` (``prompt``, ``references``, query embeddings) and log
    ``eval_generation_<metric>`` for the whole set and ``eval_generation_<group>_<metric>`` per group."""

    def __init__(
        self, trainer: Trainer, dataset: Dataset, group_column: str | None = None, batch_size: int = 8
    ) -> None:
        if "references" not in dataset.column_names:
            raise ValueError("The evaluation set needs a 'references' column (a list of acceptable answers per row).")
        self.trainer = trainer
        self.dataset = dataset
        self.group_column = group_column
        self.batch_size = batch_size

    def on_evaluate(self, args, state, control, **kwargs):
        tokenizer = self.trainer.processing_class
        groups = self.dataset[self.group_column] if self.group_column else ["all"] * len(self.dataset)
        budgets = answer_budgets(tokenizer, self.dataset["references"], groups)
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        answers = generate_answers(
            model,
            tokenizer,
            self.dataset,
            max_new_tokens=budgets,
            group_column=self.group_column,
            batch_size=self.batch_size,
        )
        metrics = score_by(answers, self.dataset["references"], groups)
        logs = {f"eval_generation_{name}": value for name, value in metrics.pop("all").items()}
        if self.group_column:
            logs.update(
                {
                    f"eval_generation_{group}_{name}": value
                    for group, values in metrics.items()
                    for name, value in values.items()
                }
            )
        self.trainer.log(logs)
