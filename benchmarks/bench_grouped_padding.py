"""What the experts' partial 128-row tiles cost the grouped Gluon GEMMs at DeepSeek-V3 size (256 experts, 65,536 routed
rows, ~256 an expert): the forward (launch_gluon_grouped, rows cut into 128-row tiles an expert) and the wgrad
(launch_gluon_grouped_wgrad, each expert's tokens padded to whole 128-token tiles) timed with random routing
(Dirichlet(20) counts, as bench_grouped_wgrad.py: ~25% padding) and with every expert at exactly 256 rows (none).
Also the wgrad with fp32 out (twice the dW bytes), and, with --configs, the forward's cooperative and two-consumer
kernels (128x128s4, 128x128h2) and every wgrad configuration of WGRAD_CONFIGS that uses TMA scales, each interleaved
twice, with its relative difference to the default's result.

    PYTHONPATH=. python benchmarks/bench_grouped_padding.py [--configs]
"""

from __future__ import annotations

import functools
import importlib
import json
import sys

import bench_grouped_wgrad  # beside this file: the script's folder is on sys.path
import torch
from triton.testing import do_bench

from modeling_deepseek_v3 import kernels as K_

FL = importlib.import_module("modeling_deepseek_v3.kernels.fp8_linear")
GL = importlib.import_module("modeling_deepseek_v3.kernels.fp8_gemm_gluon")
E, PER = 256, 256
S = E * PER
GEMMS = (("gate_up", 4096, 7168), ("down", 7168, 2048))  # (name, N, K) of the experts' weights [E, N, K]


def routing(even: bool) -> torch.Tensor:
    """int32 end offsets [E]: every expert PER rows, or bench_grouped_wgrad's uneven routing of S rows."""
    if even:
        return torch.full((E,), PER).cumsum(0).to(torch.int32).cuda()
    return bench_grouped_wgrad._routing(E, S)


def operands(N: int, K: int, even: bool):
    """(forward call, wgrad call taking out_dtype and config, padded token count) on fresh random data."""
    torch.manual_seed(0)
    offs = routing(even)
    x = torch.randn(S, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    fwd = functools.partial(GL.launch_gluon_grouped, *K_.quantize_act(x), *K_.quantize_weight(w), offs, torch.bfloat16)
    del w
    row_P, offs_P = FL.pad_experts_to_tiles(offs, S)
    dy = torch.randn(S, N, device="cuda", dtype=torch.bfloat16)
    pad = (*K_.quantize_act_t(dy, rows=row_P), *K_.quantize_act_t(x, rows=row_P), offs_P)
    return fwd, functools.partial(GL.launch_gluon_grouped_wgrad, *pad), int(offs_P[-1])


def us(f) -> float:
    return round(do_bench(f, warmup=10, rep=40) * 1e3, 1)


def compare_configs(r: dict, diff_key: str, time_key: str, call, names) -> None:
    """Into r: each configuration's relative difference to call()'s result (the default's), and its time,
    interleaved twice (drift shows as a spread within each)."""
    ref = call().float()
    for c in names:
        r[f"{diff_key}_{c}"] = ((call(config=c).float() - ref).norm() / ref.norm()).item()
    for _ in range(2):
        for c in names:
            r.setdefault(f"{time_key}_{c}", []).append(us(functools.partial(call, config=c)))


def main(configs: bool) -> None:
    for name, N, K in GEMMS:
        for even in (False, True):
            fwd, wgrad, padded = operands(N, K, even)
            flop = 2 * S * N * K
            r = dict(gemm=name, N=N, K=K, even=even, wgrad_padded_tokens=padded, fwd_us=us(fwd))
            r["wgrad_bf16_us"] = us(functools.partial(wgrad, out_dtype=torch.bfloat16))
            r["wgrad_fp32_us"] = us(functools.partial(wgrad, out_dtype=torch.float32))
            r["fwd_tflops"] = round(flop / r["fwd_us"] / 1e6)
            r["wgrad_bf16_tflops"] = round(flop / r["wgrad_bf16_us"] / 1e6)
            if configs:  # the forward's cooperative and two-consumer kernels; the wgrad's TMA-scale configurations
                compare_configs(r, "fwd_rel_diff", "fwd_us", fwd, ("128x128s4", "128x128h2"))
                compare_configs(r, "rel_diff", "wgrad_bf16_us", functools.partial(wgrad, torch.bfloat16),
                                [c for c in GL.WGRAD_CONFIGS if GL._scales_tma(c)])  # fmt: skip
            print(json.dumps(r), flush=True)
            fwd = wgrad = None  # free this case's operands before the next one's
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main("--configs" in sys.argv)
