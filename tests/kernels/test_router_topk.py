"""kernels/router_topk.py: the router's group-limited top-k in one kernel (eager mode on a GPU), against the torch
code the model runs elsewhere (modeling_dsv3._select_experts), on the interpreter."""

import pytest
import torch
from modeling_deepseek_v3.kernels import router_topk

from modeling_deepseek_v3 import modeling_dsv3 as M


def _scores(T, E, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(T, E, generator=g).sigmoid()
    bias = torch.randn(E, generator=g) * 0.05  # a trained correction's size: it reorders close experts
    return scores, bias


@pytest.mark.parametrize(
    "T, E, G, topk_group, top_k",
    [(37, 16, 4, 2, 3), (64, 64, 8, 4, 6), (19, 256, 8, 4, 8), (5, 32, 1, 1, 4), (3, 8, 4, 4, 8)],
)
def test_route_topk_equals_the_torch_choice(T, E, G, topk_group, top_k):
    """The debug, small and V3 routers, one without groups, and one that keeps every group and expert; T ragged
    against the kernel's block of tokens. Random scores and bias: no exact ties, so any correct choice is this one."""
    scores, bias = _scores(T, E, seed=T + E)
    idx = router_topk.route_topk(scores, bias, G, topk_group, top_k)
    ref = M._select_experts(scores + bias, G, topk_group, top_k)
    assert idx.dtype == torch.int64 and torch.equal(idx, ref)
    # The group limit bites: each token's experts come from topk_group groups at most, and here it changes the choice.
    assert all(row.unique().numel() <= topk_group for row in idx // (E // G))
    if topk_group < G:
        assert not torch.equal(idx, (scores + bias).topk(top_k, dim=-1)[1])


def test_route_topk_breaks_ties_as_the_compiled_torch_code(monkeypatch):
    """Scores from four values only: ties everywhere, among experts, group scores and across the bias. The kernel
    takes the lower index, as the stable sort that _top_k runs under torch.compile does (eager topk's choice among
    equals is unspecified)."""
    g = torch.Generator().manual_seed(7)
    scores = torch.randint(0, 4, (41, 64), generator=g).float() / 4
    bias = torch.randint(0, 2, (64,), generator=g).float() / 4
    idx = router_topk.route_topk(scores, bias, 8, 4, 6)
    monkeypatch.setattr(M.torch.compiler, "is_compiling", lambda: True)  # _top_k's stable-sort branch
    ref = M._select_experts(scores + bias, 8, 4, 6)
    assert torch.equal(idx, ref)


def test_route_topk_rejects_what_it_cannot_take():
    scores, bias = _scores(4, 24, seed=0)
    assert not router_topk.supports(24, 8) and not router_topk.supports(16, 16) and router_topk.supports(16, 8)
    with pytest.raises(AssertionError, match="powers of two"):
        router_topk.route_topk(scores, bias, 8, 4, 2)
    scores, bias = _scores(4, 16, seed=0)
    with pytest.raises(AssertionError, match="top_k 9"):
        router_topk.route_topk(scores, bias, 4, 2, 9)
    with pytest.raises(AssertionError, match="fp32"):
        router_topk.route_topk(scores.double(), bias, 4, 2, 2)


def test_router_takes_the_kernel_where_it_runs(monkeypatch, tiny_config):
    """DSV3TopkRouter in eager mode picks its experts with the kernel where the kernels run (forced onto the CPU's
    interpreter here; the model takes them on CUDA tensors only), and with the torch code once ROUTE_TOPK_KERNEL is
    off: same experts, same weights, and the weights' gradient reaches the router either way."""
    monkeypatch.setattr(M, "_eager_kernels", lambda device, module: router_topk if module == "router_topk" else None)
    calls = []
    real = router_topk.route_topk
    monkeypatch.setattr(router_topk, "route_topk", lambda *a: calls.append(1) or real(*a))
    router = M.DSV3TopkRouter(tiny_config())
    torch.nn.init.normal_(router.weight, std=0.1)
    router.e_score_correction_bias.normal_(std=0.05)
    x = torch.randn(23, router.weight.shape[1])
    results = []
    for on in (True, False):
        monkeypatch.setattr(router_topk, "ROUTE_TOPK_KERNEL", on)
        router.zero_grad()
        _, weight, idx = router(x)
        weight.sum().backward()
        results.append((weight, idx, router.weight.grad.clone()))
    assert calls == [1]
    (w1, i1, g1), (w2, i2, g2) = results
    assert torch.equal(i1, i2) and torch.equal(w1, w2) and torch.equal(g1, g2) and g1.abs().sum() > 0
