"""The router's fp32 logits at V3's shape (8192 tokens, hidden 7168, 256 experts, bf16 x, fp32 weight), forward and
backward: the bf16-GEMM split that eager CUDA runs (modeling_dsv3._RouterLogits, through router_logits) against the
fp32 F.linear it replaces, in one process. Prints each one's distance from fp64 (logits, dW), the share of dx equal
to the exact product rounded to bf16, the share of tokens whose top-8 experts agree, and both timings.

    PYTHONPATH=. python benchmarks/bench_router.py
    PYTHONPATH=. python benchmarks/bench_router.py --topk   # the expert choice: kernels/router_topk.py vs torch

--topk times the group-limited top-k that follows the logits (8 groups, 4 kept, a random correction bias), at V3's
shape (8192 tokens, 256 experts, top-8) and at deepseek-v3-small's train step (16,384 tokens, 64 experts, top-6): the
one Triton kernel that eager mode on a GPU runs, the torch code it replaces, and that code under torch.compile (where
_top_k sorts), and checks that all three choose the same experts. do_bench times each call alone, launches included:
the torch forms launch several small kernels, so their times are host-bound here, and inside a train step (where the
host runs ahead) they may cost less.
"""

import functools
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from modeling_deepseek_v3.modeling_dsv3 import _select_experts, router_logits


def main() -> None:
    torch.manual_seed(0)
    T, D, E = 8192, 7168, 256
    x = torch.randn(T, D, device="cuda").to(torch.bfloat16).requires_grad_()
    w = (torch.randn(E, D, device="cuda") * 0.02).requires_grad_()
    g = torch.randn(T, E, device="cuda")

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    y = router_logits(x, w)
    y.backward(g)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = F.linear(x2.float(), w2)
    y2.backward(g)
    x64, w64, g64 = x.detach().double(), w.detach().double(), g.double()
    print("logits vs fp64: split", rel(y, x64 @ w64.T), "fp32", rel(y2, x64 @ w64.T))
    print("dW vs fp64: split", rel(w.grad, g64.T @ x64), "fp32", rel(w2.grad, g64.T @ x64))
    dx = (g64 @ w64).to(torch.bfloat16)
    print("dx equal to the exact product in bf16: split", (x.grad == dx).float().mean().item(), "fp32",
          (x2.grad == dx).float().mean().item())  # fmt: skip
    print("top-8 experts equal", (y.topk(8).indices == y2.topk(8).indices).all(dim=1).float().mean().item())

    def fwd_bwd(split: bool):
        def run():
            xx, ww = x.detach().requires_grad_(), w.detach().requires_grad_()
            (router_logits(xx, ww) if split else F.linear(xx.float(), ww)).backward(g)

        return run

    print("fwd+bwd ms: split", do_bench(fwd_bwd(True), warmup=5, rep=30), "fp32", do_bench(fwd_bwd(False), warmup=5, rep=30))


def _choose(scores: torch.Tensor, bias: torch.Tensor, top_k: int) -> torch.Tensor:
    return _select_experts(scores + bias, 8, 4, top_k)


def topk_case(T: int, E: int, top_k: int) -> None:
    from modeling_deepseek_v3.kernels import router_topk

    scores = torch.randn(T, E, device="cuda").sigmoid()
    bias = torch.randn(E, device="cuda") * 0.05
    runs = {
        "kernel": lambda: router_topk.route_topk(scores, bias, 8, 4, top_k),
        "torch": functools.partial(_choose, scores, bias, top_k),
        "torch.compile": functools.partial(torch.compile(_choose), scores, bias, top_k),
    }
    chosen = {name: run() for name, run in runs.items()}
    same = all(torch.equal(idx, chosen["kernel"]) for idx in chosen.values())
    us = {name: do_bench(run, warmup=25, rep=200) * 1e3 for name, run in runs.items()}
    print(f"T={T} E={E} top-{top_k}: same experts, same order: {same}; us: "
          + ", ".join(f"{name} {t:.1f}" for name, t in us.items()))  # fmt: skip


def topk() -> None:
    torch.manual_seed(0)
    topk_case(8192, 256, 8)
    topk_case(16384, 64, 6)


if __name__ == "__main__":
    topk() if "--topk" in sys.argv else main()
