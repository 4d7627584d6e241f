"""Block-scaled FP8 GEMM (ours: what _launch dispatches to, the Gluon and the Triton TMA kernel alone) vs cuBLAS
bf16 vs torch._scaled_mm rowwise and block-scaled (cuBLAS's own FP8 with our scales), one process, one GPU; then
the quantisation kernels vs a copy, and FP8Linear vs nn.Linear.

Run (from the repo root, on an H200):
    python3 -m pip install -e . --no-deps -q; PYTHONUNBUFFERED=1 python3 benchmarks/bench_fp8_gemm.py
Prints one JSON line per shape, then a summary; writes $OUT/fp8_gemm.json when OUT is set.
`--linear`: the FP8Linear comparison alone.
TFLOPS = 2*M*N*K / median time (triton.testing.do_bench, random inputs, never zeros).
"""

# ruff: noqa: B023, F821  (each lambda is timed inside its own loop iteration; names are deleted only after)
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
    if os.environ.get("BENCH_DEVICE") == "cpu":  # smoke test under the interpreter: run once, time nothing
        fn()
        return 1.0
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _table_logger(lines: list, filename: str):
    """A print that also keeps the line in `lines` and appends it to $OUT/filename (when OUT is set)."""

    def log(line: str) -> None:
        lines.append(line)
        print(line, flush=True)
        if os.environ.get("OUT"):
            with open(Path(os.environ["OUT"], filename), "a") as f:
                f.write(line + "\n")

    return log


def _gluon_module():
    """kernels/fp8_gemm_gluon.py, or None where it cannot run (no Gluon, not an H100/H200, interpreter)."""
    import importlib

    try:
        GL = importlib.import_module(K_.fp8_gemm.__module__.rsplit(".", 1)[0] + ".fp8_gemm_gluon")
    except Exception as e:
        print(f"# gluon module import failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    if not torch.cuda.is_available() or os.environ.get("BENCH_DEVICE") == "cpu":
        return None
    probe = torch.empty(16, 16, device="cuda", dtype=torch.float8_e4m3fn)
    return GL if GL.can_use_gluon(probe) else None


def scaled_mm_blockwise_fn(xq, xs, wq, ws):
    """cuBLAS's own block-scaled FP8 (1x128 activation scales, 128x128 weight blocks) through
    torch._scaled_mm, or (None, reason). cuBLAS wants the activation scales outer-dim-major (the
    [M, Kb] tensor M-contiguous, i.e. transposed-contiguous) and the weight scales as [Kb, Nb] for
    B = W^T [K, N]; the layout is prepared once, outside the timing. Tries the layouts in turn."""
    xs_t = xs.t().contiguous().t()
    errs = []
    for name, sb in [("ws.t()", ws.t()), ("ws.t().contiguous()", ws.t().contiguous())]:
        fn = lambda sb=sb: torch._scaled_mm(xq, wq.t(), scale_a=xs_t, scale_b=sb, out_dtype=torch.bfloat16)
        try:
            fn()
            return fn, name
        except Exception as e:
            errs.append(f"{name}: {type(e).__name__}: {str(e)[:150]}")
    return None, " | ".join(errs)


def _host_and_graph_ms(fn, grads) -> tuple[float, float]:
    """(host ms a call with no sync: the CPU's launch cost; ms a call replayed from one CUDA graph: the GPU's)."""
    import time

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        fn()
    host = (time.perf_counter() - t0) / 20 * 1e3
    torch.cuda.synchronize()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                for t in grads:
                    t.grad = None
                fn()
        torch.cuda.current_stream().wait_stream(side)
        for t in grads:
            t.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return host, bench(graph.replay)
    except Exception as e:  # capture is a measurement aid only
        print(f"# graph capture failed: {type(e).__name__}: {e}", file=sys.stderr)
        return host, float("nan")


def linear_bench(dev: str, small: bool, G, Q) -> dict:
    """FP8Linear forward+backward against bf16 nn.Linear (the table's `linear` entry; `--linear` runs it alone)."""
    # FP8Linear forward+backward vs nn.Linear bf16 at (M, N, K) = (4096, 7168, 2048). Weight quantised once
    # per forward+backward (as in training). Eager timings (what a training loop without graphs sees),
    # host time a call, and CUDA-graph replays (GPU time alone), plus each kernel alone.
    Mi, Ni, Ki = (256, 256, 256) if small else (4096, 7168, 2048)
    lin = torch.nn.Linear(Ki, Ni, bias=False, device=dev, dtype=torch.bfloat16)
    f8 = K_.FP8Linear.from_linear(lin)
    xi = torch.randn(Mi, Ki, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(Mi, Ni, device=dev, dtype=torch.bfloat16)
    linear = dict(shape=[Mi, Ni, Ki])
    linear["bf16_fwd_bwd_ms"] = bench(lambda: lin(xi).backward(g))
    linear["fp8_fwd_bwd_ms"] = bench(lambda: f8(xi).backward(g))
    linear["speedup"] = linear["bf16_fwd_bwd_ms"] / linear["fp8_fwd_bwd_ms"]
    # cache_weight: the quantised weight kept while unchanged (gradient-accumulation micro-batches after the first);
    # eager only, a CUDA-graph capture quantises on every replay.
    f8_cached = K_.FP8Linear.from_linear(lin, cache_weight=True)
    linear["fp8_cached_fwd_bwd_ms"] = bench(lambda: f8_cached(xi).backward(g))
    linear["speedup_cached"] = linear["bf16_fwd_bwd_ms"] / linear["fp8_cached_fwd_bwd_ms"]
    if not small:
        linear["bf16_host_ms"], linear["bf16_graph_ms"] = _host_and_graph_ms(
            lambda: lin(xi).backward(g), [xi, lin.weight]
        )
        linear["fp8_host_ms"], linear["fp8_graph_ms"] = _host_and_graph_ms(lambda: f8(xi).backward(g), [xi, f8.weight])
        linear["speedup_graphs"] = linear["bf16_graph_ms"] / linear["fp8_graph_ms"]
        # The wgrad on the dense Triton kernel, as before session 9: both rules that dispatch it elsewhere (the Gluon
        # kernel since session 10, the grouped wgrad's one aligned expert since session 9) switched off.
        rules = G._gluon.GLUON_WGRAD_MIN_TILES, G.WGRAD_AS_ONE_EXPERT_MIN_TILES
        G._gluon.GLUON_WGRAD_MIN_TILES = G.WGRAD_AS_ONE_EXPERT_MIN_TILES = 1 << 62
        try:
            _, linear["fp8_graph_ms_dense_wgrad"] = _host_and_graph_ms(lambda: f8(xi).backward(g), [xi, f8.weight])
        finally:
            G._gluon.GLUON_WGRAD_MIN_TILES, G.WGRAD_AS_ONE_EXPERT_MIN_TILES = rules
    xq, xs = K_.quantize_act(xi.detach())
    wq, ws, wqt = K_.quantize_weight(lin.weight.detach(), transposed=True)
    dq, ds, dtq, dts = Q.quantize_act_both(g)
    xtq, xts = K_.quantize_act_t(xi.detach())
    wst = ws.t().contiguous()
    parts = dict(
        quant_x_both=lambda: Q.quantize_act_both(xi.detach()),
        quant_w_plus_T=lambda: K_.quantize_weight(lin.weight.detach(), transposed=True),
        gemm_fwd=lambda: K_.fp8_gemm(xq, xs, wq, ws),
        quant_dy_both=lambda: Q.quantize_act_both(g),
        scale_T=lambda: ws.t().contiguous(),
        dgrad=lambda: G._launch(dq, ds, wqt, wst, True, torch.bfloat16),
        wgrad_bf16=lambda: K_.fp8_gemm_wgrad(dtq, dts, xtq, xts, torch.bfloat16),
    )
    extra = dict(wgrad_bf16_dense_kernel=lambda: K_.fp8_gemm_wgrad(dtq, dts, xtq, xts, torch.bfloat16, split_k=1))
    linear["parts_ms"] = {k: round(bench(f), 4) for k, f in parts.items()}
    linear["parts_sum_ms"] = sum(linear["parts_ms"].values())
    linear["not_dispatched_ms"] = {k: round(bench(f), 4) for k, f in extra.items()}  # the wgrad before session 9
    if not small:  # both wgrads replayed from CUDA graphs: GPU time without the launches' host cost
        wgrads = dict(dispatched=parts["wgrad_bf16"], dense_kernel=extra["wgrad_bf16_dense_kernel"])
        linear["wgrad_bf16_graph_ms"] = {k: round(_host_and_graph_ms(f, [])[1], 4) for k, f in wgrads.items()}
    print(json.dumps(linear), flush=True)
    return linear


def main() -> None:
    import importlib

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    torch.backends.cudnn.allow_tf32 = False
    dev = os.environ.get("BENCH_DEVICE", "cuda")  # "cpu" with TRITON_INTERPRET=1: a smoke test of this script
    small = dev == "cpu"
    name = torch.cuda.get_device_name() if dev == "cuda" else dev
    print(torch.__version__, triton.__version__, name, flush=True)
    G = importlib.import_module(K_.fp8_gemm.__module__)
    Q = importlib.import_module(K_.quantize_act.__module__)
    ms_list = [int(m) for m in os.environ.get("BENCH_M", "4096,16384").split(",")]
    shapes = [(256, 384)] if small else SHAPES
    GLM = _gluon_module()
    if small:
        ms_list = [256]

    # Quantisation: codes and scales bit for bit against the CPU reference (torch on CUDA divides by a
    # Python scalar as a multiply by its reciprocal, so the CPU computes the reference), both divisions.
    exact = []
    for shape in [(96, 384)] if small else [(1024, 7168), (777, 1000)]:
        x = (torch.randn(*shape, device=dev) * torch.logspace(-3, 2, shape[1], device=dev)).to(torch.bfloat16)
        x.view(-1)[:5] = torch.tensor([127.9, -127.9, 15.99, 447.9, 0.2499], device=dev, dtype=torch.bfloat16)
        xc = x.cpu()
        w = x[:, : shape[1] // 2 * 2].reshape(2, shape[0], -1).contiguous() if shape[0] % 2 == 0 else x
        for pow2 in (False, True):
            refs = (
                *Q.quantize_act_ref(xc, pow2),
                *Q.quantize_act_t_ref(xc, pow2),
                *Q.quantize_weight_ref(w.cpu(), pow2),
            )
            for fast in (False, True):
                got = (*Q.quantize_act(x, pow2, fast), *Q.quantize_act_t(x, pow2, fast),
                       *Q.quantize_weight(w, pow2, fast_div=fast)[:2])  # fmt: skip
                _, _, wt = Q.quantize_weight(w, pow2, transposed=True, fast_div=fast)
                got_b = Q.quantize_act_both(x, pow2, fast)
                same = [torch.equal(g.cpu().view(torch.uint8) if g.dtype == torch.float8_e4m3fn else g.cpu(),
                                    r.view(torch.uint8) if r.dtype == torch.float8_e4m3fn else r)
                        for g, r in zip((*got, *got_b), (*refs, *refs[:4]), strict=True)]  # fmt: skip
                same.append(
                    torch.equal(wt.cpu().view(torch.uint8), refs[4].transpose(-1, -2).contiguous().view(torch.uint8))
                )
                exact.append(dict(shape=shape, pow2=pow2, fast_div=fast, all_equal=all(same), which=same))
                print(json.dumps(exact[-1]), flush=True)

    rows = []
    for M in ms_list:
        for N, K in shapes:
            flops = 2 * M * N * K
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
            xq, xs = K_.quantize_act(x)
            wq, ws, wqt = K_.quantize_weight(w, transposed=True)
            y = K_.fp8_gemm(xq, xs, wq, ws)
            row = dict(M=M, N=N, K=K)
            row["err_vs_ref"] = rel(y, K_.fp8_gemm_ref(xq, xs, wq, ws, torch.float32))  # same fp8 inputs
            row["err_vs_bf16"] = rel(y, x.float() @ w.float().t())  # the whole recipe vs full precision
            t = bench(lambda: K_.fp8_gemm(xq, xs, wq, ws))
            row["fp8_block_tflops"] = flops / t / 1e9
            key = (G.m_bucket(M), N, K, True, torch.bfloat16, x.device)
            gluon_cfg = GLM.gluon_config(M, N, K, True, torch.bfloat16) if GLM is not None else None
            if gluon_cfg is not None and GLM.can_use_gluon(xq, wq, y):  # what _launch dispatched to
                row["best_config"] = f"gluon {gluon_cfg}"
            else:
                row["best_config"] = str(G._TMA_BEST.get(key, "pointer kernel"))
            t = bench(lambda: x @ w.t())
            row["bf16_cublas_tflops"] = flops / t / 1e9
            a8, b8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
            sa, sb = torch.ones(M, 1, device=dev), torch.ones(1, N, device=dev)
            try:
                t = bench(lambda: torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16))
                row["scaled_mm_rowwise_tflops"] = flops / t / 1e9
            except Exception as e:
                row["scaled_mm_rowwise_err"] = str(e)[:120]
            if not small:  # cuBLAS block-scaled FP8: the same recipe as ours, a vendor kernel
                fn, how = scaled_mm_blockwise_fn(xq, xs, wq, ws)
                if fn is None:
                    row["scaled_mm_blockwise"] = "n/a: " + how
                else:
                    row["scaled_mm_blockwise_err_vs_ref"] = rel(fn(), K_.fp8_gemm_ref(xq, xs, wq, ws, torch.float32))
                    row["scaled_mm_blockwise_tflops"] = flops / bench(fn) / 1e9
            if not small:  # this repo's Triton TMA kernel by itself (fp8_gemm above is what _launch picks)
                fn = lambda: G._launch(xq, xs, wq, ws, True, torch.bfloat16, use_tma=True)
                row["triton_tma_err_vs_ref"] = rel(fn(), K_.fp8_gemm_ref(xq, xs, wq, ws, torch.float32))
                row["triton_tma_tflops"] = flops / bench(fn) / 1e9
            if GLM is not None:  # the Gluon kernel by itself (whatever _launch dispatches to)
                yg = GLM.launch_gluon(xq, xs, wq, ws, True, torch.bfloat16)
                row["gluon_err_vs_ref"] = rel(yg, K_.fp8_gemm_ref(xq, xs, wq, ws, torch.float32))
                row["gluon_tflops"] = (
                    flops / bench(lambda: GLM.launch_gluon(xq, xs, wq, ws, True, torch.bfloat16)) / 1e9
                )
            # backward GEMMs at this shape: dgrad dx[M,K] = dy[M,N] W, wgrad dW[N,K] = dy^T x
            dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
            dq, ds = K_.quantize_act(dy)
            dtq, dts = K_.quantize_act_t(dy)
            xtq, xts = K_.quantize_act_t(x)
            dx = K_.fp8_gemm_dgrad(dq, ds, None, ws, w_KN=wqt)
            row["dgrad_err_vs_ref"] = rel(dx, K_.fp8_gemm_dgrad_ref(dq, ds, wq, ws, torch.float32))
            dw = K_.fp8_gemm_wgrad(dtq, dts, xtq, xts)
            row["wgrad_err_vs_ref"] = rel(dw, K_.fp8_gemm_wgrad_ref(dtq, dts, xtq, xts))
            row["dgrad_tflops"] = flops / bench(lambda: K_.fp8_gemm_dgrad(dq, ds, None, ws, w_KN=wqt)) / 1e9
            row["wgrad_tflops"] = flops / bench(lambda: K_.fp8_gemm_wgrad(dtq, dts, xtq, xts)) / 1e9
            row["wgrad_bf16out_tflops"] = (
                flops / bench(lambda: K_.fp8_gemm_wgrad(dtq, dts, xtq, xts, torch.bfloat16)) / 1e9
            )
            row["fp8_over_bf16"] = row["fp8_block_tflops"] / row["bf16_cublas_tflops"]
            if "scaled_mm_rowwise_tflops" in row:
                row["fp8_over_scaled_mm"] = row["fp8_block_tflops"] / row["scaled_mm_rowwise_tflops"]
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            del x, w, dy, xq, wq, wqt, dq, dtq, xtq, a8, b8, y, dx, dw

    # Quantisation bandwidth vs a device-to-device copy, at a large activation.
    x = torch.randn(*((256, 256) if small else (16384, 7168)), device=dev, dtype=torch.bfloat16)
    wbig = torch.randn(*((256, 256) if small else (7168, 16384)), device=dev, dtype=torch.bfloat16)
    n = x.numel()
    nbytes_q = n * (2 + 1) + n // 128 * 4  # read bf16, write e4m3 + scales
    t_copy = bench(lambda: x.clone())
    quant = dict(copy_GBps=2 * n * 2 / t_copy / 1e6)
    for fast in (False, True):
        sfx = "_fastdiv" if fast else "_divrn"
        quant["quant_act" + sfx] = nbytes_q / bench(lambda: Q.quantize_act(x, fast_div=fast)) / 1e6
        quant["quant_act_t" + sfx] = nbytes_q / bench(lambda: Q.quantize_act_t(x, fast_div=fast)) / 1e6
        quant["quant_both_2launch" + sfx] = 2 * nbytes_q / bench(lambda: Q.quantize_act_both(x, fast_div=fast)) / 1e6
        quant["quant_weight" + sfx] = (wbig.numel() * 3) / bench(lambda: Q.quantize_weight(wbig, fast_div=fast)) / 1e6
        quant["quant_weight_plus_T" + sfx] = (
            (wbig.numel() * 4) / bench(lambda: Q.quantize_weight(wbig, transposed=True, fast_div=fast)) / 1e6
        )
    # The two divisions on 117M elements, kernel against kernel (the CPU reference above covers fewer).
    same = []
    for fast in (False, True):
        same.append((*Q.quantize_act(x, fast_div=fast), *Q.quantize_act_t(x, fast_div=fast),
                     *Q.quantize_weight(wbig, fast_div=fast)))  # fmt: skip
    quant = {k: round(v, 1) for k, v in quant.items()}
    quant["fast_div_equals_div_rn_117M"] = all(
        torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype == torch.float8_e4m3fn else torch.equal(a, b)
        for a, b in zip(*same, strict=True)
    )
    del same
    quant.update({k + "_of_copy": round(v / quant["copy_GBps"], 3) for k, v in quant.items()
                  if k != "copy_GBps" and isinstance(v, float)})  # fmt: skip
    print(json.dumps(quant), flush=True)
    del x, wbig

    linear = linear_bench(dev, small, G, Q)

    meds = {M: sorted(r["fp8_over_bf16"] for r in rows if r["M"] == M)[len(shapes) // 2] for M in ms_list}
    summary = dict(rows=rows, quant=quant, quant_exact=exact, linear=linear, median_fp8_over_bf16=meds, device=name,
                   torch=torch.__version__, triton=triton.__version__)  # fmt: skip
    print("\nM      N      K      fp8  triton gluon bf16  scaled_mm blockwise_mm  dgrad  wgrad(f32) wgrad(bf16)  err_ref  "
          "err_gluon err_blockwise_mm err_bf16  config")  # fmt: skip
    nan = float("nan")
    for r in rows:
        print(f"{r['M']:<6} {r['N']:<6} {r['K']:<6} {r['fp8_block_tflops']:4.0f} {r.get('triton_tma_tflops', nan):6.0f} "
              f"{r.get('gluon_tflops', nan):5.0f} "
              f"{r['bf16_cublas_tflops']:5.0f} {r.get('scaled_mm_rowwise_tflops', nan):9.0f} "
              f"{r.get('scaled_mm_blockwise_tflops', nan):12.0f} {r['dgrad_tflops']:6.0f} {r['wgrad_tflops']:6.0f} "
              f"{r['wgrad_bf16out_tflops']:10.0f}  {r['err_vs_ref']:.1e}  {r.get('gluon_err_vs_ref', nan):.1e}   "
              f"{r.get('scaled_mm_blockwise_err_vs_ref', nan):.1e}          {r['err_vs_bf16']:.1e}  {r['best_config'][:60]}")  # fmt: skip
        if isinstance(r.get("scaled_mm_blockwise"), str):
            print(f"   scaled_mm blockwise {r['scaled_mm_blockwise']}")
    print(
        f"median fp8/bf16 = {meds}; quant exact = {all(e['all_equal'] for e in exact if not e['fast_div'])} (div.rn), "
        f"{all(e['all_equal'] for e in exact if e['fast_div'])} (fast div)"
    )
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "fp8_gemm.json").write_text(json.dumps(summary, indent=1, default=str))


def _ms(fn, rep=40) -> float:
    if os.environ.get("BENCH_DEVICE") == "cpu":  # smoke test: run once, time nothing
        fn()
        return 1.0
    return do_bench(fn, warmup=10, rep=rep, return_mode="median")


def sweep() -> None:
    """Variants and configurations side by side (one device call): correctness on fresh random inputs
    first, then medians. Prints a compact table; writes $OUT/sweep.json."""
    import importlib

    G = importlib.import_module(K_.fp8_gemm.__module__)
    GG = importlib.import_module(K_.fp8_grouped_gemm.__module__)
    Q = importlib.import_module(K_.quantize_act.__module__)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = os.environ.get("BENCH_DEVICE", "cuda")  # "cpu" + TRITON_INTERPRET=1: a smoke test at toy sizes
    small = dev == "cpu"
    out = dict(device=torch.cuda.get_device_name() if not small else dev, torch=torch.__version__,
               triton=triton.__version__)  # fmt: skip
    print(out, flush=True)
    lines = []
    log = _table_logger(lines, "sweep.txt")

    # Ceilings: device-to-device copy, cuBLAS bf16.
    big = torch.randn(*((256, 256) if small else (16384, 7168)), device=dev, dtype=torch.bfloat16)
    copy_gbps = 2 * big.numel() * 2 / _ms(lambda: big.clone()) / 1e6
    out["copy_GBps"] = copy_gbps
    log(f"copy {copy_gbps:.0f} GB/s")

    # Quantisation: exact codes and scales vs the torch references on the GPU, then bandwidth per tile.
    carry = torch.tensor([127.9, -127.9, 15.99, 447.9, 0.2499, 1.0 / 512 * 0.6, -1.0 / 512 * 0.4])
    for shape in [(256, 384), (130, 200)] if small else [(4096, 7168), (777, 1000)]:
        x = (torch.randn(*shape, device=dev) * torch.logspace(-3, 2, shape[1], device=dev)).to(torch.bfloat16)
        x.view(-1)[:7] = carry.to(dev, torch.bfloat16)
        for pow2, fast in [(False, False), (True, False), (False, True), (True, True)]:
            yr, sr = Q.quantize_act_ref(x, pow2)
            ytr, str_ = Q.quantize_act_t_ref(x, pow2)
            y, s_, yt, st = Q.quantize_act_both(x, pow2, fast)
            y1, s1 = Q.quantize_act(x, pow2, fast)
            yt1, st1 = Q.quantize_act_t(x, pow2, fast)
            ok = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in
                     [(y, yr), (y1, yr), (yt, ytr), (yt1, ytr)]) and all(torch.equal(a, b) for a, b in
                     [(s_, sr), (s1, sr), (st, str_), (st1, str_)])  # fmt: skip
            w = x[:, : shape[1] // 2 * 2].reshape(2, shape[0], -1).contiguous() if shape[0] % 2 == 0 else x
            wq, ws, wqt = Q.quantize_weight(w, pow2, transposed=True, fast_div=fast)
            wr, wsr = Q.quantize_weight_ref(w, pow2)
            ok_w = torch.equal(wq.view(torch.uint8), wr.view(torch.uint8)) and torch.equal(ws, wsr)
            ok_w = ok_w and torch.equal(wqt.view(torch.uint8), wr.transpose(-1, -2).contiguous().view(torch.uint8))
            log(f"quant exact {shape} pow2={pow2} fast_div={fast}: act={ok} weight={ok_w}")
            out.setdefault("quant_exact", []).append([shape, pow2, fast, bool(ok and ok_w)])
    nb = big.numel() * 3 + big.numel() // 128 * 4
    q = {}
    for kind, tiles in [("row", [(32, 128, 4), (64, 128, 4), (64, 128, 8), (128, 128, 8)]),
                        ("col", [(128, 32, 4), (128, 64, 4), (128, 64, 8), (128, 128, 8)])]:  # fmt: skip
        for t in tiles:
            for fast in (False, True):
                try:
                    ms = _ms(lambda: Q._quant_launch(big, kind == "row", kind == "col", False, t, fast))
                    gbps = nb / ms / 1e6
                    q[f"{kind}{t}fast{fast}"] = gbps
                    log(
                        f"quant {kind} {t} fast={fast}: {ms * 1e3:.0f} us {gbps:.0f} GB/s = {gbps / copy_gbps:.0%} of copy"
                    )
                except Exception as e:
                    log(f"quant {kind} {t}: ERR {type(e).__name__} {str(e)[:200]}")
    w = torch.randn(*((256, 256) if small else (7168, 16384)), device=dev, dtype=torch.bfloat16)
    for tr in (False, True):
        for warps in (8, 16):
            for fast in (False, True):
                ms = _ms(lambda: Q.quantize_weight(w, False, transposed=tr, num_warps=warps, fast_div=fast))
                gbps = w.numel() * (3 + tr) / ms / 1e6
                log(
                    f"quant weight transposed={tr} warps={warps} fast={fast}: {ms * 1e3:.0f} us {gbps:.0f} GB/s = {gbps / copy_gbps:.0%}"
                )
    out["quant"] = q
    del big, w

    # Dense GEMMs: forward (B blockwise), dgrad (B = W^T blockwise), wgrad (B per row, fp32 out).
    cfgs = [(128, 128, 8, 3, 1, True), (128, 128, 8, 4, 1, False), (64, 128, 4, 3, 2, True), (64, 256, 8, 3, 1, True),
            (128, 128, 8, 3, 1, False), (64, 128, 4, 2, 3, True), (128, 128, 8, 3, 8, False), (64, 128, 4, 4, 8, False)]  # fmt: skip
    gem = []
    gshapes = [(4096, n, k) for n, k in SHAPES] + [(16384, n, k) for n, k in SHAPES]
    if small:
        gshapes, cfgs = [(4096, 256, 384)], [(128, 128, 8, 3, 1, True), (64, 256, 8, 3, 1, False)]
    for M, N, K in gshapes:
        if True:
            fl = 2 * M * N * K
            if small:
                M = 256
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            wt = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
            xq, xs = K_.quantize_act(x)
            wq, ws = K_.quantize_weight(wt)
            ref = K_.fp8_gemm_ref(xq, xs, wq, ws, torch.float32) if M <= 4096 else None
            row = dict(M=M, N=N, K=K, bf16=fl / _ms(lambda: x @ wt.t()) / 1e9)
            a8, b8 = x.to(torch.float8_e4m3fn), wt.to(torch.float8_e4m3fn)
            sa, sb = torch.ones(M, 1, device=dev), torch.ones(1, N, device=dev)
            if not small:
                row["scaled_mm"] = fl / _ms(lambda: torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb,
                                                                     out_dtype=torch.bfloat16)) / 1e9  # fmt: skip
            row["ptr"] = fl / _ms(lambda: G._launch(xq, xs, wq, ws, True, torch.bfloat16, use_tma=False)) / 1e9
            for c in cfgs:
                name = "tma" + ",".join(map(str, c))
                try:
                    y = G.launch_tma_config(xq, xs, wq, ws, True, torch.bfloat16, *c)
                    if ref is not None:
                        err = rel(y, ref)
                        if not err < 5e-3:
                            log(f"  {name} WRONG err {err:.2e}")
                            continue
                    row[name] = fl / _ms(lambda: G.launch_tma_config(xq, xs, wq, ws, True, torch.bfloat16, *c)) / 1e9
                except Exception as e:
                    log(f"  {name} ERR {type(e).__name__}: {str(e)[:300]}")
            if M <= 4096:  # backward GEMMs at this shape
                dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
                dq, ds = K_.quantize_act(dy)
                _, _, wqt = Q.quantize_weight(wt, False, transposed=True)
                wst = ws.t().contiguous()
                dref = K_.fp8_gemm_dgrad_ref(dq, ds, wq, ws, torch.float32)
                dtq, dts = K_.quantize_act_t(dy)
                xtq, xts = K_.quantize_act_t(x)
                wref = K_.fp8_gemm_wgrad_ref(dtq, dts, xtq, xts)
                row["d_ptr"] = fl / _ms(lambda: G._launch(dq, ds, wqt, wst, True, torch.bfloat16, use_tma=False)) / 1e9
                row["w_ptr"] = (
                    fl / _ms(lambda: G._launch(dtq, dts, xtq, xts, False, torch.float32, use_tma=False)) / 1e9
                )
                for c in cfgs[:6]:
                    for tag, args, r, od in [("d", (dq, ds, wqt, wst, True), dref, torch.bfloat16),
                                             ("w", (dtq, dts, xtq, xts, False), wref, torch.float32)]:  # fmt: skip
                        name = f"{tag}_tma" + ",".join(map(str, c))
                        try:
                            y = G.launch_tma_config(*args, od, *c)
                            if r is not None and not rel(y, r) < 5e-3:
                                log(f"  {name} WRONG err {rel(y, r):.2e}")
                                continue
                            row[name] = fl / _ms(lambda: G.launch_tma_config(*args, od, *c)) / 1e9
                        except Exception as e:
                            log(f"  {name} ERR {type(e).__name__}: {str(e)[:200]}")
            gem.append(row)
            best = max((k for k in row if k.startswith("tma")), key=lambda k: row[k], default=None)
            log(f"M={M} N={N} K={K}: bf16 {row['bf16']:.0f} scaled_mm {row.get('scaled_mm', 0):.0f} ptr {row['ptr']:.0f} "
                f"best {best} {row.get(best, 0):.0f} | " + " ".join(f"{k[3:]}={v:.0f}" for k, v in row.items()
                                                                  if k.startswith("tma")))  # fmt: skip
            if M <= 4096:
                for tag in ("d", "w"):
                    ks = [k for k in row if k.startswith(tag + "_tma")]
                    log(
                        f"   {tag}: ptr {row.get(tag + '_ptr', 0):.0f} | "
                        + " ".join(f"{k[len(tag) + 4 :]}={row[k]:.0f}" for k in ks)
                    )
    out["gemm"] = gem
    # Ragged edges on the GPU (M, N, K not multiples of the tiles; K not of 128).
    x, wt = torch.randn(777, 1040, device=dev), torch.randn(1000, 1040, device=dev)
    if small:
        x, wt = x[:77, :144].contiguous(), wt[:100, :144].contiguous()
    xq, xs = K_.quantize_act(x)
    wq, ws = K_.quantize_weight(wt)
    ref = K_.fp8_gemm_ref(xq, xs, wq, ws, torch.float32)
    errs = [rel(G.launch_tma_config(xq, xs, wq, ws, True, torch.float32, *c), ref) for c in cfgs]
    errs.append(rel(K_.fp8_gemm(xq, xs, wq, ws, torch.float32), ref))
    log(f"ragged (777,1000,1040) fp32 errs max {max(errs):.2e}")

    # Grouped GEMMs at V3 MoE size: 8192 tokens x top-8 over 256 experts.
    T, E, D, I = (64, 8, 256, 128) if small else (8192, 256, 7168, 2048)  # noqa: E741  (I: expert width, as in the paper)
    idx = torch.rand(T, E, device=dev).topk(8, dim=1).indices
    counts = torch.bincount(idx.flatten(), minlength=E)
    offs = counts.cumsum(0).to(torch.int32)
    S = T * 8
    for name, N, Kd in [("gate_up", 2 * I, D), ("down", D, I)]:
        fl = 2 * S * N * Kd
        x = torch.randn(S, Kd, device=dev, dtype=torch.bfloat16)
        w = torch.randn(E, N, Kd, device=dev, dtype=torch.bfloat16) * 0.02
        xq, xs = K_.quantize_act(x)
        wq, ws = K_.quantize_weight(w)
        r = dict(bf16_grouped_mm=fl / _ms(lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offs)) / 1e9)
        del w
        r["ptr"] = fl / _ms(lambda: GG._grouped_launch(xq, xs, wq, ws, offs, torch.bfloat16, use_tma=False)) / 1e9
        y0 = GG._grouped_launch(xq, xs, wq, ws, offs, torch.float32, use_tma=False)
        for c in [(64, 128, 4, 4), (64, 128, 4, 3), (128, 128, 8, 3), (64, 256, 8, 3), (128, 128, 8, 4)][
            : 2 if small else 5
        ]:
            try:
                y = GG._grouped_launch(xq, xs, wq, ws, offs, torch.float32, use_tma=True, config=c)
                e_ = rel(y, y0)
                if not e_ < 1e-5:
                    log(f"  grouped {c} WRONG {e_:.2e}")
                    continue
                r[str(c)] = (
                    fl
                    / _ms(lambda: GG._grouped_launch(xq, xs, wq, ws, offs, torch.bfloat16, use_tma=True, config=c))
                    / 1e9
                )
            except Exception as e:
                log(f"  grouped {c} ERR {type(e).__name__}: {str(e)[:200]}")
        dq, dsc = K_.quantize_act_t(torch.randn(S, N, device=dev, dtype=torch.bfloat16))
        xtq, xts = K_.quantize_act_t(x)
        r["wgrad_ptr"] = (
            fl / _ms(lambda: K_.fp8_grouped_gemm_wgrad(dq, dsc, xtq, xts, offs, torch.bfloat16, use_tma=False)) / 1e9
        )
        r["wgrad_cfg"] = str(GG._grouped_wgrad_kernel.best_config)
        r["wgrad_tma"] = (
            fl / _ms(lambda: K_.fp8_grouped_gemm_wgrad(dq, dsc, xtq, xts, offs, torch.bfloat16, use_tma=True)) / 1e9
        )
        log(f"grouped {name} (S={S}, N={N}, K={Kd}): " + " ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}"
                                                                for k, v in r.items()))  # fmt: skip
        out[f"grouped_{name}"] = r
        del x, xq, wq
        if not small:
            torch.cuda.empty_cache()
    # FP8Linear forward+backward vs bf16 nn.Linear (autotuned launchers)
    Mi, Ni, Ki = (256, 256, 256) if small else (4096, 7168, 2048)
    lin = torch.nn.Linear(Ki, Ni, bias=False, device=dev, dtype=torch.bfloat16)
    f8 = K_.FP8Linear.from_linear(lin)
    xi = torch.randn(Mi, Ki, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(Mi, Ni, device=dev, dtype=torch.bfloat16)
    for _ in range(2):
        t_bf = _ms(lambda: lin(xi).backward(g), rep=100)
        t_f8 = _ms(lambda: f8(xi).backward(g), rep=100)
        log(
            f"FP8Linear fwd+bwd {(Mi, Ni, Ki)}: bf16 {t_bf * 1e3:.0f} us, fp8 {t_f8 * 1e3:.0f} us, speedup {t_bf / t_f8:.2f}"
        )
    out["linear"] = dict(bf16_ms=t_bf, fp8_ms=t_f8)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "sweep.json").write_text(json.dumps(out, indent=1))


def gluon_bench() -> None:
    """The Gluon kernel against ours (Triton TMA), cuBLAS bf16, and cuBLAS FP8 (rowwise and block-scaled
    through torch._scaled_mm), one device call: correctness first (ragged shapes, both B scalings, both
    output types, NaN-poisoned outputs), then TFLOPS per V3 shape and per Gluon configuration, forward,
    dgrad and wgrad. Prints a table last; writes $OUT/gluon.json and $OUT/gluon.txt."""
    import importlib

    G = importlib.import_module(K_.fp8_gemm.__module__)
    GLM = _gluon_module()
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    lines = []
    log = _table_logger(lines, "gluon.txt")

    log(str(out))
    if GLM is None:
        log("gluon kernel cannot run here")
        return
    cfgs = list(GLM.DENSE_CONFIGS)
    ms = lambda fn: do_bench(fn, warmup=10, rep=60, return_mode="median")

    # Correctness: fresh random inputs (scaled per column so the scales vary), NaN-poisoned outputs.
    worst = 0.0
    for M, N, K in [(777, 1000, 1040), (777, 1040, 1000), (777, 2112, 7168), (784, 1000, 2112), (4096, 7168, 2048)]:
        x = torch.randn(M, K, device="cuda") * (1 + 10 * torch.rand(K, device="cuda"))
        w = torch.randn(N, K, device="cuda") * 0.02
        xq, xs = K_.quantize_act(x)
        wq, ws = K_.quantize_weight(w)
        wqt = wq.t().contiguous()  # W^T codes by a plain transpose (the same 128x128 blocks)
        dy = torch.randn(M, N, device="cuda")
        dq, ds = K_.quantize_act(dy)
        dtq, dts = K_.quantize_act_t(dy)
        xtq, xts = K_.quantize_act_t(x)
        refs = dict(fwd=K_.fp8_gemm_ref(xq, xs, wq, ws, torch.float32),
                    dgrad=K_.fp8_gemm_dgrad_ref(dq, ds, wq, ws, torch.float32),
                    wgrad=K_.fp8_gemm_wgrad_ref(dtq, dts, xtq, xts))  # fmt: skip
        args = dict(fwd=(xq, xs, wq, ws, True), dgrad=(dq, ds, wqt, ws.t().contiguous(), True),
                    wgrad=(dtq, dts, xtq, xts, False))  # fmt: skip
        for kind, a in args.items():
            if not GLM.can_use_gluon(a[0], a[2]):
                log(f"skip {kind} {(M, N, K)}: operand rows not 16-byte aligned (no TMA)")
                continue
            yt = G._launch(*a, torch.float32, use_tma=True)  # the Triton TMA kernel: its fp32 error, for scale
            log(f"{kind} {(M, N, K)} triton TMA fp32 err {rel(yt, refs[kind]):.2e}")
            for od in (torch.bfloat16, torch.float32):
                for c in cfgs:
                    y = torch.full((a[0].shape[0], a[2].shape[0]), float("nan"), device="cuda", dtype=od)
                    GLM.launch_gluon(*a, od, config=c, out=y)
                    torch.cuda.synchronize()
                    e = rel(y, refs[kind])
                    bad = bool(y.isnan().any())
                    worst = max(worst, e if od == torch.float32 else 0.0)
                    if bad or not e < (5e-4 if od == torch.float32 else 4e-3):
                        log(f"WRONG {kind} {(M, N, K)} {od} {c}: err {e:.2e} nan {bad}")
            log(f"checked {kind} {(M, N, K)}: last err {e:.2e}")
    log(f"correctness done; worst fp32 err {worst:.2e}")
    if os.environ.get("BENCH_GLUON_CHECK_ONLY"):
        return

    rows = []
    for M in (4096, 16384):
        for N, K in SHAPES:
            fl = 2 * M * N * K
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
            xq, xs = K_.quantize_act(x)
            wq, ws = K_.quantize_weight(w)
            wqt = wq.t().contiguous()
            ref = K_.fp8_gemm_ref(xq, xs, wq, ws, torch.float32)
            r = dict(M=M, N=N, K=K)
            for c in cfgs:
                y = GLM.launch_gluon(xq, xs, wq, ws, True, torch.bfloat16, config=c)
                r[f"err_gluon_{c}"] = rel(y, ref)
                r[f"gluon_{c}"] = (
                    fl / ms(lambda: GLM.launch_gluon(xq, xs, wq, ws, True, torch.bfloat16, config=c)) / 1e9
                )
            best = max(cfgs, key=lambda c: r[f"gluon_{c}"])
            r["gluon"], r["gluon_cfg"], r["err_gluon"] = r[f"gluon_{best}"], best, r[f"err_gluon_{best}"]
            r["err_triton"] = rel(G._launch(xq, xs, wq, ws, True, torch.bfloat16, use_tma=True), ref)
            r["triton_tma"] = fl / ms(lambda: G._launch(xq, xs, wq, ws, True, torch.bfloat16, use_tma=True)) / 1e9
            r["bf16"] = fl / ms(lambda: x @ w.t()) / 1e9
            a8, b8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
            sa, sb = torch.ones(M, 1, device="cuda"), torch.ones(1, N, device="cuda")
            try:
                r["mm_rowwise"] = fl / ms(lambda: torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb,
                                                                   out_dtype=torch.bfloat16)) / 1e9  # fmt: skip
            except Exception as e:
                r["mm_rowwise"] = f"n/a: {type(e).__name__}: {str(e)[:150]}"
            fn, how = scaled_mm_blockwise_fn(xq, xs, wq, ws)
            if fn is None:
                r["mm_blockwise"] = "n/a: " + how
            else:
                r["mm_blockwise_layout"] = how
                r["err_mm_blockwise"] = rel(fn(), ref)
                r["mm_blockwise"] = fl / ms(fn) / 1e9
            del a8, b8, ref
            # dgrad dx[M, K] = dy[M, N] W and wgrad dW[N, K] = dy^T x (fp32 out), at M = 4096 only
            if M == 4096:
                dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
                dq, ds = K_.quantize_act(dy)
                dtq, dts = K_.quantize_act_t(dy)
                xtq, xts = K_.quantize_act_t(x)
                wst = ws.t().contiguous()
                dref = K_.fp8_gemm_dgrad_ref(dq, ds, wq, ws, torch.float32)
                wref = K_.fp8_gemm_wgrad_ref(dtq, dts, xtq, xts)
                for tag, a, od, rf in [("dgrad", (dq, ds, wqt, wst, True), torch.bfloat16, dref),
                                       ("wgrad", (dtq, dts, xtq, xts, False), torch.float32, wref)]:  # fmt: skip
                    r[f"{tag}_triton"] = fl / ms(lambda: G._launch(*a, od, use_tma=True)) / 1e9
                    r[f"err_{tag}_triton"] = rel(G._launch(*a, od, use_tma=True), rf)
                    for c in cfgs:
                        r[f"{tag}_gluon_{c}"] = fl / ms(lambda: GLM.launch_gluon(*a, od, config=c)) / 1e9
                        r[f"err_{tag}_gluon_{c}"] = rel(GLM.launch_gluon(*a, od, config=c), rf)
                del dy, dq, dtq, xtq, dref, wref
            rows.append(r)
            log(json.dumps({k: round(v, 6) if isinstance(v, float) and v < 1 else round(v, 1) if isinstance(v, float)
                            else v for k, v in r.items()}))  # fmt: skip
            del x, w, xq, wq, wqt
            torch.cuda.empty_cache()
    out["rows"] = rows
    nan = float("nan")
    num = lambda v: v if isinstance(v, float) else nan
    log("\n| M | N | K | gluon | triton TMA | cuBLAS bf16 | _scaled_mm rowwise | _scaled_mm blockwise | "
        "gluon/bf16 | err gluon | err triton | err blockwise | gluon cfg |")  # fmt: skip
    log("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        log(f"| {r['M']} | {r['N']} | {r['K']} | {r['gluon']:.0f} | {r['triton_tma']:.0f} | {r['bf16']:.0f} | "
            f"{num(r['mm_rowwise']):.0f} | {num(r['mm_blockwise']):.0f} | {r['gluon'] / r['bf16']:.2f} | "
            f"{r['err_gluon']:.1e} | {r['err_triton']:.1e} | {num(r.get('err_mm_blockwise')):.1e} | {r['gluon_cfg']} |")  # fmt: skip
    log("\nbackward at M=4096 (dgrad bf16 out, wgrad fp32 out): triton TMA vs gluon per config")
    for r in rows:
        if "dgrad_triton" in r:
            for tag in ("dgrad", "wgrad"):
                log(f"{tag} N={r['N']} K={r['K']}: triton {r[tag + '_triton']:.0f} | " + " ".join(
                    f"{c}={r[f'{tag}_gluon_{c}']:.0f}(err {r[f'err_{tag}_gluon_{c}']:.0e})" for c in cfgs))  # fmt: skip
            # the configurations built for wgrad (B per row; GLM.WGRAD_CONFIGS), best one against Triton
            wc = [c for c in getattr(GLM, "WGRAD_CONFIGS", ()) if c in cfgs]
            if wc:
                best = max(wc, key=lambda c: r[f"wgrad_gluon_{c}"])
                log(f"wgrad N={r['N']} K={r['K']}: best of WGRAD_CONFIGS {best} {r[f'wgrad_gluon_{best}']:.0f} = "
                    f"{r[f'wgrad_gluon_{best}'] / r['wgrad_triton']:.2f}x triton")  # fmt: skip
    for r in rows:
        for k in ("mm_rowwise", "mm_blockwise"):
            if isinstance(r.get(k), str):
                log(f"{k} M={r['M']} N={r['N']}: {r[k]}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gluon.json").write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    if "--linear" in sys.argv:
        import importlib

        linear_bench("cuda", False, importlib.import_module(K_.fp8_gemm.__module__),
                     importlib.import_module(K_.quantize_act.__module__))  # fmt: skip
    elif "--gluon" in sys.argv:
        gluon_bench()
    elif "--sweep" in sys.argv:
        sweep()
    else:
        main()
