"""FP8 wgrad with and without split-K at deepseek-v3-small's training shapes (issue 3/4), one process, one GPU.

dW[N, K] = dy^T x over M = 16384 tokens (B=8, S=2048) for every dense FP8 layer of deepseek-v3-small (the MLA
projections, the shared experts, the dense MLP of layer 0), and the issue's V3 shapes at M = 4096 (enough
tiles that split_k_for does not split), one at 16384. Each row: the unsplit kernel (split_k=1, the dispatch before split-K), the
split that split_k_for picks, and cuBLAS bf16 `dy^T @ x` as the anchor; the split's result against the unsplit
one (same FP8 products, another fp32 summation order) and both against the dequantise-then-fp32-matmul reference.
Where M is a multiple of 128, also the grouped wgrad's aligned loop (fp8_grouped_gemm, tokens_aligned) run as one
expert of all M tokens, and its result against the dispatched one.

    PYTHONUNBUFFERED=1 python3 benchmarks/bench_wgrad_split.py      # writes $OUT/wgrad_split.json if OUT is set
    PYTHONUNBUFFERED=1 python3 benchmarks/bench_wgrad_split.py --sweep   # also every TMA_CONFIGS entry (split or
                                                                       # not) and the Gluon wgrad configurations
    PYTHONUNBUFFERED=1 python3 benchmarks/bench_wgrad_split.py --gluon   # only the Gluon wgrad configurations
                                                                       # against the dispatched wgrad, M >= 4096
"""

# ruff: noqa: B023  (each lambda is timed inside its own loop iteration)
from __future__ import annotations

import importlib
import json
import os
import sys

import torch
from modeling_deepseek_v3.kernels import quantize_act_t
from triton.testing import do_bench

G = importlib.import_module("modeling_deepseek_v3.kernels.fp8_gemm")  # the package exports a function of that name
GL = importlib.import_module("modeling_deepseek_v3.kernels.fp8_gemm_gluon")
GG = importlib.import_module("modeling_deepseek_v3.kernels.fp8_grouped_gemm")

# (M tokens, N out features, K in features)
SHAPES = [
    (16384, 672, 1024),  # q_a + kv_a, stacked
    (16384, 1536, 384),  # q_b
    (16384, 2048, 256),  # kv_b
    (16384, 1024, 1024),  # o_proj, shared down (2 x 512 -> 1024 is (1024, 1024) too)
    (16384, 2048, 1024),  # shared gate + up
    (16384, 8192, 1024),  # layer 0's dense gate + up
    (16384, 1024, 4096),  # layer 0's dense down
    (4096, 2112, 7168),  # V3 q_a + kv_a
    (4096, 7168, 2048),  # V3 o_proj-like
    (4096, 24576, 1536),  # the other V3 shapes
    (4096, 7168, 16384),
    (4096, 4096, 7168),
    (16384, 7168, 2048),
]


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def sweep(dyT_q, dyT_s, xT_q, xT_s, M, N, K) -> dict:
    """Microseconds of each TMA_CONFIGS entry (BLOCK_M, BLOCK_N, warps, stages, programs an SM, flatten) with the
    split split_k_for picks for its tiles (1: the plain kernel), and its error against the shipped dispatch."""
    shipped = G.fp8_gemm_wgrad(dyT_q, dyT_s, xT_q, xT_s)
    out = {}
    for cfg in G.TMA_CONFIGS:
        bm, bn, warps, stages, occ, flatten = cfg
        split = G.split_k_of(N, K, M, cfg)  # dW[N, K] over M tokens
        if split == 1:
            run = lambda: G.launch_tma_config(dyT_q, dyT_s, xT_q, xT_s, False, torch.float32, bm, bn, warps, stages,
                                              occ, flatten)  # fmt: skip
        else:
            run = lambda: G._launch_split_k(dyT_q, dyT_s, xT_q, xT_s, False,
                                            torch.empty(N, K, device=dyT_q.device), split, cfg)  # fmt: skip
        out[str(cfg)] = dict(split_k=split, us=do_bench(run) * 1e3, rel_vs_shipped=rel(run(), shipped))
    # The Gluon kernel's wgrad configurations (warp-specialised, promotion overlapped; unsplit), last timed at V3
    # shapes only, where they lost to the Triton kernel.
    if GL.can_use_gluon(dyT_q, xT_q):
        for cfg in GL.WGRAD_CONFIGS:
            run = lambda: GL.launch_gluon(dyT_q, dyT_s, xT_q, xT_s, False, torch.float32, config=cfg)
            out[f"gluon {cfg}"] = dict(split_k=1, us=do_bench(run) * 1e3, rel_vs_shipped=rel(run(), shipped))
    return out


def main() -> None:
    do_sweep = "--sweep" in sys.argv[1:]
    torch.manual_seed(0)
    rows = []
    for M, N, K in SHAPES:
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        x = (torch.randn(M, K, device="cuda") * (1 + torch.rand(K, device="cuda"))).bfloat16()
        dyT_q, dyT_s = quantize_act_t(dy)
        xT_q, xT_s = quantize_act_t(x)
        split = G.split_k_of(N, K, M)
        unsplit = G.fp8_gemm_wgrad(dyT_q, dyT_s, xT_q, xT_s, split_k=1)
        chosen = G.fp8_gemm_wgrad(dyT_q, dyT_s, xT_q, xT_s)  # split_k=None: what the model runs
        ref = G.fp8_gemm_wgrad_ref(dyT_q, dyT_s, xT_q, xT_s)
        dyt = dy.t()
        t_unsplit = do_bench(lambda: G.fp8_gemm_wgrad(dyT_q, dyT_s, xT_q, xT_s, split_k=1))
        t_chosen = do_bench(lambda: G.fp8_gemm_wgrad(dyT_q, dyT_s, xT_q, xT_s))
        t_bf16 = do_bench(lambda: dyt @ x)
        tflops = 2 * M * N * K / 1e12
        row = dict(
            M=M, N=N, K=K, split_k=split, us_unsplit=t_unsplit * 1e3, us_split=t_chosen * 1e3, us_bf16=t_bf16 * 1e3,
            tflops_unsplit=tflops / t_unsplit * 1e3, tflops_split=tflops / t_chosen * 1e3,
            speedup=t_unsplit / t_chosen, vs_bf16=t_bf16 / t_chosen,
            rel_split_vs_unsplit=rel(chosen, unsplit), rel_split_vs_ref=rel(chosen, ref), rel_unsplit_vs_ref=rel(unsplit, ref),
        )  # fmt: skip
        if M % 128 == 0:  # the grouped wgrad's aligned loop as one expert of all M tokens (whole 128-token steps)
            offs = torch.tensor([M], dtype=torch.int32, device="cuda")
            for tag, dt in (("", torch.float32), ("_bf16", torch.bfloat16)):  # fp32 and bf16 master weights
                run = lambda: GG.fp8_grouped_gemm_wgrad(dyT_q, dyT_s, xT_q, xT_s, offs, dt, tokens_aligned=True)
                dense = lambda: G.fp8_gemm_wgrad(dyT_q, dyT_s, xT_q, xT_s, dt, split_k=1)
                t_grouped, t_dense = do_bench(run), do_bench(dense)
                row.update({f"us_grouped_aligned{tag}": t_grouped * 1e3, f"us_dense{tag}": t_dense * 1e3,
                            f"tflops_grouped_aligned{tag}": tflops / t_grouped * 1e3,
                            f"rel_grouped_aligned_vs_dense{tag}": rel(run()[0], dense())})  # fmt: skip
        if do_sweep:
            row["sweep"] = sweep(dyT_q, dyT_s, xT_q, xT_s, M, N, K)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\nM, N, K | split | unsplit us | split us | bf16 us | split speed-up | vs bf16 | rel err vs ref")
    for r in rows:
        print(f"{r['M']}, {r['N']}, {r['K']} | {r['split_k']} | {r['us_unsplit']:.1f} | {r['us_split']:.1f} | "
              f"{r['us_bf16']:.1f} | {r['speedup']:.2f} | {r['vs_bf16']:.2f} | {r['rel_split_vs_ref']:.1e}")  # fmt: skip
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "wgrad_split.json"), "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


def gluon_only() -> None:
    """Each GL.WGRAD_CONFIGS entry against the dispatched fp8_gemm_wgrad at the rows with M >= 4096, fp32 and bf16
    dW: microseconds (each launcher's host work included, as the model calls them) and the relative difference
    from the dispatched result (the same FP8 products summed in another order: ~1e-7 in fp32)."""
    torch.manual_seed(0)
    print("M, N, K | out | dispatched us (TFLOPS) | " + " | ".join(GL.WGRAD_CONFIGS) + " | rel diff of each")
    for M, N, K in SHAPES:
        if M < 4096 and N * K < 4096 * 4096:
            continue
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        x = (torch.randn(M, K, device="cuda") * (1 + torch.rand(K, device="cuda"))).bfloat16()
        dyT_q, dyT_s = quantize_act_t(dy)
        xT_q, xT_s = quantize_act_t(x)
        tflops = 2 * M * N * K / 1e12
        for dt in (torch.float32, torch.bfloat16):
            shipped = G.fp8_gemm_wgrad(dyT_q, dyT_s, xT_q, xT_s, dt)
            t0 = do_bench(lambda: G.fp8_gemm_wgrad(dyT_q, dyT_s, xT_q, xT_s, dt))
            cells, diffs = [], []
            for cfg in GL.WGRAD_CONFIGS:
                run = lambda: GL.launch_gluon(dyT_q, dyT_s, xT_q, xT_s, False, dt, config=cfg)
                t = do_bench(run)
                cells.append(f"{t * 1e3:.1f} ({tflops / t * 1e3:.0f})")
                diffs.append(f"{rel(run(), shipped):.1e}")
            print(f"{M}, {N}, {K} | {str(dt)[6:]} | {t0 * 1e3:.1f} ({tflops / t0 * 1e3:.0f}) | " + " | ".join(cells)
                  + " | " + " ".join(diffs), flush=True)  # fmt: skip


if __name__ == "__main__":
    gluon_only() if "--gluon" in sys.argv[1:] else main()
