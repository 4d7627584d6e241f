"""Fast decoding on one GPU, side by side in one process: transformers' built-in DeepseekV3ForCausalLM.generate,
our plain generate, and our fast_greedy_generate (static latent cache + CUDA graph + the Triton MLA kernel); then
the MLA decode kernel alone vs the torch absorbed path, as bandwidth against a device-to-device copy; then the
latent cache's bytes per token vs the expanded K/V's, from torch.cuda.max_memory_allocated.

The model is benchmarks/bench_model_gpu.py's shape (deepseek-v3-small, vocab 32000, no MTP: the built-in has none).

    PYTHONPATH=. python benchmarks/bench_decode.py                 # writes $OUT/bench_decode.json if OUT is set
    PYTHONPATH=. python benchmarks/bench_decode.py --skip-models   # kernel and memory sections only
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import torch
import transformers
from bench_model_gpu import SHAPE  # benchmarks/ is the script's folder, so it is on sys.path
from bench_model_gpu import build as build_train_model
from modeling_deepseek_v3.kernels import mla_decode, mla_decode_ref
from modeling_deepseek_v3.kernels.mla_decode import default_config, latent_cache_bytes

from modeling_deepseek_v3.fast_decode import StaticLatentCache, fast_greedy_generate

NEW_TOKENS = 128
CASES = ((1, 512), (16, 4096))
# Kernel shapes (B, T, H, R, r): the small model's heads, and the 671B head shape.
KERNEL_SHAPES = {"671b_h128": (64, 8192, 128, 512, 64), "small_h16": (64, 8192, 16, 256, 32)}
# Sweep rows: (block_h, block_t, num_warps, num_stages, split_scores, tma, prefetch); None = default_config.
TILE_KEYS = ("block_h", "block_t", "num_warps", "num_stages", "split_scores", "tma", "prefetch")
TILES = {
    "small_h16": [None, (16, 128, 4, 3, False, False, 1), (16, 128, 4, 3, False, False, 2),
                  (16, 128, 4, 3, False, False, 4), (16, 64, 4, 4, False, False, 2), (16, 128, 8, 3, False, True, 1),
                  (16, 256, 8, 2, False, False, 1)],
    "671b_h128": [None,
                  (64, 64, 8, 2, False, False, 0),  # the previous default: both warpgroups compute all scores
                  (64, 64, 8, 2, True, False, 0), (64, 64, 8, 2, True, False, 1), (64, 64, 8, 2, True, False, 2),
                  (64, 64, 8, 2, True, False, 4), (64, 64, 8, 2, True, True, 1),
                  (64, 128, 8, 1, True, True, 0), (64, 128, 8, 1, True, True, 1), (64, 128, 8, 1, True, True, 2),
                  (64, 128, 8, 1, True, False, 1), (64, 32, 8, 4, True, False, 2), (64, 32, 8, 4, True, True, 4)],
}  # fmt: skip
SPLITS = {"small_h16": [2, 4], "671b_h128": [1, 2]}


def build(kind: str):
    """The same model as bench_model_gpu.py's (the anchors' shape), in eval mode."""
    return build_train_model(kind).eval()


def timed(fn) -> tuple[object, float]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - t0


@torch.no_grad()
def decode_rates(model, kind: str, batch: int, context: int) -> tuple[dict, dict]:
    g = torch.Generator(device="cuda").manual_seed(batch)
    prompt = torch.randint(2, SHAPE["vocab_size"], (batch, context), device="cuda", generator=g)
    mask = torch.ones_like(prompt)
    runs = {
        "generate": lambda n: model.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                             do_sample=False),
    }  # fmt: skip
    if kind == "ours":
        # eos_token_id=[]: never stop early, as min_new_tokens does for generate().
        runs["fast_graph_triton"] = lambda n: fast_greedy_generate(model, prompt, mask, n, eos_token_id=[])
        runs["fast_graph_torch_absorbed"] = lambda n: fast_greedy_generate(
            model, prompt, mask, n, eos_token_id=[], mla_implementation="auto"
        )
    results, outputs = {}, {}
    for name, run in runs.items():
        run(8)  # warm-up: kernels compiled, allocator and cuBLAS ready
        _, dt8 = timed(lambda run=run: run(8))
        torch.cuda.reset_peak_memory_stats()
        out, dt = timed(lambda run=run: run(NEW_TOKENS))
        outputs[name] = out
        n_new = out.shape[1] - context
        results[name] = dict(new_tokens_per_s=batch * n_new / dt, seconds=dt,
                             peak_GiB=torch.cuda.max_memory_allocated() / 2**30,
                             ms_per_step=(dt - dt8) / (NEW_TOKENS - 8) * 1e3)  # fmt: skip
        print(kind, name, f"bs{batch} ctx{context}", json.dumps(results[name]), flush=True)
    # Prefill alone (included in every rate above): one forward over the prompt.
    _, dt = timed(lambda: model(prompt, attention_mask=mask, use_cache=True, logits_to_keep=1))
    results["prefill_seconds"] = dt
    return results, outputs


def token_agreement(a: torch.Tensor, b: torch.Tensor, context: int) -> float:
    """Fraction of new-token positions before which the two runs agree entirely (bf16 near-ties may flip one)."""
    a, b = a[:, context:], b[:, context:]
    n = min(a.shape[1], b.shape[1])
    same_prefix = (a[:, :n] == b[:, :n]).long().cumprod(dim=1)
    return same_prefix.float().mean().item()


def models_section(results: dict) -> None:
    outputs = {}
    for kind in ("builtin", "ours"):
        model = build(kind)
        for batch, context in CASES:
            key = f"bs{batch}_ctx{context}"
            try:
                r, outs = decode_rates(model, kind, batch, context)
                results.setdefault(key, {})[kind] = r
                outputs[(kind, key)] = outs
            except Exception:
                traceback.print_exc()
        del model
        torch.cuda.empty_cache()
    for batch, context in CASES:
        key = f"bs{batch}_ctx{context}"
        r = results.get(key, {})
        if "builtin" not in r or "ours" not in r:
            continue
        base = r["builtin"]["generate"]["new_tokens_per_s"]
        r["speedup_over_builtin"] = {name: v["new_tokens_per_s"] / base for name, v in r["ours"].items()
                                     if isinstance(v, dict)}  # fmt: skip
        ours = outputs[("ours", key)]
        r["token_agreement_with_our_generate"] = {
            name: token_agreement(ours["generate"], out, context) for name, out in ours.items() if name != "generate"
        }
        print(key, "speedup", json.dumps(r["speedup_over_builtin"]), "agreement",
              json.dumps(r["token_agreement_with_our_generate"]), flush=True)  # fmt: skip


def torch_absorbed_core(q_lat, q_pe, c_kv, k_pe, scale):
    """DSV3Attention._absorbed's attention core for one query token (the einsums between W_UK and W_UV)."""
    scores = torch.einsum("bhr,btr->bht", q_lat, c_kv)
    scores = (scores + torch.einsum("bhr,btr->bht", q_pe, k_pe)).float() * scale
    probs = scores.softmax(-1).to(c_kv.dtype)
    return torch.einsum("bht,btr->bhr", probs, c_kv)


def kernel_section(results: dict) -> None:
    from triton.testing import do_bench

    # Device-to-device copy of 1 GiB: bandwidth counts the bytes read plus the bytes written.
    src = torch.empty(2**29, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200)  # noqa: F821
    copy_bw = 2 * src.numel() * 2 / (ms * 1e-3) / 1e12
    del src, dst
    results["copy_TBps_read_plus_write"] = copy_bw
    print(f"d2d copy: {copy_bw:.2f} TB/s (read + write)", flush=True)
    for name, shape in KERNEL_SHAPES.items():
        results[f"kernel_{name}"] = kernel_shape(name, *shape, copy_bw)
        torch.cuda.empty_cache()
        if os.environ.get("OUT"):  # after each shape: a timeout keeps what was measured
            with open(os.path.join(os.environ["OUT"], "bench_decode.json"), "w") as f:
                json.dump(results, f, indent=1, default=str)


def check_config(H: int, R: int, r: int, kw: dict) -> float:
    """Relative error vs mla_decode_ref on fresh random inputs: odd T, lengths that end inside a tile, a hole,
    left padding, and a row with nothing valid (must be zeros); the split count of the timed row."""
    B, T = 4, 2999
    q = torch.randn(B, H, R, device="cuda", dtype=torch.bfloat16)
    qp = torch.randn(B, H, r, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(B, T, R, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, T, r, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
    mask[1, :1000] = False
    mask[0, 500:777] = False
    mask[3] = False
    lengths = torch.tensor([T, 2500, 37, T], device="cuda", dtype=torch.int32)
    out = mla_decode(q, qp, c, k, 0.07, lengths=lengths, mask=mask, **kw)
    ref = mla_decode_ref(q, qp, c, k, 0.07, lengths=lengths, mask=mask)
    if out.isnan().any() or not torch.equal(out[3], torch.zeros_like(out[3])):
        return float("nan")
    return ((out[:3].float() - ref[:3].float()).norm() / ref[:3].float().norm()).item()


def kernel_shape(name: str, B: int, T: int, H: int, R: int, r: int, copy_bw: float) -> dict:
    """Timed inside a CUDA graph (triton.testing.do_bench_cudagraph), as in the decode step: no launch overhead.
    Every sweep row is first checked against the reference (check_config); a row that fails is not timed."""
    from triton.testing import do_bench_cudagraph

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, R, device="cuda", dtype=torch.bfloat16, generator=g)
    qp = torch.randn(B, H, r, device="cuda", dtype=torch.bfloat16, generator=g)
    c = torch.randn(B, T, R, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, T, r, device="cuda", dtype=torch.bfloat16, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
    lengths = torch.full((B,), T, dtype=torch.int32, device="cuda")
    scale = 192**-0.5
    nbytes = latent_cache_bytes(B, T, R, r, torch.bfloat16)
    flops = B * T * H * (2 * (R + r) + 2 * R)  # q.[c;k_pe] and p.c per head and position
    entry = {"shape_B_T_H_R_r": [B, T, H, R, r], "cache_MB": nbytes / 1e6, "GFLOP": flops / 1e9,
             "default": default_config(B, H, T, R, c.device)}  # fmt: skip
    ref = mla_decode_ref(q[:4], qp[:4], c[:4], k[:4], scale)
    out = mla_decode(q[:4], qp[:4], c[:4], k[:4], scale)
    entry["rel_err_vs_ref"] = ((out.float() - ref.float()).norm() / ref.float().norm()).item()

    def measure(label, fn, kw=None) -> dict:
        res = {"config": label}
        try:
            if kw is not None:
                res["rel_err"] = check_config(H, R, r, kw)
                if not res["rel_err"] < 1e-2:  # bf16 output: ~3e-3 expected; NaN fails too
                    print(name, label, "WRONG", res["rel_err"], flush=True)
                    return res
            ms = do_bench_cudagraph(fn, rep=30)
        except Exception as e:  # e.g. out of shared memory for a tile choice
            res["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(name, label, res["error"], flush=True)
            return res
        bw = nbytes / (ms * 1e-3) / 1e12
        res.update(us=ms * 1e3, TBps=bw, frac_of_copy=bw / copy_bw, TFLOPS=flops / ms / 1e9)
        print(name, label, f"{ms * 1e3:.1f} us {bw:.2f} TB/s ({bw / copy_bw:.0%} of copy) {res['TFLOPS']:.0f} TFLOPS",
              res.get("rel_err", ""), flush=True)  # fmt: skip
        return res

    def kwargs(cfg):
        return {} if cfg is None else dict(zip(TILE_KEYS, cfg, strict=True))

    sweep = []
    for cfg in TILES[name]:
        kw = kwargs(cfg)
        sweep.append(measure(cfg, lambda kw=kw: mla_decode(q, qp, c, k, scale, **kw), kw))
    best_tile = max((s for s in sweep if "TBps" in s), key=lambda s: s["TBps"])["config"]
    for ns in SPLITS[name]:
        kw = dict(kwargs(best_tile), num_splits=ns)
        sweep.append(measure([best_tile, f"splits={ns}"], lambda kw=kw: mla_decode(q, qp, c, k, scale, **kw), kw))
    entry["sweep"] = sweep
    entry["best"] = max((s for s in sweep if "TBps" in s), key=lambda s: s["TBps"])
    entry["default_repeat"] = measure("default (again)", lambda: mla_decode(q, qp, c, k, scale))
    entry["default_with_mask"] = measure("default+mask", lambda: mla_decode(q, qp, c, k, scale, mask=mask))
    entry["default_with_lengths"] = measure("default+lengths", lambda: mla_decode(q, qp, c, k, scale, lengths=lengths))
    try:
        entry["torch_absorbed"] = measure("torch_absorbed", lambda: torch_absorbed_core(q, qp, c, k, scale))
    except torch.OutOfMemoryError:
        entry["torch_absorbed"] = "out of memory"
    print(name, json.dumps({k: v for k, v in entry.items() if k != "sweep"}), flush=True)
    return entry


def kernel_table(results: dict) -> None:
    """The compact table printed last: every sweep row of every shape."""
    print("\nshape | config | us | TB/s | % copy | TFLOPS | rel_err")
    for key, entry in results.items():
        if not key.startswith("kernel_") or not isinstance(entry, dict):
            continue
        rows = entry["sweep"] + [entry[k] for k in ("default_repeat", "default_with_mask", "default_with_lengths",
                                                     "torch_absorbed") if isinstance(entry.get(k), dict)]  # fmt: skip
        for s in rows:
            if "us" in s:
                print(f"{key[7:]} | {s['config']} | {s['us']:.1f} | {s['TBps']:.2f} | {s['frac_of_copy']:.0%} | "
                      f"{s['TFLOPS']:.0f} | {s.get('rel_err', '')}")  # fmt: skip
            else:
                print(f"{key[7:]} | {s['config']} | {s.get('error', 'WRONG')} | rel_err {s.get('rel_err', '')}")


def memory_section(results: dict) -> None:
    """Bytes per token per layer of the latent cache vs the expanded per-head K/V (what the built-in caches)."""
    shapes = {"small": (16, 4096, 16, 256, 32, 96, 64), "671b": (1, 8192, 128, 512, 64, 192, 128)}
    for name, (B, T, H, R, r, dqk, dv) in shapes.items():
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        cache = StaticLatentCache(1, B, T, R, r, torch.bfloat16, "cuda")
        latent = (torch.cuda.max_memory_allocated() - base) / (B * T)
        del cache
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        kv = (torch.empty(B, H, T, dqk, dtype=torch.bfloat16, device="cuda"),
              torch.empty(B, H, T, dv, dtype=torch.bfloat16, device="cuda"))  # fmt: skip
        expanded = (torch.cuda.max_memory_allocated() - base) / (B * T)
        del kv
        results[f"cache_bytes_per_token_per_layer_{name}"] = {
            "latent": latent, "expected_latent": (R + r) * 2, "expanded_kv": expanded, "ratio": expanded / latent,
        }  # fmt: skip
        print("memory", name, json.dumps(results[f"cache_bytes_per_token_per_layer_{name}"]), flush=True)


@torch.no_grad()
def profile_section(results: dict) -> None:
    """Top kernels of 32 graph-replayed decode steps (bs1, ctx 512): where a step's GPU time goes."""
    from torch.profiler import ProfilerActivity, profile

    model = build("ours")
    prompt = torch.randint(2, SHAPE["vocab_size"], (1, 512), device="cuda")
    fast_greedy_generate(model, prompt, None, 8, eos_token_id=[])
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fast_greedy_generate(model, prompt, None, 33, eos_token_id=[])
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
    print(table, flush=True)
    results["profile_bs1_top_kernels"] = table
    del model
    torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--skip-models", action="store_true")
    p.add_argument("--skip-kernel", action="store_true")
    args = p.parse_args()
    import triton

    print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__,
          torch.cuda.get_device_name(), flush=True)  # fmt: skip
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                     "transformers": transformers.__version__}  # fmt: skip
    for section, skip in (
        (kernel_section, args.skip_kernel),
        (memory_section, False),
        (models_section, args.skip_models),
        (profile_section, args.skip_models),
    ):
        if skip:
            continue
        try:
            section(results)
        except Exception:
            traceback.print_exc()
        if os.environ.get("OUT"):  # after every section: a timeout keeps what was measured
            with open(os.path.join(os.environ["OUT"], "bench_decode.json"), "w") as f:
                json.dump(results, f, indent=1, default=str)
    print("RESULTS", json.dumps(results, default=str), flush=True)
    kernel_table(results)


if __name__ == "__main__":
    main()
