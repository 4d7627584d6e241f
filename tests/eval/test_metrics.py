"""Each local metric module, loaded through evaluate.load(path), against values worked out by hand."""

from __future__ import annotations

import math

import pytest
from modeling_deepseek_v3.eval.metrics import load_metric


def test_accuracy_by_hand():
    acc = load_metric("accuracy")
    assert acc.compute(predictions=[0, 1, 2, 3], references=[0, 1, 0, 0])["accuracy"] == 0.5
    # Weighted: hits weigh 1 + 3 of a total 1 + 3 + 4.
    out = acc.compute(predictions=[1, 1, 0], references=[1, 1, 1], sample_weight=[1.0, 3.0, 4.0])
    assert out["accuracy"] == pytest.approx(0.5)


def test_exact_match_normalisation():
    em = load_metric("exact_match")
    assert em.compute(predictions=["42", "7", "x"], references=["42", "8", "x"])["exact_match"] == pytest.approx(2 / 3)
    assert em.compute(predictions=["Hello!"], references=["hello"])["exact_match"] == 0.0
    assert (
        em.compute(predictions=["Hello!"], references=["hello"], ignore_case=True, ignore_punctuation=True)[
            "exact_match"
        ]
        == 1.0
    )
    assert em.compute(predictions=["1,000"], references=["1000"], regexes_to_ignore=[","])["exact_match"] == 1.0


def test_perplexity_is_token_weighted():
    # Documents of 1 and 3 tokens with NLLs 1.0 and 5.0 nats: mean 6/4 = 1.5, not (1 + 5/3) / 2.
    out = load_metric("perplexity").compute(nll=[1.0, 5.0], num_tokens=[1, 3])
    assert out["mean_nll"] == pytest.approx(1.5)
    assert out["perplexity"] == pytest.approx(math.exp(1.5))
    assert out["bits_per_token"] == pytest.approx(1.5 / math.log(2))
    assert out["num_tokens"] == 4


def test_pass_at_k_unbiased_estimator():
    # n=5, c=2: pass@1 = 2/5; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7; pass@5 = 1 (every draw has a pass).
    # n=5, c=0: all zero. Means over the two problems:
    out = load_metric("pass_at_k").compute(num_samples=[5, 5], num_correct=[2, 0], k=[1, 2, 5, 10])
    assert out == pytest.approx({"pass@1": 0.2, "pass@2": 0.35, "pass@5": 0.5})  # pass@10 skipped: n < 10
    # n - c < k: certain success.
    assert load_metric("pass_at_k").compute(num_samples=[3], num_correct=[2], k=[2])["pass@2"] == 1.0
    with pytest.raises(ValueError, match="num_correct"):
        load_metric("pass_at_k").compute(num_samples=[1], num_correct=[2], k=[1])
