"""QuantizedWeightCache (config.fp8_weight_cache): the FP8 layers reuse a quantised master weight only while the weight
is unchanged, and a reused one gives exactly what a fresh quantisation gives. Each test counts the weight
quantisations (the kernels' two entry points in fp8_linear) so that a cache that never hits, or one that hits on a
changed weight, fails."""

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
from modeling_deepseek_v3.kernels import FP8Linear, QuantizedWeightCache, fp8_experts_forward  # noqa: E402
from modeling_deepseek_v3.kernels import fp8_linear as FL  # noqa: E402

from modeling_deepseek_v3 import DSV3Config, DSV3ForCausalLM  # noqa: E402


@pytest.fixture
def weight_quantisations(monkeypatch):
    """A list that grows by one per weight quantisation (with or without the K-major copy)."""
    calls = []
    for name in ("quantize_weight", "quantize_weight_t"):
        real = getattr(FL, name)
        monkeypatch.setattr(FL, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    return calls


def _step(layer, x, g):
    """Output and both gradients of one forward+backward (gradients cleared first)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(g)
    return y.detach(), x.grad, layer.weight.grad.clone()


def test_cached_fp8_linear_equals_uncached_and_requantises_when_the_weight_changes(weight_quantisations):
    torch.manual_seed(0)
    plain = FP8Linear(300, 200, bias=False)  # ragged K and N: partial 128-blocks in both dims
    cached = FP8Linear.from_linear(plain, cache_weight=True)  # the same Parameter
    x, g = torch.randn(37, 300), torch.randn(37, 200)
    expected = _step(plain, x, g)
    assert weight_quantisations == ["quantize_weight_t"]
    for _ in range(2):  # two micro-batches: one quantisation between them
        got = _step(cached, x, g)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert weight_quantisations == ["quantize_weight_t"] * 2
    with torch.no_grad():  # a forward-only call reuses the training call's entry
        assert torch.equal(cached(x), expected[0])
    assert len(weight_quantisations) == 2

    with torch.no_grad():
        cached.weight.mul_(1.5)  # an in-place change bumps the version: requantised, equal to a fresh layer
    got, fresh = _step(cached, x, g), _step(plain, x, g)
    assert all(torch.equal(a, b) for a, b in zip(got, fresh, strict=True))
    assert not torch.equal(got[0], expected[0])
    assert len(weight_quantisations) == 4


def test_an_optimizer_step_invalidates_even_when_the_version_is_kept(weight_quantisations):
    """FSDP2 refills its gathered parameters in place under _unsafe_preserve_version_counter: the version stays, so
    only the optimizer-step count tells the cache that the weight moved."""
    torch.manual_seed(1)
    layer = FP8Linear(256, 128, bias=False, cache_weight=True)
    x = torch.randn(16, 256)
    with torch.no_grad():
        first = layer(x)
        new = torch.randn_like(layer.weight) * 0.02
        with torch.autograd._unsafe_preserve_version_counter(layer.weight):
            layer.weight.copy_(new)
        stale = layer(x)
        assert torch.equal(stale, first) and len(weight_quantisations) == 1  # what the step counter guards against
    other = torch.nn.Parameter(torch.randn(3))
    other.grad = torch.ones(3)
    torch.optim.SGD([other], lr=0.1).step()  # any optimizer's step
    with torch.no_grad():
        after = layer(x)
    assert len(weight_quantisations) == 2 and not torch.equal(after, first)
    assert torch.equal(after, FP8Linear.from_linear(layer)(x).detach())


def test_forward_only_entry_lacks_the_k_major_copy_so_training_requantises(weight_quantisations):
    torch.manual_seed(2)
    layer = FP8Linear(128, 256, bias=False, cache_weight=True)
    x = torch.randn(8, 128, requires_grad=True)
    with torch.no_grad():
        layer(x)
    layer(x).sum().backward()  # dgrad needs the K-major copy that the forward-only call did not write
    assert weight_quantisations == ["quantize_weight", "quantize_weight_t"]
    assert x.grad.abs().sum() > 0


def test_stacked_projections_share_one_entry_keyed_by_all_their_weights(weight_quantisations, rel):
    torch.manual_seed(3)
    a = FP8Linear(256, 128, bias=False, cache_weight=True)
    b = FP8Linear(256, 200, bias=False, cache_weight=True)
    x = torch.randn(10, 256)
    with torch.no_grad():
        ya, yb = FP8Linear.forward_shared_input(x, (a, b))
        FP8Linear.forward_shared_input(x, (a, b))
        assert len(weight_quantisations) == 1
        b.weight.add_(0.01)  # the second weight moves: the stacked entry is stale
        ya2, yb2 = FP8Linear.forward_shared_input(x, (a, b))
    assert len(weight_quantisations) == 2
    assert torch.equal(ya2, ya) and not torch.equal(yb2, yb)


def test_cached_fp8_experts_equal_uncached_over_two_micro_batches(weight_quantisations):
    g = torch.Generator().manual_seed(4)
    T, Kt, E, D, I = 19, 2, 5, 256, 128  # noqa: E741
    gu = torch.nn.Parameter(torch.randn(E, 2 * I, D, generator=g) * 0.05)
    dn = torch.nn.Parameter(torch.randn(E, D, I, generator=g) * 0.05)
    cache = QuantizedWeightCache()
    for _micro_batch in range(2):
        h = torch.randn(T, D, generator=g, requires_grad=True)
        idx = torch.stack([torch.randperm(E, generator=g)[:Kt] for _ in range(T)])
        wt = torch.rand(T, Kt, generator=g)
        dy = torch.randn(T, D, generator=g)
        results = []
        for weight_cache in (None, cache):
            gu.grad = dn.grad = h.grad = None
            y = fp8_experts_forward(h, idx, wt, gu, dn, weight_cache=weight_cache)
            y.backward(dy)
            results.append((y.detach(), h.grad, gu.grad, dn.grad))
        assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
        assert results[0][2].abs().sum() > 0
    # uncached: 2 weights x 2 micro-batches; cached: 2 weights once
    assert len(weight_quantisations) == 6


def test_config_switch_gives_every_fp8_layer_a_cache():
    from pathlib import Path

    debug = Path(__file__).resolve().parents[2] / "hub_configs" / "deepseek-v3-debug"
    config = DSV3Config.from_pretrained(debug, vocab_size=256, hidden_size=128, num_hidden_layers=2,
                                        linear_implementation="fp8", moe_implementation="fp8", fp8_weight_cache=True)  # fmt: skip
    model = DSV3ForCausalLM(config)
    linears = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert linears and all(isinstance(m.weight_cache, QuantizedWeightCache) for m in linears)
    assert all(isinstance(m.experts.fp8_weight_cache, QuantizedWeightCache) for m in model.moe_layers())
    off = DSV3ForCausalLM(DSV3Config.from_pretrained(debug, vocab_size=256, hidden_size=128, num_hidden_layers=2,
                                                     linear_implementation="fp8", moe_implementation="fp8"))  # fmt: skip
    assert all(m.weight_cache is None for m in off.modules() if isinstance(m, FP8Linear))


_CUDA_GRAPH_CHECK = """
import torch
from modeling_deepseek_v3.kernels import FP8Linear

torch.manual_seed(0)
layer = FP8Linear(2048, 1024, bias=False, device="cuda", dtype=torch.bfloat16, cache_weight=True)
x = torch.randn(256, 2048, device="cuda", dtype=torch.bfloat16)
with torch.no_grad():
    eager = layer(x)  # fills the cache
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    graph.replay()
    assert torch.equal(y, eager)
    # Negated in place: e4m3 codes are sign-magnitude with the same scales, so a graph that quantises on replay gives
    # exactly -eager, and one that baked in the cached weight would still give eager.
    layer.weight.neg_()
    graph.replay()
    assert torch.equal(y, -eager), "the captured graph must quantise the weight on every replay"
    assert torch.equal(layer(x), y)  # the eager call sees the new version too
print("ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with FP8 (compute capability 8.9+)")
def test_cuda_graph_capture_bypasses_the_cache(without_interpreter):
    """A CUDA graph captured from a caching FP8Linear quantises the weight inside the graph, so replays after an
    update see it. A subprocess without TRITON_INTERPRET (the conftest's interpreter mode is fixed at import)."""
    without_interpreter(_CUDA_GRAPH_CHECK, timeout=600)


def test_copies_of_a_cached_layer_start_with_an_empty_cache():
    """deepcopy (TRL's reference model) and pickle (torch.save of a whole module) of a layer whose cache holds an
    entry: they work, and the copy's cache starts empty (its entries would point at the original's weights)."""
    import copy
    import io

    torch.manual_seed(5)
    layer = FP8Linear(128, 128, bias=False, cache_weight=True)
    x = torch.randn(4, 128)
    with torch.no_grad():
        y = layer(x)
    assert layer.weight_cache._entries
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(layer), torch.load(buffer, weights_only=False)):
        assert isinstance(twin.weight_cache, QuantizedWeightCache) and not twin.weight_cache._entries
        with torch.no_grad():
            assert torch.equal(twin(x), y)
    assert layer.weight_cache._entries
