"""Scoring against direct computation: perplexity, windowing, multiple choice, left padding, GSM8K extraction."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from modeling_deepseek_v3.eval.lm import LM, cut_at_stop
from modeling_deepseek_v3.eval.tasks import parse_spec
from modeling_deepseek_v3.eval.tasks.gsm8k import extract_answer
from modeling_deepseek_v3.eval.tasks.multiple_choice import LETTERS
from modeling_deepseek_v3.eval.tasks.perplexity import windows

from .conftest import FIXTURES


def _direct_nll(model, ids: list[int]) -> torch.Tensor:
    """Per-token NLL of ids[1:] given the prefix, from one unpadded forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")


def test_windows_score_every_token_once():
    for n, max_len, stride in [(2, 4, 2), (10, 4, 1), (10, 4, 3), (100, 16, 8), (17, 16, 15)]:
        scored = [t for _, s, e in windows(n, max_len, stride) for t in range(s, e)]
        assert scored == list(range(1, n))
        assert all(e - b <= max_len and b < s for b, s, e in windows(n, max_len, stride))


def test_perplexity_equals_exp_mean_nll(debug_model, tokenizer):
    lm = LM(debug_model, tokenizer, batch_size=4, progress=False)
    task = parse_spec(f"perplexity={FIXTURES / 'docs.jsonl'}")
    task.load()
    nll = [
        _direct_nll(debug_model, [tokenizer.bos_token_id] + tokenizer(d, add_special_tokens=False).input_ids)
        for d in task.documents
    ]
    expected = math.exp(torch.cat(nll).mean().item())
    out = task.evaluate(lm)
    assert out["num_tokens"] == sum(len(x) for x in nll)
    assert out["perplexity"] == pytest.approx(expected, rel=1e-4)


def test_sliding_windows_match_direct_windowed_nll(debug_model, tokenizer):
    lm = LM(debug_model, tokenizer, batch_size=3, progress=False)
    task = parse_spec(f"perplexity={FIXTURES / 'wiki.txt'},max_length=24,stride=10")
    task.load()
    ids = [tokenizer.bos_token_id] + tokenizer(task.documents[0], add_special_tokens=False).input_ids
    total = 0.0
    for b, s, e in windows(len(ids), 24, 10):  # each window alone, unpadded, its scored tail only
        total += _direct_nll(debug_model, ids[b:e])[s - b - 1 :].sum().item()
    out = task.evaluate(lm)
    assert out["num_tokens"] == len(ids) - 1
    assert out["mean_nll"] == pytest.approx(total / (len(ids) - 1), rel=1e-4)


def test_left_padded_batches_match_single_rows(small_vocab_model):
    rng = random.Random(0)
    reqs = [
        (
            [0] + [rng.randrange(2, 512) for _ in range(rng.randrange(1, 20))],
            [rng.randrange(2, 512) for _ in range(rng.randrange(1, 6))],
        )
        for _ in range(7)
    ]
    batched = LM(small_vocab_model, batch_size=7, progress=False).loglikelihood(reqs)
    single = LM(small_vocab_model, batch_size=1, progress=False).loglikelihood(reqs)
    for (a, ga), (b, gb) in zip(batched, single, strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    # And against a direct sum of log-probabilities.
    ctx, cont = reqs[0]
    direct = -_direct_nll(small_vocab_model, ctx + cont)[len(ctx) - 1 :].sum().item()
    assert single[0][0] == pytest.approx(direct, abs=1e-4)


def test_multiple_choice_picks_highest_loglikelihood(debug_model, tokenizer, tmp_path):
    # Questions whose "correct" letter is, by construction, the model's highest-likelihood one (then the lowest).
    rows, best, worst = [], [], []
    for i in range(3):
        question = f"Constructed question {i}: which option?"
        prompt = question + "".join(f"\n{L}. option {L.lower()}{i}" for L in LETTERS) + "\nAnswer:"
        ctx = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False).input_ids
        scores = []
        for L in LETTERS:
            cont = tokenizer(f" {L}", add_special_tokens=False).input_ids
            scores.append(-_direct_nll(debug_model, ctx + cont)[len(ctx) - 1 :].sum().item())
        best.append(LETTERS[max(range(4), key=scores.__getitem__)])
        worst.append(LETTERS[min(range(4), key=scores.__getitem__)])
        rows.append([question] + [f"option {L.lower()}{i}" for L in LETTERS])
    lm = LM(debug_model, tokenizer, batch_size=5, progress=False)
    for answers, expected in [(best, 1.0), (worst, 0.0)]:
        path = tmp_path / "mc.csv"
        path.write_text("".join(",".join(r + [a]) + "\n" for r, a in zip(rows, answers, strict=True)))
        task = parse_spec(f"mmlu={path}")
        task.load()
        assert task.evaluate(lm)["accuracy"] == expected


def test_gsm8k_answer_extraction():
    assert extract_answer("so 3 + 4 = 7.\n#### 7") == "7"
    assert extract_answer("#### $1,200.00") == "1200"
    assert extract_answer("#### -3") == "-3"
    assert extract_answer("the answer is 12 apples, then 15.") == ""
    assert extract_answer("the answer is 12 apples, then 15.", strict=False) == "15"
    assert cut_at_stop("x = 1\n\nQuestion: next", ["Question:", "\n\nQuestion:"]) == "x = 1"  # the earliest match wins


def test_fixtures_parse_in_every_format():
    for spec, n in [
        (f"mmlu={FIXTURES / 'mmlu_astronomy_test.csv'}", 4),
        (f"mmlu={FIXTURES / 'mmlu_astronomy_dev.csv'}", 2),  # header row skipped
        (f"arc={FIXTURES / 'arc_challenge.jsonl'}", 3),
        (f"arc={FIXTURES / 'arc_easy_hf.jsonl'}", 2),
    ]:
        task = parse_spec(spec)
        task.load()
        assert len(task.questions) == n
    task = parse_spec(f"gsm8k={FIXTURES / 'gsm8k.jsonl'}")
    task.num_fewshot = 2
    task.load()
    assert [e.target for e in task.examples] == ["10", "39", "35", "300"]
    prompt = task.build_prompts()[0]
    assert prompt.count("Question:") == 3 and prompt.endswith("Answer:") and "####" in prompt
