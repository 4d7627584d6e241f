"""FP8 quantisation bandwidth vs a device-to-device copy measured in the same run (issue 3), one GPU.

The tile sweep behind quant.py's Gluon defaults (bench_fp8_gemm.py times the shipped kernels once more at
16384 x 7168). Run from the repo root with the package importable:
    PYTHONUNBUFFERED=1 python3 benchmarks/bench_quant.py
1. Bit-exactness: every kernel variant timed below, codes and scales against the CPU torch references
   (quantize_act_ref / quantize_act_t_ref / quantize_weight_ref) at (1024, 7168), (4096, 7168),
   (777, 1000), pow2 on and off; fresh random inputs (never zeros), outputs poisoned first.
2. Bandwidth at (4096, 7168), (16384, 7168) and (16384, 1024) (deepseek-v3-small's training activations) bf16:
   bytes = read M*K*2 + write M*K (+ M*K for the weight's K-major copy, or for the second tiling of the "both"
   row, whose bytes count one read of x though its two kernels read it twice) + fp32 scales; GB/s =
   bytes / median time (triton.testing.do_bench). The copy (x.clone()) counts read + write: 2 * M*K*2 bytes.
Prints one JSON object, then a short table; writes $OUT/quant_bandwidth.json when OUT is set.
"""

# ruff: noqa: B023  (each lambda is timed inside its own loop iteration)
from __future__ import annotations

import json
import os
import time

import torch
from modeling_deepseek_v3.kernels import quant as Q
from triton.testing import do_bench

SHAPES_CHECK = [(1024, 7168), (4096, 7168), (777, 1000)]
SHAPES_TIME = [(4096, 7168), (16384, 7168), (16384, 1024)]
# (name, function of x) for each variant; "before" = the @triton.jit pointer kernels as shipped.
ACT_T_TRITON = [(128, 64, 4)]  # QUANT_TILES['col'] as shipped before
# Gluon: (SPT_M, SPT_K, TPW_M, WARPS_M, WARPS_K), see quant._transpose_layout (the weight's: SPT_N, ...)
ACT_T_GLUON = [
    (16, 8, 8, 1, 4),
    (16, 8, 8, 1, 2),
    (16, 8, 8, 1, 1),
    (16, 4, 8, 1, 4),
    (16, 4, 8, 1, 8),
    (8, 8, 16, 1, 8),
    (8, 8, 8, 2, 4),
    (32, 2, 4, 1, 4),
]
W_T_GLUON = [(16, 8, 8, 1, 4), (8, 8, 8, 2, 4), (16, 4, 8, 1, 8), (8, 8, 16, 1, 8)]


def variants():
    v = {"act": ("act", lambda x, p: Q.quantize_act(x, p))}
    for t in ACT_T_TRITON:
        v[f"act_t triton {t}"] = (
            "act_t",
            lambda x, p, t=t: Q._quant_launch(x, False, True, p, tile=t, impl="triton")[2:],
        )
    for t in ACT_T_GLUON:
        v[f"act_t gluon {t}"] = (
            "act_t",
            lambda x, p, t=t: Q._quant_launch(x, False, True, p, tile=t, impl="gluon")[2:],
        )
    v["act_t default"] = ("act_t", lambda x, p: Q.quantize_act_t(x, p))
    v["weight"] = ("w", lambda x, p: Q.quantize_weight(x, p))
    v["weight_T triton"] = ("w_t", lambda x, p: Q.quantize_weight(x, p, transposed=True, impl="triton"))
    for t in W_T_GLUON:
        v[f"weight_T gluon {t}"] = (
            "w_t",
            lambda x, p, t=t: Q.quantize_weight(x, p, transposed=True, impl="gluon", tile=t),
        )
    v["both (two kernels)"] = ("both", lambda x, p: Q.quantize_act_both(x, p))
    # the shipped @triton.jit kernel once more, last: the spread between the two is the noise
    v["act_t triton (128, 64, 4) again"] = v["act_t triton (128, 64, 4)"]
    v["weight_T default"] = ("w_t", lambda x, p: Q.quantize_weight(x, p, transposed=True))
    return v


def _codes(y):
    return y.view(torch.uint8)


def _rand(shape, seed):
    g = torch.Generator().manual_seed(seed)
    # tiles of very different range along K, plus a sprinkle of values at the e4m3 rounding carries
    x = torch.randn(*shape, generator=g) * torch.logspace(-3, 2, shape[-1])
    return x.to(torch.bfloat16)


def check(vs) -> dict:
    bad, n = [], 0
    for i, (M, K) in enumerate(SHAPES_CHECK):
        for pow2 in (False, True):
            x = _rand((M, K), 100 * i + pow2)
            ref = {
                "act": Q.quantize_act_ref(x, pow2),
                "act_t": Q.quantize_act_t_ref(x, pow2),
                "w": Q.quantize_weight_ref(x, pow2),
            }
            ref["w_t"] = (*ref["w"], ref["w"][0].t().contiguous())
            ref["both"] = (*ref["act"], *ref["act_t"])
            xd = x.cuda()
            for name, (kind, fn) in vs.items():
                torch.cuda.empty_cache()
                torch.cuda.synchronize()
                # poison: the caching allocator hands the freed poisoned block back to the next empty()
                junk = torch.full((M * K * 4 + (1 << 20),), 0x7F, dtype=torch.uint8, device="cuda")
                del junk
                got = fn(xd, pow2)
                torch.cuda.synchronize()
                wrong = [
                    i
                    for i, (g, r) in enumerate(zip(got, ref[kind], strict=True))
                    if not (
                        torch.equal(_codes(g.cpu()), _codes(r))
                        if r.dtype == torch.float8_e4m3fn
                        else torch.equal(g.cpu(), r)
                    )
                ]
                n += 1
                if wrong:
                    bad.append(f"{name} {(M, K)} pow2={pow2} outputs {wrong}")
    return {"checked": n, "mismatches": bad}


def bytes_of(kind, M, K) -> int:
    mb, kb = -(-M // 128), -(-K // 128)
    return {
        "act": M * K * 3 + M * kb * 4,
        "act_t": M * K * 3 + K * mb * 4,
        "both": M * K * 4 + M * kb * 4 + K * mb * 4,  # x read once; both codes written
        "w": M * K * 3 + mb * kb * 4,
        "w_t": M * K * 4 + mb * kb * 4,
    }[kind]


def main() -> None:
    dev = torch.cuda.get_device_name()
    vs = variants()
    out = {"device": dev, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "torch": torch.__version__}
    import triton

    out["triton"] = triton.__version__
    t0 = time.time()
    out["bitexact"] = check(vs)
    out["check_s"] = round(time.time() - t0, 1)
    print(json.dumps(out["bitexact"]), flush=True)
    rows = []
    for M, K in SHAPES_TIME:
        x = (torch.randn(M, K, device="cuda") * torch.logspace(-3, 2, K, device="cuda")).to(torch.bfloat16)
        res = {}
        copy_ms = [do_bench(lambda: x.clone(), warmup=25, rep=100, return_mode="median")]
        for name, (kind, fn) in vs.items():
            ms = do_bench(lambda: fn(x, False), warmup=25, rep=100, return_mode="median")
            res[name] = (ms, bytes_of(kind, M, K) / ms / 1e6)
        copy_ms.append(do_bench(lambda: x.clone(), warmup=25, rep=100, return_mode="median"))
        copy_gbps = 2 * x.numel() * 2 / (sum(copy_ms) / 2) / 1e6  # mean of the first and last copy timing
        out[f"{M}x{K}"] = {
            "copy_ms_first_last": copy_ms,
            "copy_GBps": round(copy_gbps, 1),
            **{
                n: {"us": round(ms * 1e3, 2), "GBps": round(g, 1), "of_copy": round(g / copy_gbps, 3)}
                for n, (ms, g) in res.items()
            },
        }
        rows.append((M, K, copy_gbps, res))
        x = None  # free before the next size
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "quant_bandwidth.json"), "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out), flush=True)
    print(
        f"\n{dev} | bit-exact: {out['bitexact']['checked'] - len(out['bitexact']['mismatches'])}/{out['bitexact']['checked']}"
    )
    for M, K, copy_gbps, res in rows:
        print(f"\n({M}, {K}) bf16 | copy {copy_gbps:.0f} GB/s")
        print("kernel | us | GB/s | % of copy")
        for n, (ms, g) in res.items():
            print(f"{n} | {ms * 1e3:.1f} | {g:.0f} | {g / copy_gbps:.0%}")


if __name__ == "__main__":
    main()
