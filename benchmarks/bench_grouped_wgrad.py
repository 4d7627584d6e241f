"""The persistent grouped FP8 wgrad's two loops (fp8_grouped_gemm.MASK_ENDS_ONLY_MIN_TOKENS) against routed rows an
expert: every 128-token step masked in registers (one loop, FLATTEN-pipelined across work items) vs only the
partial steps at an expert's ends (whole steps feed A from shared memory). deepseek-v3-small's expert shapes
(gate_up dW [64, 1024, 1024], down [64, 1024, 512]) and V3's (256 experts, [4096, 7168] and [7168, 2048]), random
balanced-ish routing; both loops checked against each other. One JSON line a case, then a table.

    PYTHONPATH=. python benchmarks/bench_grouped_wgrad.py      # writes $OUT/bench_grouped_wgrad.json when OUT is set
    PYTHONPATH=. python benchmarks/bench_grouped_wgrad.py --aligned   # experts padded to whole 128-token tiles
    BENCH_CASES="V3 gate_up" ncu ... python benchmarks/bench_grouped_wgrad.py --aligned --profile-once

--aligned: each expert's tokens padded with zero columns to a multiple of 128 (tokens_aligned=True: one unmasked
loop, no step shared by two experts) in several tile configurations, against the dispatched kernel on the unpadded
tokens; TFLOPS count the real tokens only, so the padding's extra steps are charged to the aligned kernel.
"""

from __future__ import annotations

import functools
import importlib
import json
import os

import torch
from triton.testing import do_bench

from modeling_deepseek_v3 import kernels as K_

FL = importlib.import_module("modeling_deepseek_v3.kernels.fp8_linear")
GL = importlib.import_module("modeling_deepseek_v3.kernels.fp8_gemm_gluon")
CASES = [  # (name, experts, N, K, rows an expert on average)
    *[("small gate_up", 64, 1024, 1024, r) for r in (256, 512, 768, 1024, 1536, 3072)],
    *[("small down", 64, 1024, 512, r) for r in (256, 1024, 1536)],
    *[("V3 gate_up", 256, 4096, 7168, r) for r in (256, 512, 1024)],
    *[("V3 down", 256, 7168, 2048, r) for r in (256, 1024)],
]


def _routing(E: int, S: int) -> torch.Tensor:
    """int32 end offsets [E] on the GPU of S routed rows spread unevenly over E experts, none empty."""
    counts = torch.distributions.Dirichlet(torch.full((E,), 20.0)).sample() * S
    counts = counts.round().long().clamp(min=1)
    counts[-1] += S - counts.sum()
    return counts.cumsum(0).to(torch.int32).cuda()


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for name, E, N, K, per_expert in CASES:
        S = E * per_expert
        offs = _routing(E, S)
        dyTq, dyTs = K_.quantize_act_t(torch.randn(S, N, device="cuda", dtype=torch.bfloat16))
        xTq, xTs = K_.quantize_act_t(torch.randn(S, K, device="cuda", dtype=torch.bfloat16))
        operands = (dyTq, dyTs, xTq, xTs, offs, torch.bfloat16)
        run = {m: functools.partial(K_.fp8_grouped_gemm_wgrad, *operands, mask_ends_only=m) for m in (False, True)}
        a, b = run[False](), run[True]()
        us = {m: do_bench(f, warmup=10, rep=50, return_mode="median") * 1e3 for m, f in run.items()}
        flop = 2 * S * N * K
        r = dict(case=name, E=E, N=N, K=K, rows_per_expert=per_expert, us_all_masked=us[False],
                 us_ends_only=us[True], speedup=us[False] / us[True], tflops_ends_only=flop / us[True] / 1e6,
                 rel_diff=((a.float() - b.float()).norm() / a.float().norm()).item())  # fmt: skip
        rows.append(r)
        print(json.dumps(r), flush=True)
        del dyTq, xTq, operands, run, a, b
    print("\ncase | rows/expert | all masked us | ends only us | speed-up | rel diff")
    for r in rows:
        print(f"{r['case']} | {r['rows_per_expert']} | {r['us_all_masked']:.1f} | {r['us_ends_only']:.1f} | "
              f"{r['speedup']:.2f} | {r['rel_diff']:.1e}")  # fmt: skip
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_grouped_wgrad.json"), "w") as f:
            json.dump(rows, f, indent=1)


ALIGNED_CONFIGS = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages, programs per SM, flatten, TMA store)
    (64, 128, 4, 3, 2, True, False), (64, 128, 4, 3, 2, True, True), (64, 128, 4, 4, 2, True, True),
    (128, 128, 8, 3, 1, True, True), (128, 256, 8, 3, 1, True, True), (64, 128, 4, 3, 3, True, True),
]  # fmt: skip


def aligned(profile_once: bool = False) -> None:
    """BENCH_CONFIGS (a JSON list of config lists) replaces ALIGNED_CONFIGS, BENCH_CASES (a substring, e.g. "V3
    gate_up") narrows the cases. profile_once: the first case and first configuration, run three times outside
    do_bench, for a profiler (ncu) to catch."""
    configs = (
        [tuple(c) for c in json.loads(os.environ["BENCH_CONFIGS"])]
        if "BENCH_CONFIGS" in os.environ
        else ALIGNED_CONFIGS
    )
    torch.manual_seed(0)
    rows = []
    cases = [c for c in CASES if c[4] in (256, 1024) and os.environ.get("BENCH_CASES", "") in c[0]]
    for name, E, N, K, per_expert in cases:
        S = E * per_expert
        offs = _routing(E, S)
        # The padded layout as the FP8 experts build and quantise it (the quantisers read -1 rows as zeros).
        row_P, offs_pad = FL.pad_experts_to_tiles(offs, S)
        dy = torch.randn(S, N, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(S, K, device="cuda", dtype=torch.bfloat16)
        plain = (*K_.quantize_act_t(dy), *K_.quantize_act_t(x), offs, torch.bfloat16)
        pad = (*K_.quantize_act_t(dy, rows=row_P), *K_.quantize_act_t(x, rows=row_P), offs_pad, torch.bfloat16)
        del dy, x
        if profile_once:
            for _ in range(3):
                K_.fp8_grouped_gemm_wgrad(*pad, config=configs[0], tokens_aligned=True)
            torch.cuda.synchronize()
            return
        reference = K_.fp8_grouped_gemm_wgrad(*plain).float()
        flop = 2 * S * N * K
        r = dict(case=name, E=E, N=N, K=K, rows_per_expert=per_expert, padded_rows=int(offs_pad[-1]),
                 us_dispatched=do_bench(functools.partial(K_.fp8_grouped_gemm_wgrad, *plain), warmup=10, rep=50) * 1e3)  # fmt: skip
        r["tflops_dispatched"] = flop / r["us_dispatched"] / 1e6
        for config in configs:
            f = functools.partial(K_.fp8_grouped_gemm_wgrad, *pad, config=config, tokens_aligned=True)
            tag = "x".join(map(str, config[:4])) + f"p{config[4]}" + ("tma" if config[6:] and config[6] else "")
            r[f"rel_diff_{tag}"] = ((f().float() - reference).norm() / reference.norm()).item()
            r[f"us_{tag}"] = do_bench(f, warmup=10, rep=50) * 1e3
            r[f"tflops_{tag}"] = flop / r[f"us_{tag}"] / 1e6
        if GL.can_use_gluon(pad[0], pad[2]) and N % 128 == 0:  # the Gluon kernel (SCALES_TMA) on the same layout
            f = functools.partial(GL.launch_gluon_grouped_wgrad, *pad)
            r["rel_diff_gluon"] = ((f().float() - reference).norm() / reference.norm()).item()
            r["us_gluon"] = do_bench(f, warmup=10, rep=50) * 1e3
            r["tflops_gluon"] = flop / r["us_gluon"] / 1e6
        rows.append(r)
        print(json.dumps(r), flush=True)
        del plain, pad, reference
        torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_grouped_wgrad_aligned.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    import sys

    aligned("--profile-once" in sys.argv) if "--aligned" in sys.argv else main()
