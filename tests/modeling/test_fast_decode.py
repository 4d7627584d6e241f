"""Static latent cache and fast decoding (fast_decode.py, generate(cache_implementation="static")) against
generate() and DynamicCache, on the CPU.

CUDA graphs need a GPU; here the same step runs eagerly (use_cuda_graph is ignored off CUDA), which checks
everything the graph would replay: the in-place state updates, the static cache and the full-width masks.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache

from modeling_deepseek_v3 import DSV3ForCausalLM
from modeling_deepseek_v3.fast_decode import StaticLatentCache, fast_greedy_generate
from modeling_deepseek_v3.speculative import warped_probs

PROMPT = 9


def _model(tiny_config) -> DSV3ForCausalLM:
    torch.manual_seed(0)
    return DSV3ForCausalLM(tiny_config()).eval()  # fp32, debug shape, vocab 512


def _batch(B: int, holes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts [B, PROMPT] with holes[b] left-padding positions in row b."""
    g = torch.Generator().manual_seed(B)
    ids = torch.randint(2, 512, (B, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    for b, n in enumerate(holes):
        mask[b, :n] = 0
        ids[b, :n] = 0
    return ids, mask


@pytest.mark.parametrize("B,holes", [(1, [0]), (3, [0, 3, 6])])
def test_greedy_equals_generate(tiny_config, B, holes):
    model = _model(tiny_config)
    ids, mask = _batch(B, holes)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    out = fast_greedy_generate(model, ids, mask, max_new_tokens=16, use_cuda_graph=True)
    assert torch.equal(out, ref)


def test_eos_padding_and_early_stop(tiny_config):
    model = _model(tiny_config)
    ids, mask = _batch(3, [0, 2, 5])
    free = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    # An EOS that row 1 emits at its 4th new token: that row finishes early and is padded afterwards.
    eos = int(free[1, PROMPT + 3])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    out = fast_greedy_generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)
    # One row: its EOS ends the whole generation, so the output is shorter than max_new_tokens.
    eos = int(free[0, PROMPT + 4])
    ref = model.generate(ids[:1], max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    out = fast_greedy_generate(model, ids[:1], None, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert out.shape[1] < PROMPT + 12 and torch.equal(out, ref)


def test_static_cache_equals_dynamic_cache(tiny_config):
    """Same forwards (a prefill written straight into the static cache, then 4 decode steps) through both caches:
    same logits, same latent entries. The static cache attends over all max_length columns under its mask, the
    dynamic one over exactly the written ones, so only fp32 summation order may differ."""
    model = _model(tiny_config)
    ids, mask = _batch(2, [0, 4])
    B, max_len = 2, PROMPT + 8
    static = StaticLatentCache.for_model(model, B, max_len)
    dynamic = DynamicCache()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = model(ids, attention_mask=mask, position_ids=positions, past_key_values=dynamic).logits
        b = model(ids, attention_mask=static.attention_mask(mask, PROMPT), position_ids=positions,
                  past_key_values=static).logits  # fmt: skip
        real = mask.bool()  # left-pad positions attend everywhere (no all-masked softmax): their values mean nothing
        torch.testing.assert_close(b[real], a[real], rtol=1e-5, atol=1e-5)
        token, pos = a[:, -1:].argmax(-1), positions[:, -1:] + 1
        for _ in range(4):
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
            a = model(token, attention_mask=mask, position_ids=pos, past_key_values=dynamic).logits
            b = model(token, attention_mask=static.attention_mask(mask, 1), position_ids=pos,
                      past_key_values=static).logits  # fmt: skip
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            token, pos = a[:, -1:].argmax(-1), pos + 1
    T = PROMPT + 4
    assert static.get_seq_length() == dynamic.get_seq_length() == T
    written = torch.cat([real, torch.ones(B, 4, dtype=torch.bool)], dim=1)  # [B, T]
    for i, layer in enumerate(dynamic.layers):
        torch.testing.assert_close(static.c_kv[i][:, :T][written], layer.keys[:, 0][written], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(static.k_pe[i][:, :T][written], layer.values[:, 0][written], rtol=1e-5, atol=1e-6)
        assert not static.c_kv[i][:, T:].any()  # nothing written past the end


def test_load_dynamic_and_mask(tiny_config):
    model = _model(tiny_config)
    ids, mask = _batch(2, [0, 3])
    dynamic = DynamicCache()
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=dynamic)
    static = StaticLatentCache.for_model(model, 2, 12)
    static.load_dynamic(dynamic)
    assert static.get_seq_length() == PROMPT and static.get_max_cache_shape() == 12
    assert torch.equal(static.c_kv[0][:, :PROMPT], dynamic.layers[0].keys[:, 0])
    m = static.attention_mask(torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1), 1)  # [B, 1, 1, 12]
    assert m.shape == (2, 1, 1, 12)
    assert m[0, 0, 0].tolist() == [True] * 10 + [False] * 2
    assert m[1, 0, 0].tolist() == [False] * 3 + [True] * 7 + [False] * 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mla", ["triton", "auto"])
def test_cuda_graph_equals_eager(tiny_config, mla):
    """bf16: on CUDA only grouped_mm runs the experts without a host sync, and it takes bf16. The replayed graph
    runs the same kernels as the eager step (the MoE's fp32 index_add uses atomics, whose order could in principle
    flip a bf16 near-tie; not seen)."""
    model = _model(tiny_config).to("cuda", torch.bfloat16)
    ids, mask = (t.cuda() for t in _batch(3, [0, 3, 6]))
    eager = fast_greedy_generate(model, ids, mask, 24, use_cuda_graph=False, mla_implementation=mla)
    graph = fast_greedy_generate(model, ids, mask, 24, use_cuda_graph=True, mla_implementation=mla)
    assert torch.equal(graph, eager)


def test_decode_step_compiles_as_one_graph(tiny_config):
    """The static-cache decode step traces into a single graph (fullgraph=True): no host syncs, no data-dependent
    shapes. bf16 because torch's grouped_mm asks for bf16 under compile (the eager CPU path also takes fp32)."""
    torch.manual_seed(0)
    model = DSV3ForCausalLM(tiny_config(num_nextn_predict_layers=0, mla_implementation="absorbed")).eval()
    model = model.to(torch.bfloat16)
    B, length = 2, 16
    ids, mask = _batch(B, [0, 2])
    prefill = DynamicCache()
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=prefill, use_cache=True)
    cache = StaticLatentCache.for_model(model, B, length)
    cache.load_dynamic(prefill)
    token, position = torch.randint(2, 512, (B, 1)), mask.sum(-1, keepdim=True)
    valid = torch.zeros(B, length, dtype=torch.bool)
    valid[:, :PROMPT] = mask.bool()
    valid[:, PROMPT] = True

    def step(token, position, valid):
        cache.write_position = torch.tensor([PROMPT])
        return model(input_ids=token, attention_mask=valid[:, None, None, :], position_ids=position,
                     past_key_values=cache, use_cache=True, logits_to_keep=1).logits  # fmt: skip

    with torch.no_grad():
        eager = step(token, position, valid)
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(token, position, valid)
    # aot_eager runs the same ATen ops in the same order: the compiled step is bit-identical.
    assert torch.isfinite(eager).all() and torch.equal(compiled, eager)


# ----------------------------------------------------------------- generate(cache_implementation="static")


@pytest.mark.parametrize("B,holes", [(1, [0]), (3, [0, 3, 6])])
def test_generate_static_greedy_equals_generate(tiny_config, B, holes):
    model = _model(tiny_config)
    ids, mask = _batch(B, holes)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, cache_implementation="static")
    assert torch.equal(out, ref)
    # min_new_tokens keeps EOS out until then, as generate()'s processor does; the EOS is a token greedy emits.
    eos = int(ref[0, PROMPT + 2])
    kw = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=5, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(model.generate(ids, cache_implementation="static", **kw), model.generate(ids, **kw))


def test_generate_static_from_a_trl_style_generation_config(tiny_config):
    """TRL's GRPO builds a GenerationConfig (do_sample, temperature, top_p=1.0, top_k=0, min_p=None, repetition
    penalty 1.0, cache_implementation from its config, disable_compile) and calls generate(input_ids=...,
    attention_mask=..., generation_config=...). With top_k=1 sampling is deterministic: it must equal greedy, which
    checks the sampled path end to end (prefill token and graph steps) without statistics."""
    model = _model(tiny_config)
    ids, mask = _batch(3, [0, 2, 5])
    config = GenerationConfig(max_new_tokens=10, do_sample=True, pad_token_id=0, bos_token_id=1, eos_token_id=[1],
                              temperature=0.7, top_p=1.0, top_k=1, min_p=None, repetition_penalty=1.0,
                              cache_implementation="static", disable_compile=True)  # fmt: skip
    model.train()  # TRL generates from the training-mode model; the mode is restored afterwards
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    assert model.training
    ref = model.eval().generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=[1], pad_token_id=0)
    assert torch.equal(out, ref)
    dict_out = model.generate(ids, attention_mask=mask, generation_config=config, return_dict_in_generate=True)
    assert torch.equal(dict_out.sequences, ref)


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [(1.0, None, 0.9, None), (0.8, 5, None, 0.1)],
                         ids=["top_p", "top_k-min_p"])  # fmt: skip
def test_generate_static_sampling_keeps_the_distribution(tiny_config, check_three_token_law, temperature, top_k,
                                                         top_p, min_p):  # fmt: skip
    """Joint law of 3 sampled tokens (vocabulary 8: 512 cells, N = 6000): token 1 from the prefill, tokens 2-3 from
    the static-cache step, each through the exponential race over the warped distribution."""
    torch.manual_seed(0)
    model = DSV3ForCausalLM(tiny_config(vocab_size=8, num_hidden_layers=2)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # peaked distributions, so that top-k/top-p/min-p cut real mass
    prompt = torch.tensor([[3, 5, 2, 7]])
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    out = model.generate(prompt.expand(6000, -1), max_new_tokens=3, do_sample=True, eos_token_id=None,
                         cache_implementation="static", **kw)  # fmt: skip
    check_three_token_law(model, prompt, out[:, -3:], lambda logits: warped_probs(logits, **kw))


def test_generate_static_refuses_what_it_does_not_implement(tiny_config):
    model = _model(tiny_config)
    ids, _ = _batch(1, [0])
    for option in (dict(repetition_penalty=1.3), dict(num_beams=2), dict(output_scores=True), dict(streamer=object())):
        with pytest.raises(ValueError, match=f'cache_implementation="static"\\) does not support: {next(iter(option))}'):
            model.generate(ids, max_new_tokens=4, cache_implementation="static", **option)
