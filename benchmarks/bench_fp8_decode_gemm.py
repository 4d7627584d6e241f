"""FP8 projections at decoding's row counts: fp8_gemv vs quantize_act + fp8_gemm vs cuBLAS bf16, one process, one GPU.

Decoding B sequences, each projection multiplies B rows by its whole weight: the time is the pass over the weight (1
byte a parameter in e4m3, 2 in bf16) plus launch latency. Three ways, at DeepSeek-V3's inference shapes:
- `bf16`: x @ W^T with W the dequantised bf16 weight (torch.matmul: cuBLAS), what a bf16 checkpoint runs;
- `two_step`: quantize_act(x), then fp8_gemm (FP8InferenceLinear's path above fp8_linear.GEMV_MAX_ROWS rows);
- `gemv`: fp8_gemv (one launch, the quantisation inside; its path up to GEMV_MAX_ROWS).

Each is timed as decoding runs it, in a CUDA graph of back-to-back calls; each call reads another copy of the
weights (at least COLD_BYTES of them a pass), so no call finds its weight in the 50 MB L2 as the layer before
left it, as in a model whose every layer has its own weights. Reported: us a call, the weight's bytes / time
(GB/s), the ratios, the autotuner's pick for fp8_gemv, and fp8_gemv's relative difference from two_step. Then
absorbed MLA's two products with kv_b_proj (kernels/mla_absorb.py against dequantise-then-einsum and bf16).

    PYTHONUNBUFFERED=1 python3 benchmarks/bench_fp8_decode_gemm.py    # writes $OUT/bench_fp8_decode_gemm.json
    TRITON_INTERPRET=1 python3 benchmarks/bench_fp8_decode_gemm.py --tiny   # CPU smoke run: small shapes, no timing
"""

# ruff: noqa: B023  (each lambda is timed inside its own loop iteration)
from __future__ import annotations

import importlib
import json
import math
import os
import statistics
import sys

import torch
from modeling_deepseek_v3.kernels import dequantize_weight, fp8_gemm, fp8_gemv, quantize_act, quantize_weight

GEMV = importlib.import_module("modeling_deepseek_v3.kernels.fp8_gemv")
MLA = importlib.import_module("modeling_deepseek_v3.kernels.mla_absorb")
# (name, N, K) of DeepSeek-V3's projections that FP8 inference runs as FP8InferenceLinear (the routed experts run
# the grouped GEMM)
SHAPES = [
    ("q_a", 1536, 7168),
    ("kv_a", 576, 7168),
    ("q_b", 24576, 1536),
    ("kv_b", 32768, 512),
    ("o", 7168, 16384),
    ("dense_gate_or_up", 18432, 7168),
    ("dense_down", 7168, 18432),
    ("shared_gate_or_up", 2048, 7168),
    ("shared_down", 7168, 2048),
]
ROWS = (1, 4, 16)
# Absorbed MLA's products with kv_b_proj at V3's heads (H, n, v, R), decoding 1 and 16 sequences
ABSORB_HEADS = (128, 128, 128, 512)
ABSORB_ROWS = (1, 16)
COLD_BYTES = 256 << 20  # e4m3 weights read per graph pass, 5x the H200's L2
REPLAYS = 20


def graph_us(calls: list, replays: int = REPLAYS) -> float:
    """Median time of one call in a CUDA graph that runs `calls` back to back (each warmed up first)."""
    for fn in calls:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def absorb_rows(tiny: bool, device: str) -> dict:
    """Absorbed MLA's two products with kv_b_proj a decoding step: `dequantise_einsum` (the whole e4m3 matrix
    dequantised by the Triton kernel, then the einsums: DeepSeek's inference code's way, with fewer bytes than the torch
    reference dequantisation modeling_dsv3 ran before kernels/mla_absorb.py),
    `kernels` (mla_absorb, from the e4m3 tiles) and `bf16` (the einsums over a bf16 checkpoint's matrix)."""
    H, n, v, R = (4, 16, 16, 32) if tiny else ABSORB_HEADS
    copies = 1 if tiny else max(2, math.ceil(COLD_BYTES / (H * (n + v) * R)))
    weights = [quantize_weight((torch.randn(H * (n + v), R, device=device) * 0.02).bfloat16()) for _ in range(copies)]
    bf16 = [dequantize_weight(q, s, torch.bfloat16).view(H, n + v, R).split([n, v], dim=1) for q, s in weights]
    rows = {}
    for T in (1, 3) if tiny else ABSORB_ROWS:
        q_nope = torch.randn(T, H, n, device=device).bfloat16()
        o_lat = torch.randn(T, H, R, device=device).bfloat16()

        def einsums(w_uk, w_uv):
            return torch.einsum("thn,hnr->thr", q_nope, w_uk), torch.einsum("thr,hvr->thv", o_lat, w_uv)

        def dequantise_einsum(q, s):
            return einsums(*dequantize_weight(q, s, torch.bfloat16).view(H, n + v, R).split([n, v], dim=1))

        def kernels(q, s):
            return MLA.absorb_query(q_nope, q, s, v), MLA.absorb_output(o_lat, q, s, n, v)

        got, want = kernels(*weights[0]), dequantise_einsum(*weights[0])
        row = dict(T=T, rel=[round(rel(a, b), 5) for a, b in zip(got, want, strict=True)])
        if not tiny:
            us = {
                "bf16": graph_us([lambda w=w: einsums(*w) for w in bf16]),
                "dequantise_einsum": graph_us([lambda w=w: dequantise_einsum(*w) for w in weights]),
                "kernels": graph_us([lambda w=w: kernels(*w) for w in weights]),
            }
            row["us"] = {k: round(t, 2) for k, t in us.items()}
            row["kernels_vs_dequantise_einsum"] = round(us["dequantise_einsum"] / us["kernels"], 3)
            row["kernels_vs_bf16"] = round(us["bf16"] / us["kernels"], 3)
        rows[f"T{T}"] = row
        print(f"absorb T={T}", json.dumps(row), flush=True)
    return rows


@torch.no_grad()
def main() -> None:
    tiny = "--tiny" in sys.argv
    device = "cpu" if tiny else "cuda"
    shapes = [("ragged", 200, 300), ("kv_a_like", 576, 256)] if tiny else SHAPES
    rows = (1, 3) if tiny else ROWS
    torch.manual_seed(0)
    result = {"device": device, "torch": torch.__version__, "rows": {}}
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    for name, N, K in shapes:
        copies = 1 if tiny else max(2, math.ceil(COLD_BYTES / (N * K)))
        weights = [quantize_weight((torch.randn(N, K, device=device) * 0.02).bfloat16()) for _ in range(copies)]
        bf16 = [dequantize_weight(q, s, torch.bfloat16) for q, s in weights]
        for M in rows:
            x = (torch.randn(M, K, device=device) * (1 + 10 * torch.rand(K, device=device))).bfloat16()
            two_step = lambda w: fp8_gemm(*quantize_act(x), *w)
            y_gemv, y_two = fp8_gemv(x, *weights[0]), two_step(weights[0])  # (autotunes both outside the graph)
            row = dict(N=N, K=K, M=M, gemv_vs_two_step_rel=round(rel(y_gemv, y_two), 5))
            if not tiny:
                us = {
                    "bf16": graph_us([lambda w=w: x @ w.t() for w in bf16]),
                    "two_step": graph_us([lambda w=w: two_step(w) for w in weights]),
                    "gemv": graph_us([lambda w=w: fp8_gemv(x, *w) for w in weights]),
                }
                row["us"] = {k: round(v, 2) for k, v in us.items()}
                row["weight_gbs"] = {k: round(N * K * (2 if k == "bf16" else 1) / v / 1e3) for k, v in us.items()}
                row["gemv_vs_bf16"] = round(us["bf16"] / us["gemv"], 3)
                row["gemv_vs_two_step"] = round(us["two_step"] / us["gemv"], 3)
                row["two_step_vs_bf16"] = round(us["bf16"] / us["two_step"], 3)
                best = GEMV._fp8_gemv_kernel.best_config
                row["gemv_config"] = dict(**best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)
            result["rows"][f"{name}_M{M}"] = row
            print(f"{name} M={M}", json.dumps(row), flush=True)
        del weights, bf16
    result["absorb"] = absorb_rows(tiny, device)
    if not tiny:  # geometric means over the shapes, per row count
        summary = {}
        for M in rows:
            cells = [r for r in result["rows"].values() if r["M"] == M]
            for key in ("gemv_vs_bf16", "gemv_vs_two_step", "two_step_vs_bf16"):
                gm = math.exp(statistics.fmean(math.log(r[key]) for r in cells))
                summary[f"M{M}_{key}_geomean"] = round(gm, 3)
        result["summary"] = summary
        print(json.dumps(summary))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_fp8_decode_gemm.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
