"""One DeepSeek-V3-size MoE layer (hidden 7168, 256 routed experts top-8 in 8 groups of which 4 kept, one shared
expert, width 2048), 8192 tokens, bf16: transformers' built-in DeepseekV3MoE (grouped_mm) vs ours with
`grouped_mm` and with FP8 experts, forward and forward+backward, in one process. TFLOPS count the routed and
shared expert GEMMs only (the anchor's convention: 2 * T * 3 * D * F * (top-k + shared)).

    PYTHONPATH=. python benchmarks/bench_moe_layer.py      # writes $OUT/bench_moe_layer.json when OUT is set
    PYTHONPATH=. python benchmarks/bench_moe_layer.py --compile   # each layer under torch.compile
    PYTHONPATH=. python benchmarks/bench_moe_layer.py --profile   # + every kernel of one fwd+bwd, $OUT/moe_profile_*.txt
    BENCH_KINDS=fp8,fp8_cached PYTHONPATH=. python benchmarks/bench_moe_layer.py   # the built-in and these only
    BENCH_REP_MS=2000 PYTHONPATH=. python benchmarks/bench_moe_layer.py   # ~30 runs a median (default window 200 ms)
"""

# ruff: noqa: B023, F821  (lambdas are timed inside their own loop iteration; names are deleted only after)
from __future__ import annotations

import importlib
import json
import os

import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from triton.testing import do_bench

from modeling_deepseek_v3 import DSV3Config
from modeling_deepseek_v3.modeling_dsv3 import DSV3MoE

T, D, F, E, K = 8192, 7168, 2048, 256, 8
FLOP_FWD = 2 * T * 3 * D * F * (K + 1)
# do_bench windows (ms): a median of at least three runs of the built-in's 65 ms forward+backward. Before session 14
# the forward+backward window was 10 ms, a single run each (their spread between identical runs: 1-3 ms).
# BENCH_REP_MS=2000: about 30 runs each, timed in the GPU's sustained (power-capped) state.
WARMUP_MS, REP_MS = 50, int(os.environ.get("BENCH_REP_MS", 200))


def layer(kind: str) -> torch.nn.Module:
    shape = dict(hidden_size=D, moe_intermediate_size=F, n_routed_experts=E, num_experts_per_tok=K, n_group=8,
                 topk_group=4, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True)  # fmt: skip
    # Built on the GPU in bf16 (11.3G parameters: a float32 CPU build and init takes minutes); every
    # parameter is re-drawn below and then copied from the first variant anyway.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            if kind == "builtin":
                cfg = DeepseekV3Config(**shape)
                cfg._experts_implementation = "grouped_mm"
                moe = DeepseekV3MoE(cfg)
            else:
                fp8 = kind.startswith("fp8")
                moe = DSV3MoE(DSV3Config(**shape, seq_aux_loss_alpha=0.0, moe_implementation="fp8" if fp8 else kind,
                                         linear_implementation="fp8" if fp8 else "torch",
                                         fp8_weight_cache=kind == "fp8_cached"))  # fmt: skip
    finally:
        torch.set_default_dtype(default_dtype)
    moe = moe.to("cuda", torch.bfloat16)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    moe.gate.e_score_correction_bias.zero_()
    return moe


def main(compile_layer: bool = False, profile: bool = False) -> None:
    """compile_layer: every variant (the built-in too) under torch.compile's default mode, as training runs them
    (compile_layers); the unfused row is then left out (those kernels run in eager mode only).
    profile: one more forward+backward of each variant under torch.profiler, after the timed ones: the top kernels
    printed, all of them in $OUT/moe_profile_<variant>.txt."""
    torch.manual_seed(0)
    results = {}
    x = torch.randn(1, T, D, device="cuda", dtype=torch.bfloat16)
    # The output gradient of the forward+backward: random, as a loss gives it. Until session 15 it came from
    # `out.sum()`: all ones, broadcast (the backward first copied it out), each row of the experts' dy one value.
    grad_out = torch.randn(1, T, D, device="cuda", dtype=torch.bfloat16)
    reference = None
    # fp8_cached: the FP8 layer with config.fp8_weight_cache, whose repeated calls reuse the quantised weights as
    # gradient-accumulation micro-batches after the first do (eager only: under torch.compile it quantises each call).
    kinds = ("builtin", "grouped_mm", "fp8") + (() if compile_layer else ("fp8_cached",))
    if os.environ.get("BENCH_KINDS"):  # e.g. BENCH_KINDS=fp8_cached: the built-in (the reference) and those only
        kinds = ("builtin", *(k for k in kinds[1:] if k in os.environ["BENCH_KINDS"].split(",")))
    for kind in kinds:
        moe = layer(kind)
        if reference is None:
            state = moe.state_dict()  # same weights for every variant
        else:
            moe.load_state_dict(state)
        if compile_layer:
            moe = torch.compile(moe)

        def run(moe=moe, kind=kind):
            return moe(x)[0] if kind != "builtin" else moe(x)  # ours also returns router stats

        with torch.no_grad():
            y = run().float()
            reference = y if reference is None else reference
            err = ((y - reference).norm() / reference.norm()).item()
            fwd = do_bench(run, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")
        xg = x.clone().requires_grad_()

        def fwd_bwd(moe=moe, kind=kind, xg=xg):
            out = moe(xg)
            (out[0] if kind != "builtin" else out).backward(grad_out)

        def time_fwd_bwd(fwd_bwd=fwd_bwd, xg=xg, moe=moe) -> float:  # ms, median; fresh gradients each run
            return do_bench(fwd_bwd, warmup=WARMUP_MS, rep=REP_MS, return_mode="median",
                            grad_to_none=[xg, *moe.parameters()])  # fmt: skip

        fb = time_fwd_bwd()
        results[kind] = dict(fwd_ms=fwd, fwd_tflops=FLOP_FWD / fwd / 1e9, fwdbwd_ms=fb,
                             fwdbwd_tflops=3 * FLOP_FWD / fb / 1e9, rel_err_vs_builtin=err)  # fmt: skip
        if profile:
            for t in (xg, *moe.parameters()):  # as do_bench's grad_to_none: no gradient accumulation in the profile
                t.grad = None
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                fwd_bwd()
                torch.cuda.synchronize()
            averages = prof.key_averages()
            print(averages.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=70), flush=True)
            if os.environ.get("OUT"):
                table = averages.table(sort_by="self_cuda_time_total", row_limit=-1, max_name_column_width=110)
                suffix = "_compiled" if compile_layer else ""
                with open(os.path.join(os.environ["OUT"], f"moe_profile_{kind}{suffix}.txt"), "w") as f:
                    f.write(table)
        if kind.startswith("fp8") and not compile_layer:
            # The eager FP8 layer without session 10's kernels: SwiGLU as torch ops and the routing weights' gradient as
            # per-slot torch code, instead of kernels/swiglu.py and topk_sum.slot_dots (the defaults).
            FL = importlib.import_module("modeling_deepseek_v3.kernels.fp8_linear")
            TS = importlib.import_module("modeling_deepseek_v3.kernels.topk_sum")
            # _gated takes its torch branch for any act other than F.silu itself, so a wrapper of F.silu selects it.
            gated = FL._gated
            FL._gated = lambda h, act: gated(h, lambda t: act(t))
            TS.SLOT_DOTS_KERNEL = False
            try:
                fb = time_fwd_bwd()
            finally:
                FL._gated, TS.SLOT_DOTS_KERNEL = gated, True
            results[kind]["fwdbwd_ms_unfused_swiglu_and_slot_dots"] = fb
            # The routed experts' weight gradient on the Triton grouped wgrad instead of the Gluon one.
            GL = importlib.import_module("modeling_deepseek_v3.kernels.fp8_gemm_gluon")
            GL.GROUPED_WGRAD_GLUON = False
            try:
                fb = time_fwd_bwd()
            finally:
                GL.GROUPED_WGRAD_GLUON = True
            results[kind]["fwdbwd_ms_triton_grouped_wgrad"] = fb
            # The experts' forward and dgrad on the cooperative Gluon kernel (128x128s4) and on the two-consumer one
            # (128x128h2, the default), interleaved twice (drift shows as a spread).
            default = GL.GROUPED_DEFAULT_CONFIG
            for _ in range(2):
                for config in ("128x128s4", "128x128h2"):
                    GL.GROUPED_DEFAULT_CONFIG = config
                    try:
                        fb = time_fwd_bwd()
                    finally:
                        GL.GROUPED_DEFAULT_CONFIG = default
                    results[kind].setdefault(f"fwdbwd_ms_grouped_{config}", []).append(fb)
        print(kind, json.dumps(results[kind]), flush=True)
        moe = None
        torch.cuda.empty_cache()
    for kind in kinds[1:]:
        results[kind]["fwdbwd_speedup_vs_builtin"] = results["builtin"]["fwdbwd_ms"] / results[kind]["fwdbwd_ms"]
    print("speedups", json.dumps({k: results[k]["fwdbwd_speedup_vs_builtin"] for k in kinds[1:]}))
    if os.environ.get("OUT"):
        name = "bench_moe_layer_compiled.json" if compile_layer else "bench_moe_layer.json"
        with open(os.path.join(os.environ["OUT"], name), "w") as f:
            json.dump(results, f, indent=1)


def kernels_table() -> None:
    """The grouped FP8 GEMMs of this layer alone (8192 tokens x top-8 over 256 experts, random routing): the
    TMA kernels vs the pointer kernels they replace, checked against each other first; forward and dgrad also
    through the Gluon grouped kernel (on Hopper only), checked against the fp32 reference."""
    import importlib
    import sys

    from modeling_deepseek_v3 import kernels as K_

    GG = importlib.import_module(K_.fp8_grouped_gemm.__module__)
    torch.manual_seed(0)
    idx = torch.rand(T, E, device="cuda").topk(K, dim=1).indices
    offs = torch.bincount(idx.flatten(), minlength=E).cumsum(0).to(torch.int32)
    S = T * K
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    ms = lambda f: do_bench(f, warmup=5, rep=40, return_mode="median")  # noqa: E731
    table = {}
    for name, N, Kd in [("gate_up", 2 * F, D), ("down", D, F)]:
        fl = 2 * S * N * Kd
        x = torch.randn(S, Kd, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(S, N, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(E, N, Kd, device="cuda", dtype=torch.bfloat16) * 0.02
        xq, xs = K_.quantize_act(x)
        wq, ws, wqt = K_.quantize_weight(w, transposed=True)
        t_q = ms(lambda: K_.quantize_weight(w))
        t_qt = ms(lambda: K_.quantize_weight(w, transposed=True))
        del w
        dq, dsc = K_.quantize_act(dy)
        dtq, dts = K_.quantize_act_t(dy)
        xtq, xts = K_.quantize_act_t(x)
        wst = ws.transpose(1, 2).contiguous()
        r = dict(quant_weight_ms=t_q, quant_weight_plus_T_ms=t_qt)
        for tag, f_new, f_old in [
            ("fwd", lambda: GG._grouped_launch(xq, xs, wq, ws, offs, torch.bfloat16, use_tma=True),
             lambda: GG._grouped_launch(xq, xs, wq, ws, offs, torch.bfloat16, use_tma=False)),
            ("dgrad", lambda: GG._grouped_launch(dq, dsc, wqt, wst, offs, torch.bfloat16, use_tma=True),
             lambda: GG._grouped_launch(dq, dsc, wqt, wst, offs, torch.bfloat16, use_tma=False)),
            ("wgrad", lambda: K_.fp8_grouped_gemm_wgrad(dtq, dts, xtq, xts, offs, torch.bfloat16, use_tma=True),
             lambda: K_.fp8_grouped_gemm_wgrad(dtq, dts, xtq, xts, offs, torch.bfloat16, use_tma=False)),
        ]:  # fmt: skip
            r[f"{tag}_rel_diff_new_vs_old"] = rel(f_new(), f_old())
            r[f"{tag}_tflops_new"] = fl / ms(f_new) / 1e9
            r[f"{tag}_tflops_old"] = fl / ms(f_old) / 1e9
        # The Gluon grouped kernel (fp8_gemm_gluon.launch_gluon_grouped, what fp8_grouped_gemm dispatches to on
        # Hopper) at the same sizes, each configuration, errors of it and of the Triton TMA kernel vs the fp32
        # reference; only where Gluon runs.
        GLm = importlib.import_module("modeling_deepseek_v3.kernels.fp8_gemm_gluon")
        if GLm.can_use_gluon(xq, dq):
            for tag, a, a_s, b, b_s_fn, ref_fn, f_triton in [
                ("fwd", xq, xs, wq, lambda: ws, K_.fp8_grouped_gemm_ref,
                 lambda: GG._grouped_launch(xq, xs, wq, ws, offs, torch.bfloat16, use_tma=True)),
                ("dgrad", dq, dsc, wqt, lambda: wst, K_.fp8_grouped_gemm_dgrad_ref,
                 lambda: GG._grouped_launch(dq, dsc, wqt, wst, offs, torch.bfloat16, use_tma=True)),
            ]:  # fmt: skip
                ref = ref_fn(a, a_s, wq, ws, offs, torch.float32)
                r[f"{tag}_rel_err_new_vs_ref"] = rel(f_triton(), ref)
                for config in GLm.GROUPED_CONFIGS:
                    f = lambda: GLm.launch_gluon_grouped(a, a_s, b, b_s_fn(), offs, torch.bfloat16, config=config)
                    r[f"{tag}_rel_err_gluon_{config}_vs_ref"] = rel(f(), ref)
                    r[f"{tag}_tflops_gluon_{config}"] = fl / ms(f) / 1e9
                del ref
            del a, a_s, b
        else:
            print(name, "Gluon grouped kernel skipped (needs compute capability 9.0 and triton.experimental.gluon)")
        table[name] = r
        print(name, json.dumps({k: round(v, 5) for k, v in r.items()}), flush=True)
        del x, dy, xq, wq, wqt, dq, dtq, xtq
        torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "moe_kernels.json"), "w") as f:
            json.dump(table, f, indent=1)
    sys.stdout.flush()


if __name__ == "__main__":
    import sys

    if "--kernels" in sys.argv:
        kernels_table()
    else:
        main(compile_layer="--compile" in sys.argv, profile="--profile" in sys.argv)
