import socket

import numpy as np
import pytest
import sacrebleu
import torch
from datasets import Dataset
from peft import get_peft_model
from rouge_score import rouge_scorer

from conftest import KEY_DIM, tiny_llama, tiny_tokenizer, tki_config, trained_like
from tki_trainer.evaluation import (
    answer_budgets,
    completion_nll,
    generate_answers,
    score,
    score_by,
    score_examples,
    scoring,
)
from tki_trainer.evaluation.comparison import paired_bootstrap
from tki_trainer.tuner import route


PREDICTIONS = ["The cat sat on the mat.", "paris", "A skier skis down the mountains", "no idea"]
REFERENCES = [
    ["A cat was sitting on the mat."],
    ["Paris", "City of Paris"],
    ["Skier skis down the mountain", "A skier is skiing."],
    ["yes"],
]


def test_metrics_equal_rouge_score_and_sacrebleu_computed_directly():
    result = score(PREDICTIONS, REFERENCES)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        best = [max(scorer.score(r, p)[key].fmeasure for r in refs) for p, refs in zip(PREDICTIONS, REFERENCES)]
        assert result[key] == pytest.approx(100 * sum(best) / len(best))
    streams = [[refs[0] for refs in REFERENCES], [refs[1] if len(refs) > 1 else None for refs in REFERENCES]]
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, streams, tokenize="13a").score)
    assert result["exact_match"] == 25.0


def test_per_example_scores_are_each_examples_best_reference_and_average_to_the_corpus_score():
    rows = score_examples(PREDICTIONS, REFERENCES)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert rows["rougeL"] == pytest.approx(
        [100 * max(scorer.score(r, p)["rougeL"].fmeasure for r in refs) for p, refs in zip(PREDICTIONS, REFERENCES)]
    )
    assert rows["exact_match"] == [0.0, 100.0, 0.0, 0.0]
    corpus = score(PREDICTIONS, REFERENCES)
    assert all(sum(rows[key]) / len(PREDICTIONS) == pytest.approx(corpus[key]) for key in rows)


def test_scoring_touches_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    scoring._module.cache_clear()
    assert score(["a b"], [["a b"]])["exact_match"] == 100.0


def test_breakdown_scores_each_group_and_all():
    result = score_by(PREDICTIONS, REFERENCES, ["x", "x", "y", "y"])
    assert set(result) == {"all", "x", "y"}
    assert result["x"]["exact_match"] == 50.0 and result["y"]["exact_match"] == 0.0


def test_answer_budgets_follow_the_longest_reference():
    tokenizer = tiny_tokenizer()
    budgets = answer_budgets(tokenizer, [["land"], ["The island is an island of land."]], ["a", "b"])
    assert (
        budgets["a"] < budgets["b"]
        and budgets["b"]
        == int(len(tokenizer("The island is an island of land.", add_special_tokens=False)["input_ids"]) * 1.25) + 8
    )


def test_routed_generation_keeps_dataset_order_and_matches_row_by_row():
    model = trained_like(get_peft_model(tiny_llama(), tki_config()))
    generator = torch.Generator().manual_seed(0)
    dataset = Dataset.from_list(
        [
            {"prompt": p, "task": t, "query_embedding": torch.randn(KEY_DIM, generator=generator).tolist()}
            for p, t in [("Paris is", "b"), ("The is", "a"), ("Answer:", "a")]
        ]
    )
    tokenizer = tiny_tokenizer()
    together = generate_answers(
        model, tokenizer, dataset, max_new_tokens={"a": 3, "b": 5}, group_column="task", batch_size=3
    )
    alone = [
        generate_answers(model, tokenizer, dataset.select([i]), max_new_tokens={"a": 3, "b": 5}, group_column="task")[
            0
        ]
        for i in range(3)
    ]
    assert together == alone and all(isinstance(answer, str) for answer in together)
    with pytest.raises(ValueError, match="no 'query_embedding' column"):
        generate_answers(model, tokenizer, dataset.remove_columns("query_embedding"))


def test_callback_logs_generation_scores_at_each_evaluation(tmp_path):
    from tki_trainer import TKIConfig, TKITrainer
    from tki_trainer.evaluation import GenerationEvaluationCallback

    generator = torch.Generator().manual_seed(0)
    rows = [
        {
            "id": f"r{i}",
            "prompt": p,
            "completion": c,
            "task": t,
            "references": [c.strip()],
            "query_embedding": torch.randn(KEY_DIM, generator=generator).tolist(),
        }
        for i, (p, c, t) in enumerate([("Paris is", " the capital.", "a"), ("The island is", " land.", "b")] * 2)
    ]
    dataset = Dataset.from_list(rows)
    args = TKIConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        kr=False,
        dataset_num_proc=None,
        save_strategy="no",
        activation_checkpointing=False,
    )
    trainer = TKITrainer(
        tiny_llama(),
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tiny_tokenizer(),
        peft_config=tki_config(),
    )
    trainer.add_callback(GenerationEvaluationCallback(trainer, dataset, group_column="task", batch_size=2))
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "eval_generation_rougeL" in entry)
    assert {"eval_generation_bleu", "eval_generation_a_rougeL", "eval_generation_b_exact_match"} <= set(logged)


def test_paired_bootstrap_on_a_constant_shift_and_on_noise():
    rng = np.random.default_rng(0)
    b = np.repeat(rng.normal(30, 35, size=(1, 400)), 3, axis=0)
    shifted = paired_bootstrap(b + 1.5, b)
    assert (shifted.difference, shifted.low, shifted.high) == pytest.approx((1.5, 1.5, 1.5))
    assert shifted.verdict == "a better"
    single = paired_bootstrap(b[:1] + rng.normal(0, 20, size=(1, 400)), b[:1])
    assert single.standard_error == pytest.approx(20 / np.sqrt(400), rel=0.15)
    assert single.low < single.difference < single.high
    assert single.detectable == pytest.approx(2.8 * single.standard_error, rel=0.01)
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap(b[:, :10], b[:, :11])


def test_generation_with_a_tokenizer_without_a_pad_token_gives_the_same_answers():
    model = trained_like(get_peft_model(tiny_llama(), tki_config()))
    generator = torch.Generator().manual_seed(0)
    dataset = Dataset.from_list(
        [
            {"prompt": p, "query_embedding": torch.randn(KEY_DIM, generator=generator).tolist()}
            for p in ("Paris is", "The is")
        ]
    )
    with_pad = generate_answers(model, tiny_tokenizer(), dataset, max_new_tokens=3, batch_size=2)
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    assert generate_answers(model, tokenizer, dataset, max_new_tokens=3, batch_size=2) == with_pad
    assert tokenizer.pad_token is None


def test_pairing_seeds_cancels_what_a_seed_does_to_both_systems():
    rng = np.random.default_rng(1)
    examples = rng.normal(50, 10, size=400)
    seed_effect = np.array([[-6.0], [0.0], [6.0]])
    b = examples + seed_effect
    a = b + 1.0 + rng.normal(0, 0.1, size=b.shape)
    paired = paired_bootstrap(a, b, paired_seeds=True)
    unpaired = paired_bootstrap(a, b)
    assert paired.low > 0.95 and paired.high < 1.05
    assert unpaired.high - unpaired.low > 20 * (paired.high - paired.low)
    assert paired.difference == pytest.approx(unpaired.difference)
    with pytest.raises(ValueError, match="same training seeds"):
        paired_bootstrap(a[:2], b, paired_seeds=True)


def test_completion_nll_equals_each_rows_own_loss_routed_by_its_query():
    """Batched, padded and routed, each row's score is the mean token loss of its completion computed alone."""
    tokenizer = tiny_tokenizer()
    model = trained_like(get_peft_model(tiny_llama(), tki_config())).eval()
    prompts = ["The island is", "Paris is the capital of a country called", "Answer:"]
    completions = [" an island of land.", " France.", " yes or no, the answer is no"]
    embeddings = torch.randn(3, KEY_DIM, generator=torch.Generator().manual_seed(5))
    rows = Dataset.from_dict({"prompt": prompts, "completion": completions, "query_embedding": embeddings.tolist()})
    scores = completion_nll(model, tokenizer, rows, batch_size=2)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
        labels = [-100] * len(prompt_ids) + ids[len(prompt_ids) :]
        with torch.no_grad(), route(model, embeddings[i : i + 1]):
            alone = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        assert scores[i] == pytest.approx(float(alone), rel=1e-5)
    with pytest.raises(ValueError, match="add_query_embeddings"):
        completion_nll(model, tokenizer, rows.remove_columns("query_embedding"))
