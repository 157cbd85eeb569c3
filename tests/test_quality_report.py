"""The quality benchmark's report pairs only what was trained for both rows: a run that stands in for another
(TKI without PCGrad when PCGrad never projected) must not be paired with the model it is."""

import pytest

import quality


def result(answers: list[str]) -> dict:
    return {"ids": list(range(len(answers))), "answers": answers, "per_example": {"rougeL": [0.0] * len(answers)}}


def run(method: str, lr: float, seed: int, validation: float, sni: list[str] | None = None) -> dict:
    evaluations = {"validation": {"all": {"rougeL": validation}}}
    if sni is not None:
        evaluations["sni"] = result(sni)
    return {"config": {"method": method, "learning_rate": lr, "seed": seed, "stage1": "embedded"}, "eval": evaluations}


@pytest.fixture
def runs() -> dict[str, dict]:
    runs = {
        "tki-lr0.0001-s0": run("tki", 1e-4, 0, 10.0),
        "tki-lr0.0003-s0": run("tki", 3e-4, 0, 20.0, ["a", "b", "c"]),
        "tki-lr0.0003-s1": run("tki", 3e-4, 1, 0.0, ["a", "b", "c"]),
        "tki_no_pcgrad-lr0.0003-s1": run("tki_no_pcgrad", 3e-4, 1, 0.0, ["a", "x", "c"]),
    }
    for lr in (1e-4, 3e-4):
        name = quality.run_name("tki_no_pcgrad", lr, 0)
        runs[name] = {**run("tki_no_pcgrad", lr, 0, 0.0), "same_as": quality.run_name("tki", lr, 0)}
    return runs


def test_a_stand_in_gives_the_run_it_stands_for(runs):
    assert quality.chosen_rate(runs, "tki_no_pcgrad") == 3e-4
    rows = quality.rows_of(runs, "tki_no_pcgrad", "sni")
    assert sorted(rows) == [0, 1]
    assert rows[0] is runs["tki-lr0.0003-s0"]["eval"]["sni"]


def test_a_stand_in_seed_is_never_paired_with_its_own_run(runs):
    first, second = quality.common_seeds(runs, "tki", "tki_no_pcgrad", "sni")
    assert sorted(first) == sorted(second) == [1]
    assert quality.same_answers(runs, "tki", "tki_no_pcgrad", "sni") == {"same": 2, "of": 3, "seeds": [1]}


def test_rows_scored_on_different_prompts_are_refused(runs):
    runs["tki_no_pcgrad-lr0.0003-s1"]["eval"]["sni"]["ids"] = [0, 1, 7]
    with pytest.raises(ValueError, match="different sni prompts"):
        quality.common_seeds(runs, "tki", "tki_no_pcgrad", "sni")
