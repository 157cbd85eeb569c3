"""ROUGE-1/2/L as the TKI paper and SNI report it: rouge_score with the Porter stemmer, per example the best
F-measure over its references, averaged over examples, x100."""

import datasets
import evaluate
from rouge_score import rouge_scorer


class TkiRouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: list of str; references: list of lists of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
        for prediction, options in zip(predictions, references):
            scores = [scorer.score(reference, prediction) for reference in options]
            for key in totals:
                totals[key] += max(score[key].fmeasure for score in scores)
        return {key: 100 * value / max(len(predictions), 1) for key, value in totals.items()}
