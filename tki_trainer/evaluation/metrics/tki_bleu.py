"""BLEU-4 as sacrebleu's corpus BLEU (tokenizer 13a, default smoothing) with every reference of an example, x100."""

import datasets
import evaluate
import sacrebleu


class TkiBleu(evaluate.Metric):
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
        depth = max(len(options) for options in references)
        streams = [[options[i] if i < len(options) else None for options in references] for i in range(depth)]
        return {"bleu": sacrebleu.corpus_bleu(predictions, streams, tokenize="13a").score}
