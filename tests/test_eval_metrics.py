"""Scoring functions against hand-computed values, and the `evaluate` modules loaded offline from their folders."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from llama2_hf.evaluation import scoring

METRICS = Path(__file__).resolve().parents[1] / "llama2_hf" / "metrics"


@pytest.mark.parametrize("text,strict,flexible", [
    ("5 + 3 = 8. The answer is 8.", "8", "8."),
    ("We have 1,200 dollars. The answer is $1,200.", "[invalid]", "$1,200."),  # "$" breaks the strict regex
    ("The answer is 1,234.\n\nQ: The answer is 7.", "1,234", "7."),  # strict: first; flexible: last
    ("Then -3 - 4 = -7. The answer is -7", "[invalid]", "-7"),  # no character after the number
    ("no numbers here", "[invalid]", "[invalid]"),
    ("It costs 5 and 42", "[invalid]", "42"),
])
def test_gsm8k_extraction(text, strict, flexible):
    assert scoring.gsm8k_extract(text, "strict") == strict
    assert scoring.gsm8k_extract(text, "flexible") == flexible


def test_gsm8k_exact_match_normalisation():
    assert scoring.gsm8k_gold("She pays 18 * 2 = <<18*2=36>>36.\n#### 1,036") == "1,036"
    assert scoring.normalize_gsm8k_answer("$1,036.") == "1036"
    assert scoring.gsm8k_exact_match("$1,036.", "1,036")
    assert scoring.gsm8k_exact_match("8.", "8")
    assert not scoring.gsm8k_exact_match("8.0", "8")  # only a final period goes, as in lm-eval
    assert not scoring.gsm8k_exact_match("[invalid]", "8")
    assert scoring.majority_vote(["7", "$8", "8.", "[invalid]", "[invalid]", "[invalid]"]) == "8"
    assert scoring.majority_vote(["[invalid]", "[invalid]"]) == "[invalid]"
    with pytest.raises(ValueError, match="mode"):
        scoring.gsm8k_extract("x", "loose")


def test_mc_scores_by_hand():
    # log-likelihoods ln(0.5), ln(0.3), ln(0.2): MC2 with the first two true = 0.8 (the probabilities sum to 1).
    lls = [math.log(0.5), math.log(0.3), math.log(0.2)]
    assert scoring.mc2_score(lls, [1, 1, 0]) == pytest.approx(0.8)
    # Unnormalised likelihoods are renormalised: exp(-1) / (exp(-1) + exp(-2)) = 1 / (1 + e^-1) = 0.731059
    assert scoring.mc2_score([-1.0, -2.0], [1, 0]) == pytest.approx(0.7310586)
    # Far below exp's range: still defined (lm-eval's exp would underflow to 0/0).
    assert scoring.mc2_score([-2000.0, -2001.0], [1, 0]) == pytest.approx(0.7310586)
    assert scoring.mc1_correct([-1.0, -0.5], [1, 0]) is False
    assert scoring.mc1_correct([-1.0, -1.0], [1, 0]) is True  # ties go to the first answer, as np.argmax
    with pytest.raises(ValueError, match="one label per answer"):
        scoring.mc2_score([0.0], [1, 0])


def test_judge_and_toxicity_aggregation_by_hand():
    assert scoring.judge_rates([0.9, 0.2, 0.5, 0.7], [0.8, 0.9, 0.1, 0.5]) == {
        "true": 0.75, "info": 0.75, "true_info": 0.5}
    out = scoring.toxicity_by_group([1, 0, 1, 1, 0, 0], ["a", "a", "b", "b", "c", "c"], ["a", "b", "c"])
    assert out == {"toxic/a": 0.5, "toxic/b": 1.0, "toxic/c": 0.0, "toxic_mean": 0.5}
    # Unweighted over groups: a group with more generations does not count more.
    out = scoring.toxicity_by_group([1, 1, 1, 0], ["a", "a", "a", "b"])
    assert out["toxic_mean"] == 0.5
    with pytest.raises(ValueError, match=r"no generations for groups \['women'\]"):
        scoring.toxicity_by_group([1], ["a"], ["a", "women"])


def test_evaluate_modules_load_offline():
    evaluate = pytest.importorskip("evaluate")
    gsm = evaluate.load(str(METRICS / "gsm8k_exact_match"))
    assert gsm.compute(predictions=["So 3 + 5 = 8. The answer is 8.", "I think it is 1,200 dollars", "no idea"],
                       references=["x\n#### 8", "#### 1200", "#### 3"]) == {
        "exact_match_strict": pytest.approx(1 / 3), "exact_match_flexible": pytest.approx(2 / 3)}
    mc2 = evaluate.load(str(METRICS / "truthfulqa_mc2"))
    out = mc2.compute(predictions=[[math.log(0.5), math.log(0.3), math.log(0.2)], [0.0, 0.0, 0.0, 0.0]],
                      references=[[1, 1, 0], [1, 0, 0, 0]])
    assert out["mc2"] == pytest.approx((0.8 + 0.25) / 2)
    judge = evaluate.load(str(METRICS / "truthfulqa_judge"))
    assert judge.compute(truth_scores=[0.6, 0.4], info_scores=[0.6, 0.6], threshold=0.5) == {
        "true": 0.5, "info": 1.0, "true_info": 0.5}
    tox = evaluate.load(str(METRICS / "toxigen_toxicity"))
    assert tox.compute(predictions=[1, 0, 0, 0], groups=["asian", "asian", "women", "women"]) == {
        "toxic/asian": 0.5, "toxic/women": 0.0, "toxic_mean": 0.25}
