"""Oracle 2: generation through the latent cache equals full recomputation, for both MLA paths."""

import pytest
import torch
from transformers.cache_utils import DynamicCache

from modeling_deepseek_v3 import DSV3ForCausalLM
from modeling_deepseek_v3.modeling_dsv3 import CACHE_FIELD

FP32_ATOL = 1e-5  # absorbed and naive MLA regroup the same fp32 products; only rounding differs


def make_model(tiny_config, mla="auto", **overrides):
    model = DSV3ForCausalLM(tiny_config(mla_implementation=mla, **overrides)).eval()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.2)
    return model


def greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("mla", ["auto", "naive", "absorbed"])
def test_greedy_with_cache_equals_recomputation(tiny_config, mla):
    model = make_model(tiny_config, mla)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(got, greedy_without_cache(model, ids, 12))


def test_absorbed_matches_naive_step_by_step(tiny_config):
    naive = make_model(tiny_config, "naive")
    absorbed = make_model(tiny_config, "absorbed")
    absorbed.load_state_dict(naive.state_dict())
    ids = torch.randint(0, naive.config.vocab_size, (3, 7))
    caches = [DynamicCache(), DynamicCache()]
    with torch.no_grad():
        for step in range(5):
            chunk = ids if step == 0 else torch.randint(0, naive.config.vocab_size, (3, 1 + step % 2))
            a = naive(chunk, cache=caches[0], use_cache=True).logits
            b = absorbed(chunk, cache=caches[1], use_cache=True).logits
            assert (a - b).abs().max() <= FP32_ATOL


def test_latent_cache_holds_only_576_style_values(tiny_config):
    model = make_model(tiny_config)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    with torch.no_grad():
        cache = getattr(model(ids, use_cache=True), CACHE_FIELD)
    assert len(cache.layers) == cfg.num_hidden_layers
    for layer in cache.layers:
        assert layer.keys.shape == (2, 1, 6, cfg.kv_lora_rank)  # normalised latent c_kv
        assert layer.values.shape == (2, 1, 6, cfg.qk_rope_head_dim)  # the shared roped key


def test_left_padded_batch_equals_single_rows(tiny_config):
    model = make_model(tiny_config)
    a = torch.randint(2, model.config.vocab_size, (1, 8))
    b = torch.randint(2, model.config.vocab_size, (1, 5))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, single in ((0, a), (1, b)):
        alone = model.generate(single, attention_mask=torch.ones_like(single), max_new_tokens=6, do_sample=False)
        assert torch.equal(out[row, -6:], alone[0, -6:])


def test_beam_search_and_sampling_run_through_the_cache(tiny_config):
    model = make_model(tiny_config)
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    beams = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=3, max_new_tokens=6, do_sample=False)
    assert beams.shape == (2, 11)
    # Beam search with one beam is greedy: a check that beam reordering of the latent cache is consistent.
    one_beam = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=1, max_new_tokens=6)
    assert torch.equal(one_beam, greedy_without_cache(model, ids, 6))
    torch.manual_seed(1)
    s1 = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=20, max_new_tokens=6)
    torch.manual_seed(1)
    s2 = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=20, max_new_tokens=6)
    assert torch.equal(s1, s2) and s1.shape == (2, 11)


def test_cache_crop_then_continue_equals_recomputation(tiny_config):
    model = make_model(tiny_config)
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        cache.crop(-4)  # transformers 5.24: a negative count removes that many tokens
        assert cache.get_seq_length() == 6
        nxt = torch.randint(0, model.config.vocab_size, (1, 2))
        cached = model(nxt, cache=cache, use_cache=True).logits
        full = model(torch.cat([ids[:, :6], nxt], 1), use_cache=False).logits[:, -2:]
    assert (cached - full).abs().max() <= FP32_ATOL


def test_past_key_values_name_still_works(tiny_config):
    model = make_model(tiny_config)
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 5


def test_left_padding_never_puts_nan_in_the_cache(tiny_config):
    """A left-pad query attends to nothing; its all-masked softmax must not turn into NaN cache entries (bf16 sdpa
    returns NaN for fully masked rows), since real rows multiply their 0 weight by those values later."""
    model = make_model(tiny_config).to(torch.bfloat16)
    ids = torch.randint(2, model.config.vocab_size, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    cache = DynamicCache()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, cache=cache, use_cache=True).logits
        step = model(ids[:, :1], attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
                     cache=cache, use_cache=True).logits  # fmt: skip
    assert torch.isfinite(logits[0]).all() and torch.isfinite(logits[1, 3:]).all() and torch.isfinite(step).all()
    for layer in cache.layers:
        assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()
