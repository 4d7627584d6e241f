"""Host time of an eager FP8Linear forward+backward at (4096, 7168, 2048), piece by piece, on one GPU.

For each piece: microseconds of host time a call (no sync inside the timed loop, at most a few hundred
launches queued, under the 1024-entry launch queue) and of wall time a call (the loop, then a sync). Where
host ~ wall the piece is host-bound. Also the floor of this machine: torch.empty, a tiny Triton launch, a
tiny torch op, and an identity autograd.Function. Then, at deepseek-v3-small shapes, two projections of one input
apart and stacked into one FP8 GEMM, and the FP8 routed experts.

    python3 benchmarks/bench_host_time.py
    python3 benchmarks/bench_host_time.py --cprofile   # where an eager FP8Linear forward+backward spends host time
"""

import time

import torch
import triton
import triton.language as tl
from modeling_deepseek_v3.kernels import compile_ops as C
from modeling_deepseek_v3.kernels import quant as Q

from modeling_deepseek_v3 import kernels as K_


@triton.jit
def _add(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + o, tl.load(x_ptr + o, mask=o < n) + 1, mask=o < n)


def host_us(fn, n=100):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return round((t1 - t0) / n * 1e6, 1), round((t2 - t0) / n * 1e6, 1)


class Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a):
        return a.view_as(a)

    @staticmethod
    def backward(ctx, d):
        return d


def main() -> None:
    torch.manual_seed(0)
    M, N, K = 4096, 7168, 2048
    lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
    f8 = K_.FP8Linear.from_linear(lin)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    xd = x.detach()
    xq, xs, xtq, xts = Q.quantize_act_both(xd)
    wq, ws, wqt = K_.quantize_weight(lin.weight.detach(), transposed=True)
    dq, ds, dtq, dts = Q.quantize_act_both(g)
    small = torch.randn(1024, device="cuda")
    out = torch.empty_like(small)
    res = {}
    res["torch.empty"] = host_us(lambda: torch.empty(M, N, device="cuda", dtype=torch.bfloat16))
    res["tiny triton launch"] = host_us(lambda: _add[(1,)](small, out, 1024, BLOCK=1024))
    res["tiny add torch"] = host_us(lambda: small.add(1))
    res["bf16 matmul"] = host_us(lambda: xd @ lin.weight.t(), 50)
    res["bf16 linear fwd+bwd"] = host_us(lambda: lin(x).backward(g), 50)
    res["quantize_act_both(x)"] = host_us(lambda: Q.quantize_act_both(xd))
    res["compile_ops.quantize_act_both(x)"] = host_us(lambda: C.quantize_act_both(xd, False))
    res["quantize_weight_t"] = host_us(lambda: K_.quantize_weight(lin.weight.detach(), transposed=True))
    res["fp8_gemm fwd (gluon)"] = host_us(lambda: K_.fp8_gemm(xq, xs, wq, ws))
    res["fp8_gemm_dgrad"] = host_us(lambda: K_.fp8_gemm_dgrad(dq, ds, None, ws, w_KN=wqt))
    res["fp8_gemm_wgrad bf16"] = host_us(lambda: K_.fp8_gemm_wgrad(dtq, dts, xtq, xts, torch.bfloat16))
    # x without grad, the weight with: quantises x in both tilings (for wgrad) and W without its K-major copy
    res["FP8Linear fwd (x no grad)"] = host_us(lambda: f8(xd))
    res["FP8Linear fwd"] = host_us(lambda: f8(x), 50)
    res["FP8Linear fwd+bwd"] = host_us(lambda: f8(x).backward(g), 50)
    res["identity Function + sum + backward"] = host_us(lambda: Identity.apply(x).sum().backward(), 50)
    # deepseek-v3-small shapes (B=8 x S=2048 tokens, hidden 1024): MLA's q_a (384) and kv_a (576) projections apart
    # and stacked into one FP8 GEMM (FP8Linear.forward_shared_input), and the routed experts (64, top-6, width 512)
    T, D = 16384, 1024
    h = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pair = [K_.FP8Linear(D, 384, bias=False, device="cuda", dtype=torch.bfloat16),
            K_.FP8Linear(D, 576, bias=False, device="cuda", dtype=torch.bfloat16)]  # fmt: skip
    res["small: q_a + kv_a apart fwd+bwd"] = host_us(lambda: sum(m(h).sum() for m in pair).backward(), 30)
    res["small: q_a + kv_a stacked fwd+bwd"] = host_us(
        lambda: sum(y.sum() for y in K_.FP8Linear.forward_shared_input(h, pair)).backward(), 30
    )
    E, top_k, width = 64, 6, 512
    gate_up = (torch.randn(E, 2 * width, D, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    down = (torch.randn(E, D, width, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    idx = torch.rand(T, E, device="cuda").topk(top_k, dim=1).indices
    wt = torch.rand(T, top_k, device="cuda", dtype=torch.bfloat16)
    res["small: FP8 experts fwd+bwd"] = host_us(
        lambda: K_.fp8_experts_forward(h, idx, wt, gate_up, down).sum().backward(), 20
    )
    for k, v in res.items():
        print(f"{k:40s} host_us {v[0]:8.1f}   wall_us {v[1]:8.1f}")


def cprofile(calls: int = 200) -> None:
    """The eager FP8Linear forward+backward at (4096, 7168, 2048) under cProfile: the Python functions that take
    its host time (cProfile's own per-call cost inflates every row alike; read the shares, not the totals)."""
    import cProfile
    import pstats

    torch.manual_seed(0)
    M, N, K = 4096, 7168, 2048
    f8 = K_.FP8Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        f8(x).backward(g)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        f8(x).backward(g)
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof).strip_dirs()
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    import sys

    cprofile() if "--cprofile" in sys.argv else main()
