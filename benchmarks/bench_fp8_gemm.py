"""Block-scaled FP8 GEMM vs cuBLAS bf16 vs torch._scaled_mm (rowwise), one process, one GPU.

Run (from the repo root, on an H200):
    python3 -m pip install -e . --no-deps -q; PYTHONUNBUFFERED=1 python3 benchmarks/bench_fp8_gemm.py
Prints one JSON line per shape, then a summary; writes $OUT/fp8_gemm.json when OUT is set.
TFLOPS = 2*M*N*K / median time (triton.testing.do_bench, random inputs, never zeros).
"""

# ruff: noqa: B023  (each lambda is timed inside its own loop iteration, so late binding is harmless)
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench


def _import_kernels():
    """The installed package, or (where the package cannot import yet) kernels/ loaded directly."""
    try:
        from modeling_deepseek_v3 import kernels

        return kernels
    except Exception as e:  # the model package may be half-written or not installed there
        print(f"# package import failed ({type(e).__name__}: {e}); loading kernels/ directly", file=sys.stderr)
        root = Path(__file__).resolve().parents[1] / "kernels"
        spec = importlib.util.spec_from_file_location(
            "dsv3_kernels", root / "__init__.py", submodule_search_locations=[str(root)]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["dsv3_kernels"] = mod
        spec.loader.exec_module(mod)
        return mod


K_ = _import_kernels()
SHAPES = [(2112, 7168), (24576, 1536), (7168, 16384), (4096, 7168), (7168, 2048)]  # (N, K) of V3 layers


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    torch.backends.cudnn.allow_tf32 = False
    dev = os.environ.get("BENCH_DEVICE", "cuda")  # "cpu" with TRITON_INTERPRET=1: a smoke test of this script
    name = torch.cuda.get_device_name() if dev == "cuda" else dev
    print(torch.__version__, triton.__version__, name, flush=True)
    M = int(os.environ.get("BENCH_M", 4096))
    rows = []
    for N, K in SHAPES:
        flops = 2 * M * N * K
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        xq, xs = K_.quantize_act(x)
        wq, ws = K_.quantize_weight(w)
        y = K_.fp8_gemm(xq, xs, wq, ws)
        row = dict(M=M, N=N, K=K)
        row["err_vs_ref"] = rel(y, K_.fp8_gemm_ref(xq, xs, wq, ws, torch.float32))  # same fp8 inputs
        row["err_vs_bf16"] = rel(y, x.float() @ w.float().t())  # the whole recipe vs full precision
        t = bench(lambda: K_.fp8_gemm(xq, xs, wq, ws))
        row["fp8_block_tflops"] = flops / t / 1e9
        row["best_config"] = str(K_.fp8_gemm.__globals__["_fp8_gemm_kernel"].best_config)
        t = bench(lambda: x @ w.t())
        row["bf16_cublas_tflops"] = flops / t / 1e9
        a8, b8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        sa, sb = torch.ones(M, 1, device=dev), torch.ones(1, N, device=dev)
        try:
            t = bench(lambda: torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16))
            row["scaled_mm_rowwise_tflops"] = flops / t / 1e9
        except Exception as e:
            row["scaled_mm_rowwise_err"] = str(e)[:120]
        # backward GEMMs at this shape: dgrad dx[M,K] = dy[M,N] W, wgrad dW[N,K] = dy^T x
        dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
        dq, ds = K_.quantize_act(dy)
        dtq, dts = K_.quantize_act_t(dy)
        xtq, xts = K_.quantize_act_t(x)
        dx = K_.fp8_gemm_dgrad(dq, ds, wq, ws)
        row["dgrad_err_vs_ref"] = rel(dx, K_.fp8_gemm_dgrad_ref(dq, ds, wq, ws, torch.float32))
        dw = K_.fp8_gemm_wgrad(dtq, dts, xtq, xts)
        row["wgrad_err_vs_ref"] = rel(dw, K_.fp8_gemm_wgrad_ref(dtq, dts, xtq, xts))
        row["dgrad_tflops"] = flops / bench(lambda: K_.fp8_gemm_dgrad(dq, ds, wq, ws)) / 1e9
        row["wgrad_tflops"] = flops / bench(lambda: K_.fp8_gemm_wgrad(dtq, dts, xtq, xts)) / 1e9
        row["fp8_over_bf16"] = row["fp8_block_tflops"] / row["bf16_cublas_tflops"]
        if "scaled_mm_rowwise_tflops" in row:
            row["fp8_over_scaled_mm"] = row["fp8_block_tflops"] / row["scaled_mm_rowwise_tflops"]
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    # Quantisation bandwidth vs a device-to-device copy, at the largest activation of the list.
    x = torch.randn(M * 4, 7168, device=dev, dtype=torch.bfloat16)
    nbytes_q = x.numel() * (2 + 1) + x.numel() // 128 * 4  # read bf16, write e4m3 + scales
    t_copy = bench(lambda: x.clone())
    quant = dict(
        copy_GBps=2 * x.numel() * 2 / t_copy / 1e6,
        quant_act_GBps=nbytes_q / bench(lambda: K_.quantize_act(x)) / 1e6,
        quant_act_t_GBps=nbytes_q / bench(lambda: K_.quantize_act_t(x)) / 1e6,
    )
    print(json.dumps({k: round(v, 1) for k, v in quant.items()}), flush=True)

    # FP8Linear forward+backward vs nn.Linear bf16 at (M, N, K) = (4096, 7168, 2048)
    lin = torch.nn.Linear(2048, 7168, bias=False, device=dev, dtype=torch.bfloat16)
    f8 = K_.FP8Linear.from_linear(lin)
    xi = torch.randn(M, 2048, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(M, 7168, device=dev, dtype=torch.bfloat16)
    t_bf = bench(lambda: lin(xi).backward(g))
    t_f8 = bench(lambda: f8(xi).backward(g))
    linear = dict(shape=[M, 7168, 2048], bf16_fwd_bwd_ms=t_bf, fp8_fwd_bwd_ms=t_f8, speedup=t_bf / t_f8)
    print(json.dumps(linear), flush=True)

    med = sorted(r["fp8_over_bf16"] for r in rows)[len(rows) // 2]
    summary = dict(rows=rows, quant=quant, linear=linear, median_fp8_over_bf16=med, device=name,
                   torch=torch.__version__, triton=triton.__version__)  # fmt: skip
    print("\nN      K      fp8  bf16  scaled_mm  dgrad  wgrad  err_ref  err_bf16")
    for r in rows:
        print(f"{r['N']:<6} {r['K']:<6} {r['fp8_block_tflops']:4.0f} {r['bf16_cublas_tflops']:5.0f} "
              f"{r.get('scaled_mm_rowwise_tflops', float('nan')):9.0f} {r['dgrad_tflops']:6.0f} {r['wgrad_tflops']:6.0f}"
              f"  {r['err_vs_ref']:.1e}  {r['err_vs_bf16']:.1e}")  # fmt: skip
    print(f"median fp8/bf16 = {med:.2f}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "fp8_gemm.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
