"""MTP self-speculative decoding: greedy equals plain greedy, sampling keeps the target distribution, stats add up."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from modeling_deepseek_v3 import DSV3ForCausalLM, speculative
from modeling_deepseek_v3.speculative import (
    SpeculativeOutput,
    _compact,
    make_copying_mtp_,
    mtp_generate,
    warped_probs,
)

NEW = 24  # new tokens per greedy run: several verification steps, short enough for a fast CPU test


def make_model(tiny_config, depth: int, leak: float | None = None, **overrides) -> DSV3ForCausalLM:
    """A seeded debug model with `depth` MTP modules; `leak` makes its MTP copy the main model (make_copying_mtp_)."""
    model = DSV3ForCausalLM(tiny_config(num_nextn_predict_layers=depth, **overrides)).eval()
    with torch.no_grad():
        for moe in model.moe_layers():  # routing that is not uniform, as in a trained model
            moe.gate.e_score_correction_bias.normal_(0, 0.2)
    return model if leak is None else make_copying_mtp_(model, leak)


def ragged_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of lengths 9, 6 and 4 (pad id 0, never a prompt token)."""
    ids = torch.randint(2, vocab, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


def check_stats(out: SpeculativeOutput, depth: int) -> None:
    # The definitions in speculative.py's docstring: D drafts per running row per step.
    assert 0 <= out.accepted <= out.drafted and out.drafted % depth == 0
    assert 0.0 <= out.acceptance_rate <= 1.0
    assert out.acceptance_rate == pytest.approx(out.accepted / out.drafted)
    assert out.mean_accepted_length == pytest.approx(1 + out.accepted / (out.drafted / depth))
    assert 1.0 <= out.mean_accepted_length <= depth + 1


def test_warped_probs_match_transformers_warpers():
    logits = torch.randn(4, 50) * 3
    cases = ((0.7, 5, 0.8, None), (1.3, None, 0.5, None), (1.0, 3, None, None), (1.0, None, None, None),
             (0.9, None, None, 0.1), (1.2, 20, 0.95, 0.05))  # fmt: skip
    for temperature, top_k, top_p, min_p in cases:
        warpers = LogitsProcessorList()
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k is not None:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p is not None:
            warpers.append(TopPLogitsWarper(top_p))
        if min_p is not None:
            warpers.append(MinPLogitsWarper(min_p))
        expected = warpers(None, logits.clone()).softmax(-1)
        got = warped_probs(logits, temperature, top_k, top_p, min_p)
        torch.testing.assert_close(got, expected)
        assert min_p is None or (expected == 0).any()  # the min-p cases do cut tokens


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_equals_plain_greedy(tiny_config, depth, batch):
    # Random MTP: drafts are nearly always rejected, so this checks the verify/rollback path and the bonus token.
    model = make_model(tiny_config, depth)
    ids, mask = ragged_batch(model.config.vocab_size)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    if batch == 1:  # the unpadded row, without a mask: generate()'s default mask path
        ids, kwargs["attention_mask"] = ids[:1], None
    plain = model.generate(ids, **kwargs)
    spec = model.generate(ids, **kwargs, use_mtp=True)
    assert torch.equal(spec, plain)
    check_stats(model.last_speculative_stats, depth)


@pytest.mark.parametrize("depth", [1, 2])
def test_greedy_equals_plain_greedy_with_ragged_acceptance(tiny_config, depth, monkeypatch):
    # A leaky copying MTP accepts some drafts, differently per row: rows advance by different amounts, the cache
    # gets holes, and compact_slack=2 compacts it (moves holes left, drops shared ones) during the run.
    compactions = []
    monkeypatch.setattr(speculative, "_compact", lambda *a: compactions.append(1) or _compact(*a))
    model = make_model(tiny_config, depth, leak=0.6)
    ids, mask = ragged_batch(model.config.vocab_size)
    plain = model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    out = mtp_generate(model, ids, mask, max_new_tokens=NEW, compact_slack=2)
    assert torch.equal(out.sequences, plain)
    check_stats(out, depth)
    assert 0.2 < out.acceptance_rate < 0.9  # both the accept and the reject paths ran
    assert compactions


@pytest.mark.parametrize("depth", [1, 2])
def test_copying_mtp_is_always_accepted(tiny_config, depth):
    model = make_model(tiny_config, depth, leak=0.0)
    ids, mask = ragged_batch(model.config.vocab_size)
    plain = model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    out = mtp_generate(model, ids, mask, max_new_tokens=NEW)
    assert torch.equal(out.sequences, plain)
    assert out.acceptance_rate == 1.0 and out.mean_accepted_length == depth + 1
    assert out.steps == math.ceil((NEW - 1) / (depth + 1))  # the first token comes from the prefill


def test_eos_stops_each_row_like_generate(tiny_config):
    model = make_model(tiny_config, 2, leak=0.6)
    ids, mask = ragged_batch(model.config.vocab_size)
    free = model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    eos = int(free[1, ids.shape[1] + 5])  # row 1 stops after 6 tokens; the others when (if) they meet it
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=eos)
    plain = model.generate(ids, **kwargs)
    spec = model.generate(ids, **kwargs, use_mtp=True)
    assert torch.equal(spec, plain)
    assert (plain[1, ids.shape[1] + 6 :] == 0).all()  # the check has teeth: row 1 really stopped early


def test_generate_wiring(tiny_config):
    model = make_model(tiny_config, 1)
    ids = torch.randint(2, model.config.vocab_size, (2, 5))
    out = model.generate(ids, max_new_tokens=6, use_mtp=True, return_dict_in_generate=True, eos_token_id=None)
    assert isinstance(out, SpeculativeOutput) and out.sequences.shape == (2, 11)
    assert model.last_speculative_stats is out
    for bad in (dict(num_beams=2), dict(repetition_penalty=1.3), dict(min_new_tokens=4)):
        with pytest.raises(ValueError, match="does not support"):
            model.generate(ids, max_new_tokens=6, use_mtp=True, **bad)


@pytest.mark.parametrize(
    "depth, temperature, top_k, top_p", [(1, 1.0, None, 0.9), (2, 0.8, 4, None)], ids=["D1-top_p", "D2-top_k"]
)
def test_sampling_keeps_the_target_distribution(tiny_config, check_three_token_law, depth, temperature, top_k, top_p):
    """The joint law of 3 sampled tokens (8-token vocabulary: 512 cells) against the exact one computed from the
    main model alone. Token 1 comes from the prefill; tokens 2-3 go through draft acceptance, residual resampling
    and bonus tokens. A leaky copying MTP with peaked logits gives drafts that differ from the target (acceptance
    ~0.65), so a wrong acceptance rule moves cells by several percent: chi-square in the thousands at N = 6000."""
    torch.manual_seed(0)
    model = make_model(tiny_config, depth, leak=1.0, vocab_size=8, num_hidden_layers=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # peaked distributions: p and q differ, and top-k/top-p bite
    N, prompt = 6000, torch.tensor([[3, 5, 2, 7]])
    gen = torch.Generator().manual_seed(0)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    out = mtp_generate(model, prompt.expand(N, -1), max_new_tokens=3, do_sample=True, generator=gen, **kw)
    check_stats(out, depth)
    assert 0.3 < out.acceptance_rate < 0.95  # both accept and reject paths carry real mass
    check_three_token_law(model, prompt, out.sequences[:, -3:], lambda logits: warped_probs(logits, **kw))
