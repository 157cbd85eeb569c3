"""Exact match: the prediction, stripped and lowercased, equals any reference treated the same way; x100."""

import datasets
import evaluate


class TkiExactMatch(evaluate.Metric):
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
        hits = sum(
            prediction.strip().lower() in {reference.strip().lower() for reference in options}
            for prediction, options in zip(predictions, references)
        )
        return {"exact_match": 100 * hits / max(len(predictions), 1)}
