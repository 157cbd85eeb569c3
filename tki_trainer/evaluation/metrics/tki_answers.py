"""Scores of generated answers as the TKI paper and SNI report them, x100, every example against all its references:
BLEU-4 (sacrebleu corpus BLEU, tokenizer 13a, default smoothing), ROUGE-1/2/L (rouge_score with the Porter stemmer,
per example the best F-measure, averaged), exact match (stripped, lowercased, equal to any reference).
With ``per_example=True`` the result also holds each example's ROUGE and exact-match values under ``per_example``."""

import datasets
import evaluate
import sacrebleu
from rouge_score import rouge_scorer


ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


class TkiAnswers(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: list of str; references: list of lists of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references, per_example=False):
        count = max(len(predictions), 1)
        depth = max(len(options) for options in references)
        streams = [[options[i] if i < len(options) else None for options in references] for i in range(depth)]
        results = {"bleu": sacrebleu.corpus_bleu(predictions, streams, tokenize="13a").score}
        scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
        rows = {key: [] for key in (*ROUGE_KEYS, "exact_match")}
        for prediction, options in zip(predictions, references):
            scores = [scorer.score(reference, prediction) for reference in options]
            for key in ROUGE_KEYS:
                rows[key].append(100 * max(score[key].fmeasure for score in scores))
            rows["exact_match"].append(
                100.0 * (prediction.strip().lower() in {reference.strip().lower() for reference in options})
            )
        results.update({key: sum(values) / count for key, values in rows.items()})
        if per_example:
            results["per_example"] = rows
        return results
