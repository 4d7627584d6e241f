"""Block-scaled FP8 GEMM for Hopper in Gluon: promotion overlapped with tensor-core work.

Same contract as `fp8_gemm._launch`: C[M, N] = A[M, K] @ B[N, K]^T, e4m3 operands (both K-major),
A scaled per row per 128-K step, B scaled in 128x128 blocks (forward, dgrad) or per row (wgrad);
for each 128-K step, acc += (A_k . B_k^T) * a_s[m, k] * b_s[n, k] in fp32.

Why a second kernel. The plain-Triton kernel writes `acc += dot(a, b) * a_s * b_s`. Triton lowers
that as: issue the wgmma for the step, `wgmma.wait_group 0`, then the scale FMA on the CUDA cores.
While the FMA runs, the tensor cores of that warpgroup have nothing queued, and the warpgroup must
hold both the accumulator and the fresh dot result (64x128 per warpgroup at most). Gluon lets us
write the schedule ourselves:

* Warp specialization (`gl.warp_specialize`). A one-warp producer partition walks the same
  persistent tile sequence as the consumers and keeps a NUM_STAGES ring of [BLOCK_M, 128] and
  [BLOCK_N, 128] e4m3 tiles full with TMA loads, each completing on its slot's `ready` mbarrier.
  It runs ahead across tile boundaries, so the next tile's operands arrive during this tile's
  epilogue. The producer asks for few registers; the consumers get the rest (up to 240 each).
* Software-pipelined wgmma in the consumers (the default partition: BLOCK_M / 16 warps, i.e. one
  or two warpgroups of 64 rows each). Every 128-K step gets a fresh partial product (use_acc=False).
  At step k the consumer issues step k+1's wgmma asynchronously, then
  `warpgroup_mma_wait(num_outstanding=1)` retires step k only, and the promotion
  acc += partial_k * (a_s * b_s) runs on the CUDA cores while the tensor cores work on step k+1
  (SASS: four chained QGMMA.64x128x32 a step, then `WARPGROUP.DEPBAR.LE gsb0, 0x1`, then the FFMAs).
  The freed ring slot goes back to the producer through its `empty` mbarrier (Gluon puts a barrier
  of the consumer warps before that arrive, so both warpgroups are done with the slot).
  Cost: three 64 x BLOCK_N fp32 register tiles a warpgroup (acc + two partials), so BLOCK_N = 128;
  the 128x128 forward kernel uses 222 registers a consumer thread, no spills.
* Two traps, both seen in ptxas's output and fixed here: (1) a loop-carried partial whose wgmma is
  still in flight must never be copied to another register (the loop is unrolled by two so the two
  partials keep fixed registers, and each new wgmma writes over the partial it replaces), else ptxas
  serializes every wgmma (warning C7514); (2) LLVM sinks the promotion FMAs below the next wgmma
  issue, which forces exactly such copies, so `_promote` ends in an empty side-effecting asm that
  pins the FMAs before the next issue.
* Scales: for B in 128x128 blocks, a_s (2 values a thread) and b_s (a scalar: the tile lies in one
  block) are prefetched one step ahead, off the FMA's critical path. Rows and columns past the
  matrix edge are wrapped with % so the scale reads stay in bounds; TMA zero-fills the operands
  there, and the clipped TMA store drops them.
* Epilogue through shared memory and a TMA store that is only waited for at the next tile's
  epilogue, so the store overlaps the next tile's main loop.

Measured on an H200 (see GLUON_CONFIGS below): forward 1019-1209 TFLOPS at M = 4096 on the five V3
shapes (1.35-1.71x cuBLAS bf16, 1.3-1.5x the Triton TMA kernel; cuBLAS's own block-scaled FP8 through
torch._scaled_mm: 1052-1139), dgrad 1036-1168. Not faster: small M (host-bound launches).

The wgrad (B scaled per row too): its scale is a vector over the tile's 128 columns, 32 more registers a
thread. Loaded by the consumers (compactly, then shuffled through shared memory before each step's
promotion: two barriers of the consumer warps a step), it reached only 331-587 TFLOPS in the
configurations that fit the registers (WARPS_N = 2 column-split warpgroups, 128x64 tiles; WGRAD_CONFIGS),
below the Triton kernel's 568-645. With SCALES_TMA (config 128x128s4t) the producer brings both scale
vectors of a step into the ring slot by TMA, on the slot's ready barrier, from the scales transposed to
[Kb, rows] and flattened (a step's vector contiguous, one 1-D box); the consumers read their rows' and
columns' scales from shared memory when they retire the step, before releasing the slot: no scale
pointers held, no global load and no barrier of their own in the loop. On an H200 that took the wgrad to
724-845 TFLOPS on the V3 shapes, 1.13-1.44x the kernel dispatched before (gluon_config's comment).

Grouped variant for the MoE experts (`launch_gluon_grouped`, fp8_grouped_gemm's forward/dgrad contract,
B in 128x128 blocks): the same producer, ring and main loop (`_produce_tile`, `_scaled_mainloop`) over
tiles of one expert's rows (fp8_grouped_gemm._tile_map), with a row-masked epilogue for each expert's
last tile. Dispatched by fp8_grouped_gemm for forward and dgrad from 4096 rows (gluon_grouped_config), in its
two-consumer form (128x128h2, _grouped_split_consumer): each warpgroup its own partition and 64-row half of a tile,
so that a half lying wholly past its expert's last row skips its wgmmas.

Runs only on compute capability 9.0 (wgmma, setmaxnreg), with TMA-compatible operands, and never
under TRITON_INTERPRET (the interpreter cannot run Gluon): `can_use_gluon` decides.
"""

from __future__ import annotations

import functools

import torch

from . import _triton as tt

triton = tt.triton

HAS_GLUON = False
_GLUON_ERROR = ""
if tt.gluon_validated():  # other Triton versions: the @triton.jit kernels (see _triton.py)
    try:
        from triton.experimental import gluon
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.language.nvidia.hopper import (
            fence_async_shared,
            mbarrier,
            tma,
            warpgroup_mma,
            warpgroup_mma_wait,
        )
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor

        # The TMA copies under their Triton >= 3.7 names; 3.6 (the GPU machine's, where these kernels
        # were measured) has only the old ones, which later versions keep as stubs that raise.
        _tma_load = getattr(tma, "async_load", tma.async_copy_global_to_shared)
        _tma_store = getattr(tma, "async_store", tma.async_copy_shared_to_global)

        HAS_GLUON = True
    except Exception as e:  # older Triton: no Gluon, or a different Hopper API
        _GLUON_ERROR = f"{type(e).__name__}: {e}"

BLOCK_K = 128  # one scale step: fixed by the recipe's 1x128 / 128x128 tiles

# name -> (BLOCK_M, BLOCK_N, NUM_STAGES, GROUP_M, programs per SM[, kernel options]). BLOCK_N = 128
# keeps acc + two in-flight partials in registers (3 x 64 fp32 a thread). 128-row tiles: two consumer
# warpgroups, one program an SM. 64-row tiles: one consumer warpgroup, two programs an SM (each
# program's epilogue and barrier waits then overlap the other's main loop).
# Kernel options (default _KERNEL_OPTS): WARPS_N = 2 splits the tile's columns between the two
# consumer warpgroups instead of its rows; B_COLS prefetches wgrad's column scales (see _step_scale);
# PRODUCER_REGS is the producer warpgroup's setmaxnreg (40 -> consumers 232 registers a thread in the
# main loop; 24 -> 240: 256 x 240 + 128 x 24 = 64,512 of the 65,536).
GLUON_CONFIGS = {
    "128x128s4": (128, 128, 4, 8, 1),
    "128x128s5": (128, 128, 5, 8, 1),
    "64x128s4o2": (64, 128, 4, 8, 2),
    "64x128s6": (64, 128, 6, 8, 1),
    # wgrad candidates (B scaled per row: a vector of column scales a step); slower than the Triton
    # kernel on the GPU (WGRAD_CONFIGS). The CPU tests check the compile (no spills, the overlap).
    # Registers a consumer thread in the main loop, ptxas for sm_90a, fp32 out: predicted / compiled
    # (highest register index + 1).
    # 128x128 tile, WARPS_N = 2: a warpgroup holds 128 rows x 64 columns, so acc + two partials are
    # still 3 x 64 registers but the column-scale vector is 16, not 32, and the row scales 4 (two
    # prefetched: 8); ~29 of addresses, counters, loop state as in the forward kernel: ~245 predicted,
    # too many for 232, hence PRODUCER_REGS = 24 (240) and int32 scale offsets (-8): 237-238 compiled, 0
    # spills. Either alone still spills (ptxas stack: 56 bytes at PRODUCER_REGS = 40, 80 without the
    # int32 offsets); WARPS_N = 1 with both: 72; WARPS_N = 2 with B_COLS as well: 376.
    "128x128s4w": (128, 128, 4, 8, 1, dict(WARPS_N=2, PRODUCER_REGS=24)),
    # 128x64 tile: acc + partials 3 x 32, column scales 16: ~150 predicted, 150-151 compiled; 8 stages
    # (24 KB each; 229,764 bytes of shared memory with the fp32 epilogue tile, the limit is 232,448)
    # because a step is half as long as at 128x128.
    "128x64s8": (128, 64, 8, 8, 1),
    # the same, column scales loaded straight into the wgmma column layout a step ahead (16 LDG +
    # 16 address IADD a step, no shuffle through shared memory and its two barriers): +16 values and
    # +32 for the loop-invariant 64-bit column addresses LLVM keeps: ~200 predicted, 226-230 compiled.
    "128x64s8c": (128, 64, 8, 8, 1, dict(B_COLS=True)),
    # Both scale vectors of a step come into the ring by TMA with its operand tiles (SCALES_TMA): the consumers
    # read their rows' and columns' scales from shared memory when they retire the step, with no pointers held,
    # no global load in the loop and no barrier of their own. 128x128 with WARPS_N = 2 as above.
    "128x128s4t": (128, 128, 4, 8, 1, dict(WARPS_N=2, PRODUCER_REGS=24, SCALES_TMA=True)),
    # The same with WARPS_N = 1: m64n128k32 wgmmas, as the forward's. With the scales read from the ring when a step
    # retires, the column-scale vector (32 registers a thread) lives only there, and ptxas fits it without spills
    # (the 128x128 WARPS_N = 1 form of session 4, with that vector loaded a step ahead, spilled).
    "128x128s4t1": (128, 128, 4, 8, 1, dict(WARPS_N=1, PRODUCER_REGS=24, SCALES_TMA=True)),
    # The grouped forward and dgrad's two-consumer kernel (_fp8_grouped_split_kernel): two one-warpgroup consumer
    # partitions, each with a 64x128 half of every tile, not in lockstep.
    "128x128h2": (128, 128, 4, 8, 1, dict(SPLIT_CONSUMERS=True, PRODUCER_REGS=24, CONSUMER_REGS=240)),
}
_KERNEL_OPTS = dict(WARPS_N=1, B_COLS=False, PRODUCER_REGS=40)
# What launch_gluon runs (the SPLIT_CONSUMERS configurations are the grouped kernel's only).
DENSE_CONFIGS = tuple(name for name, c in GLUON_CONFIGS.items() if not (c[5:] and c[5].get("SPLIT_CONSUMERS")))
# The configurations built for wgrad (B per row), checked on the CPU to compile without spills and with
# the overlap (tests/kernels/test_fp8_gemm_gluon.py). Timed on an H200 (2026-11-30, session 4,
# bench_fp8_gemm.py --gluon, M = 4096, fp32 out): 128x128s4w 517-587 TFLOPS, 128x64s8 424-471, 128x64s8c
# 404-441, against the Triton kernel's 568-645 on the same shapes: none won. 128x128s4t (session 10) did, see
# WGRAD_DEFAULT_CONFIG.
WGRAD_CONFIGS = ("128x128s4w", "128x64s8", "128x64s8c", "128x128s4t", "128x128s4t1")
DEFAULT_CONFIG = "128x128s4"
# Dispatch policy (fp8_gemm._launch asks gluon_config). Measured on an H200 (2026-11-30, torch 2.11,
# triton 3.6, benchmarks/bench_fp8_gemm.py --gluon), V3 shapes at M = 4096 and 16384, bf16 out:
#   forward (B in 128x128 blocks): 128x128s4 1019-1209 TFLOPS vs the Triton TMA kernel's 735-859
#     (128x128s5 within a few % of it, 64-row tiles 737-1017);
#   dgrad (same scaling) at M = 4096: 1036-1136 vs 802-947;
#   wgrad (B per row, fp32 out): 331-380 (128-row tiles, spills) and 544-570 (64x128s6) vs 585-623:
#     the per-column scale vector costs registers the three 64x128 fp32 tiles need (session 10's
#     SCALES_TMA configuration answers that: WGRAD_DEFAULT_CONFIG below).
# M = 1024 (same run, through bench_fp8_gemm.py main): Gluon 584-1048 vs Triton TMA 581-866, faster on
# 3 of 5 shapes only, and those ~30-100 us launches are host-bound (the dispatched and the direct Gluon
# call differed by up to 40%): so Gluon from M = 4096, where it won every shape.
GLUON_MIN_M = 4096


# The wgrad (B per row; M x N is dW, K the tokens): 128x128s4t, its scales brought in by TMA. Measured on an H200
# (2026-11-30, session 10, benchmarks/bench_wgrad_split.py --gluon, against the dispatch before it, the one-expert
# grouped wgrad or split-K; results bit-identical): 724-845 TFLOPS on the issue's V3 shapes, 1.13-1.44x, and 1.08-1.20x
# at deepseek-v3-small's dW of 256 and 512 tiles of 128x128; at 128 tiles and below 0.36-1.35x, mostly slower (no
# split-K here), so split-K or the Triton kernel stay there. Since session 13 its WARPS_N = 1 form, 128x128s4t1 (same
# bits): in one process on an H200 (2026-12-01) the grouped wgrad at V3 size took 7906 against 8121 us (gate_up, 256
# tokens an expert), 20432 against 21782 us (1024 tokens an expert) and about the same for down; the dense wgrad at
# M = 4096, the lower of two timings, 0.89-1.00x the time on the five V3 shapes timed; the cached V3 MoE layer's
# forward+backward 33.8-34.7 ms against 34.9-37.1 (benchmarks/RESULTS.md, session 13).
WGRAD_DEFAULT_CONFIG = "128x128s4t1"
GLUON_WGRAD_MIN_TILES = 256


def gluon_config(M: int, N: int, K: int, b_blockwise: bool, out_dtype: torch.dtype) -> str | None:
    """The configuration _launch should run for this GEMM, or None to keep the Triton kernels."""
    if out_dtype not in (torch.bfloat16, torch.float32):
        return None
    if not b_blockwise:
        return WGRAD_DEFAULT_CONFIG if triton.cdiv(M, 128) * triton.cdiv(N, 128) >= GLUON_WGRAD_MIN_TILES else None
    return DEFAULT_CONFIG if M >= GLUON_MIN_M else None


# The grouped wgrad of experts padded to whole tiles (launch_gluon_grouped_wgrad): on while GROUPED_WGRAD_GLUON
# (benchmarks turn it off to time the Triton kernel in the same process), from GLUON_GROUPED_WGRAD_MIN_TILES output
# tiles of 128x128 an expert. Measured on an H200 (2026-12-01, session 11, bench_grouped_wgrad.py --aligned, against
# the Triton kernel on the same padded layout): 1.23-1.49x at 64 tiles an expert (deepseek-v3-small's gate_up) and
# 1.18-1.49x at V3's 896 and 1792; at 32 (deepseek-v3-small's down) 0.66x at 256 tokens an expert, 1.20x at 1024.
GROUPED_WGRAD_GLUON = True
GLUON_GROUPED_WGRAD_MIN_TILES = 64


def gluon_grouped_wgrad_config(N: int, K: int, out_dtype: torch.dtype) -> str | None:
    """The configuration fp8_grouped_gemm_wgrad (tokens_aligned) should run for dW [E, N, K], or None to keep the
    Triton kernel: N a multiple of the tile's rows (dW is addressed as [E * N, K]) and enough tiles an expert."""
    bm, bn = GLUON_CONFIGS[WGRAD_DEFAULT_CONFIG][:2]
    if not GROUPED_WGRAD_GLUON or N % bm or out_dtype not in (torch.bfloat16, torch.float32):
        return None
    return WGRAD_DEFAULT_CONFIG if (N // bm) * triton.cdiv(K, bn) >= GLUON_GROUPED_WGRAD_MIN_TILES else None


def gluon_grouped_config(S: int, out_dtype: torch.dtype) -> str | None:
    """The configuration fp8_grouped_gemm's forward and dgrad should run for S routed rows, or None to keep
    the Triton kernels. Measured on an H200 (2026-11-30, session 4, benchmarks/bench_moe_layer.py --kernels,
    V3 experts, 65,536 rows, bf16 out): 128x128s4 forward 857 / 791 TFLOPS (gate_up / down) against the
    Triton TMA kernel's 703 / 717, dgrad 754 / 836 against 724 / 673; 128x128s5 within 4% of it, 64-row
    tiles 623-766. Small S keeps Triton's 64-row tiles, as the dense policy does below GLUON_MIN_M. Since session 14
    the two-consumer form, 128x128h2: 3-6% faster in three separate A/Bs at V3's random routing (gate_up forward
    4.77-5.09 ms against 4.93-5.62, down 2.52-2.72 against 2.65-2.84). The whole layer's forward+backward varies by
    2-5 ms between identical runs and cannot tell the two apart (RESULTS.md, session 14)."""
    if S < GLUON_MIN_M or out_dtype not in (torch.bfloat16, torch.float32):
        return None
    return GROUPED_DEFAULT_CONFIG


if HAS_GLUON:
    _BK = gl.constexpr(BLOCK_K)  # the same, as a constant the kernels can read

    @gluon.jit
    def _tile_offsets(tile_id, num_m, num_n, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
        # Grouped order: GROUP_M row-tiles sweep the N tiles together, so B tiles are re-read from L2.
        per_group = GROUP_M * num_n
        first_m = (tile_id // per_group) * GROUP_M
        group_m = gl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile_id % per_group) % group_m
        pid_n = (tile_id % per_group) // group_m
        return pid_m * BLOCK_M, pid_n * BLOCK_N

    @gluon.jit
    def _producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
                  NUM_STAGES: gl.constexpr, as_desc, bs_desc, sa_bufs, sb_bufs, SCALES_TMA: gl.constexpr):  # fmt: skip
        # One warp: wait for a free slot, TMA both operand tiles into it, arm its ready barrier with the
        # byte count (TMA counts the zero-filled bytes past an edge too, so the count is always full).
        num_m = gl.cdiv(M, BLOCK_M)
        num_n = gl.cdiv(N, BLOCK_N)
        kb = gl.cdiv(K, _BK)
        it = 0
        for tile_id in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            off_m, off_n = _tile_offsets(tile_id, num_m, num_n, BLOCK_M, BLOCK_N, GROUP_M)
            it = _produce_tile(a_desc, b_desc, a_bufs, b_bufs, ready, empty, it, off_m, off_n, kb, NUM_STAGES,
                               as_desc, bs_desc, sa_bufs, sb_bufs, M, N, SCALES_TMA)  # fmt: skip

    @gluon.jit
    def _produce_tile(a_desc, b_desc, a_bufs, b_bufs, ready, empty, it, a_row, b_row, kb, NUM_STAGES: gl.constexpr,
                      as_desc=None, bs_desc=None, sa_bufs=None, sb_bufs=None, M=0, N=0,
                      SCALES_TMA: gl.constexpr = False, k0=0):  # fmt: skip
        # One tile's K loop: rows [a_row, a_row + BLOCK_M) of A and [b_row, b_row + BLOCK_N) of B, ring
        # slots it, it + 1, ...; returns the next slot counter. With scale descriptors (SCALES_TMA: both
        # operands scaled per row, the scales transposed to [Kb, M] / [Kb, N] and flattened) each step's
        # two scale vectors come into the ring slot too, on the same barrier. k0: the first 128-K step (the grouped
        # wgrad's expert starts there).
        if SCALES_TMA:
            nbytes: gl.constexpr = (a_desc.block_type.nbytes + b_desc.block_type.nbytes + as_desc.block_type.nbytes
                                    + bs_desc.block_type.nbytes)  # fmt: skip
        else:
            nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
        for ki in range(kb):
            s = it % NUM_STAGES
            # empty barriers start in phase 0 not yet complete; waiting for parity 1 passes at once,
            # so the first lap through the ring does not block.
            mbarrier.wait(empty.index(s), ((it // NUM_STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), nbytes)
            _tma_load(a_desc, [a_row, (k0 + ki) * _BK], ready.index(s), a_bufs.index(s))
            _tma_load(b_desc, [b_row, (k0 + ki) * _BK], ready.index(s), b_bufs.index(s))
            if SCALES_TMA:  # a box past a row's end reads the next row's scales (or zeros): never stored
                _tma_load(as_desc, [(k0 + ki) * M + a_row], ready.index(s), sa_bufs.index(s))
                _tma_load(bs_desc, [(k0 + ki) * N + b_row], ready.index(s), sb_bufs.index(s))
            it += 1
        return it

    @gluon.jit
    def _issue(a_bufs, b_bufs, ready, it, zero, NUM_STAGES: gl.constexpr, HALF: gl.constexpr = -1):
        # Wait until ring slot `it` holds its operands, then start its wgmma. use_acc=False: the result
        # overwrites `zero`'s registers (the partial being replaced), nothing is read from them.
        # HALF >= 0: a_bufs viewed as [2 NUM_STAGES, 64, 128], the A tile's 64-row half HALF (_grouped_split_consumer).
        s = it % NUM_STAGES
        mbarrier.wait(ready.index(s), (it // NUM_STAGES) & 1)
        a = a_bufs.index(2 * s + HALF) if HALF >= 0 else a_bufs.index(s)
        return warpgroup_mma(a, b_bufs.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)

    @gluon.jit
    def _step_scale(as_ptr, as_ptrs, bs_ptr, bs_ptrs, ki, B_BLOCKWISE: gl.constexpr, B_COLS: gl.constexpr,
                    SCALES_TMA: gl.constexpr = False):  # fmt: skip
        # Prefetched a step ahead (plain loads, L2-resident): a_s[rows, ki], and for a 128x128 block
        # of B a scalar (the tile lies in one block). B scaled per row (wgrad) needs a vector over the
        # tile's columns, BLOCK_N / (4 WARPS_N) registers a thread in the wgmma layout: with B_COLS
        # (128x64 tiles: 16 registers, two of them carried) it is prefetched here too, in the
        # accumulator's column layout; otherwise it is loaded by _b_scale just before its step is
        # retired (two carried a step ahead would not fit), and sb here is a dummy.
        if SCALES_TMA:  # read from the ring slot when the step is retired (_retire); placeholders here
            sa = 0.0
            sb = 0.0
        elif B_BLOCKWISE:
            sa = gl.load(as_ptrs + ki)
            sb = gl.load(bs_ptrs + ki)
        else:
            # as_ptrs (and bs_ptrs with B_COLS) are int32 offsets, ki added before the 64-bit address:
            # LLVM then cannot hoist one 64-bit base pointer a row (or column) out of the loop, which
            # costs 2 registers each (8 more a thread at WARPS_N = 2: the difference between spilling
            # and not). Per step: one IADD and one IMAD.WIDE an address instead of two IADD3.
            sa = gl.load(as_ptr + (as_ptrs + ki))
            if B_COLS:
                sb = gl.load((bs_ptr + ki) + bs_ptrs)
            else:
                sb = sa
        return sa, sb

    @gluon.jit
    def _b_scale(bs_ptrs, ki, sb, B_BLOCKWISE: gl.constexpr, B_COLS: gl.constexpr, cols_l: gl.constexpr,
                 SCALES_TMA: gl.constexpr = False):  # fmt: skip
        if B_BLOCKWISE or B_COLS or SCALES_TMA:
            return sb
        else:
            # bs_ptrs is compact (a pointer or two a thread) and the values are shuffled through shared
            # memory into the wgmma column layout (STS, bar.sync, LDS.128, bar.sync: two barriers of
            # the consumer warps a step): 32 pointers a thread held across the loop spilled heavily.
            # At 128x128 with WARPS_N = 1 the shuffled vector (32 registers) still spills (ptxas:
            # 104-byte stack); 128x64 tiles and WARPS_N = 2 (16 registers) do not.
            return gl.convert_layout(gl.load(bs_ptrs + ki), cols_l)

    @gluon.jit
    def _promote(acc, part, sa, sb, B_BLOCKWISE: gl.constexpr):
        if B_BLOCKWISE:
            acc = acc + part * (sa * sb)[:, None]
        else:
            acc = acc + (part * sa[:, None]) * sb[None, :]
        # An empty asm statement with side effects that takes acc: LLVM may not move the FMAs past it,
        # nor past the next wgmma (also side-effecting asm). Without it LLVM sinks the FMAs below the
        # next issue, which then needs a fresh copy of the partial's registers, and the loop's register
        # copies read partials still in flight, so ptxas serializes all wgmmas (C7514).
        return gl.inline_asm_elementwise("", "=f,0", [acc], dtype=gl.float32, is_pure=False, pack=1)

    @gluon.jit
    def _retire(acc, part, sa, sb, empty, it, sa_bufs, sb_bufs, rows_l: gl.constexpr, cols_l: gl.constexpr,
                B_BLOCKWISE: gl.constexpr, NUM_STAGES: gl.constexpr, SCALES_TMA: gl.constexpr):  # fmt: skip
        # Step `it` is off the tensor cores: release its ring slot (the scales kept in it are read first) and
        # promote its partial into acc while the next step's wgmma runs.
        if SCALES_TMA:
            sa = sa_bufs.index(it % NUM_STAGES).load(rows_l)
            sb = sb_bufs.index(it % NUM_STAGES).load(cols_l)
        mbarrier.arrive(empty.index(it % NUM_STAGES))
        return _promote(acc, part, sa, sb, B_BLOCKWISE)

    @gluon.jit
    def _scaled_mainloop(a_bufs, b_bufs, ready, empty, it, kb, zero, acc, as_ptr, as_ptrs, bs_ptr, bs_ptrs,
                         cols_l: gl.constexpr, B_BLOCKWISE: gl.constexpr, B_COLS: gl.constexpr,
                         NUM_STAGES: gl.constexpr, sa_bufs=None, sb_bufs=None,
                         rows_l: gl.constexpr = None, SCALES_TMA: gl.constexpr = False,
                         HALF: gl.constexpr = -1):  # fmt: skip
        # One tile's kb 128-K steps from ring slot `it` on, promoted into acc; returns (acc, next slot).
        # Two partials alternate, unrolled by two steps. Each new wgmma writes into the registers of
        # the partial it replaces (passed as its accumulator with use_acc=False), so the loop needs
        # no register copies: a copy that read a partial whose wgmma is still in flight would make
        # ptxas serialize every wgmma (warning C7514). sa_bufs / sb_bufs: the scales arrive in the ring
        # (SCALES_TMA) and are read at each step's retirement. HALF >= 0: one 64-row half of the ring's A tiles (the
        # two-consumer grouped kernel, _issue).
        T: gl.constexpr = SCALES_TMA
        p0 = _issue(a_bufs, b_bufs, ready, it, zero, NUM_STAGES, HALF)
        sa0, sb0 = _step_scale(as_ptr, as_ptrs, bs_ptr, bs_ptrs, 0, B_BLOCKWISE, B_COLS, T)
        p1w = zero
        for j in range((kb - 1) // 2):
            # in flight on entry: step 2j (p0). Issue 2j+1, retire 2j; issue 2j+2, retire 2j+1.
            p1 = _issue(a_bufs, b_bufs, ready, it + 1, p1w, NUM_STAGES, HALF)
            sa1, sb1 = _step_scale(as_ptr, as_ptrs, bs_ptr, bs_ptrs, 2 * j + 1, B_BLOCKWISE, B_COLS, T)
            sb = _b_scale(bs_ptrs, 2 * j, sb0, B_BLOCKWISE, B_COLS, cols_l, T)
            p0w = warpgroup_mma_wait(num_outstanding=1, deps=(p0,))
            # step 2j's operands are consumed; its promotion runs while step 2j+1 is on the tensor cores
            acc = _retire(acc, p0w, sa0, sb, empty, it, sa_bufs, sb_bufs, rows_l, cols_l, B_BLOCKWISE, NUM_STAGES, T)
            p0 = _issue(a_bufs, b_bufs, ready, it + 2, p0w, NUM_STAGES, HALF)
            sa0, sb0 = _step_scale(as_ptr, as_ptrs, bs_ptr, bs_ptrs, 2 * j + 2, B_BLOCKWISE, B_COLS, T)
            sb = _b_scale(bs_ptrs, 2 * j + 1, sb1, B_BLOCKWISE, B_COLS, cols_l, T)
            p1w = warpgroup_mma_wait(num_outstanding=1, deps=(p1,))
            acc = _retire(acc, p1w, sa1, sb, empty, it + 1, sa_bufs, sb_bufs, rows_l, cols_l, B_BLOCKWISE,
                          NUM_STAGES, T)  # fmt: skip
            it += 2
        # (branch-local names: p0 may not change type inside an if)
        if kb % 2 == 0:  # one step left to issue behind the in-flight p0
            q1 = _issue(a_bufs, b_bufs, ready, it + 1, p1w, NUM_STAGES, HALF)
            sa1, sb1 = _step_scale(as_ptr, as_ptrs, bs_ptr, bs_ptrs, kb - 1, B_BLOCKWISE, B_COLS, T)
            sb = _b_scale(bs_ptrs, kb - 2, sb0, B_BLOCKWISE, B_COLS, cols_l, T)
            q0 = warpgroup_mma_wait(num_outstanding=1, deps=(p0,))
            acc = _retire(acc, q0, sa0, sb, empty, it, sa_bufs, sb_bufs, rows_l, cols_l, B_BLOCKWISE, NUM_STAGES, T)
            sb = _b_scale(bs_ptrs, kb - 1, sb1, B_BLOCKWISE, B_COLS, cols_l, T)
            q1 = warpgroup_mma_wait(num_outstanding=0, deps=(q1,))
            acc = _retire(acc, q1, sa1, sb, empty, it + 1, sa_bufs, sb_bufs, rows_l, cols_l, B_BLOCKWISE,
                          NUM_STAGES, T)  # fmt: skip
            it += 2
        else:
            sb = _b_scale(bs_ptrs, kb - 1, sb0, B_BLOCKWISE, B_COLS, cols_l, T)
            q0 = warpgroup_mma_wait(num_outstanding=0, deps=(p0,))
            acc = _retire(acc, q0, sa0, sb, empty, it, sa_bufs, sb_bufs, rows_l, cols_l, B_BLOCKWISE, NUM_STAGES, T)
            it += 1
        return acc, it

    @gluon.jit
    def _consumer(c_desc, as_ptr, bs_ptr, a_bufs, b_bufs, ready, empty, c_smem, M, N, K,
                  B_BLOCKWISE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
                  NUM_STAGES: gl.constexpr, B_COLS: gl.constexpr, WARPS_N: gl.constexpr, sa_bufs, sb_bufs,
                  SCALES_TMA: gl.constexpr):  # fmt: skip
        num_warps: gl.constexpr = gl.num_warps()
        # WARPS_N = 1: one 64-row slab per warpgroup, instruction m64 n=BLOCK_N k32 (fp8). WARPS_N = 2
        # (128x128 wgrad): warpgroup g owns columns [64 g, 64 g + 64) of all 128 rows, two m64n64k32
        # chains a k32 slice; same registers for acc and partials, half the column-scale vector.
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps // WARPS_N, WARPS_N],
                                                      instr_shape=[16, BLOCK_N // WARPS_N, 32])  # fmt: skip
        rows_l: gl.constexpr = gl.SliceLayout(1, mma)
        cols_l: gl.constexpr = gl.SliceLayout(0, mma)
        compact_l: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        num_m = gl.cdiv(M, BLOCK_M)
        num_n = gl.cdiv(N, BLOCK_N)
        kb = gl.cdiv(K, _BK)
        zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
        it = 0
        for tile_id in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            off_m, off_n = _tile_offsets(tile_id, num_m, num_n, BLOCK_M, BLOCK_N, GROUP_M)
            if SCALES_TMA:  # the scales come through the ring, no pointers
                as_ptrs = 0
                bs_ptrs = 0
            elif B_BLOCKWISE:
                as_ptrs = as_ptr + ((off_m + gl.arange(0, BLOCK_M, rows_l)) % M) * kb
                bs_ptrs = bs_ptr + (off_n // _BK) * kb  # BLOCK_N divides 128: one weight block per tile
            else:  # int32 offsets (see _step_scale)
                as_ptrs = ((off_m + gl.arange(0, BLOCK_M, rows_l)) % M) * kb
                if B_COLS:  # the columns this thread holds in the wgmma layout
                    bs_ptrs = ((off_n + gl.arange(0, BLOCK_N, cols_l)) % N) * kb
                else:
                    bs_ptrs = bs_ptr + ((off_n + gl.arange(0, BLOCK_N, compact_l)) % N) * kb
            acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
            acc, it = _scaled_mainloop(a_bufs, b_bufs, ready, empty, it, kb, zero, acc, as_ptr, as_ptrs, bs_ptr,
                                       bs_ptrs, cols_l, B_BLOCKWISE, B_COLS, NUM_STAGES, sa_bufs, sb_bufs,
                                       rows_l, SCALES_TMA)  # fmt: skip
            # Epilogue: the previous tile's TMA store must have read c_smem before it is overwritten.
            tma.store_wait(pendings=0)
            c_smem.store(acc.to(c_desc.dtype))
            fence_async_shared()
            _tma_store(c_desc, [off_m, off_n], c_smem)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _allocate_ring(a_desc, b_desc, c_desc, NUM_STAGES: gl.constexpr, CONSUMERS: gl.constexpr = 1):
        # The operand ring (NUM_STAGES slots of A and B tiles), an epilogue tile a consumer partition, and each
        # slot's ready (TMA landed) and empty (every consumer partition done) mbarriers.
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [NUM_STAGES] + a_desc.block_type.shape, a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [NUM_STAGES] + b_desc.block_type.shape, b_desc.layout)
        if CONSUMERS == 1:
            c_smem = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
        else:
            c_smem = gl.allocate_shared_memory(c_desc.dtype, [CONSUMERS] + c_desc.block_type.shape, c_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=CONSUMERS)
        return a_bufs, b_bufs, c_smem, ready, empty

    @gluon.jit
    def _allocate_scale_ring(as_desc, bs_desc, NUM_STAGES: gl.constexpr, SCALES_TMA: gl.constexpr):
        # SCALES_TMA: a slot of the ring also holds its step's A and B scale vectors. Otherwise 16 unused bytes a
        # slot, allocated only because the partitions take the buffers as arguments.
        if SCALES_TMA:
            sa_bufs = gl.allocate_shared_memory(gl.float32, [NUM_STAGES] + as_desc.block_type.shape, as_desc.layout)
            sb_bufs = gl.allocate_shared_memory(gl.float32, [NUM_STAGES] + bs_desc.block_type.shape, bs_desc.layout)
        else:
            unused: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
            sa_bufs = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, 4], unused)
            sb_bufs = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, 4], unused)
        return sa_bufs, sb_bufs

    @gluon.jit
    def _fp8_gemm_gluon_kernel(a_desc, b_desc, c_desc, as_ptr, bs_ptr, M, N, K,
                               B_BLOCKWISE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                               GROUP_M: gl.constexpr, NUM_STAGES: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                               WARPS_N: gl.constexpr, B_COLS: gl.constexpr, as_desc=None, bs_desc=None):  # fmt: skip
        a_bufs, b_bufs, c_smem, ready, empty = _allocate_ring(a_desc, b_desc, c_desc, NUM_STAGES)
        # (warp_specialize takes no None argument: without SCALES_TMA the partitions get a small unused ring and
        # a_desc in the scale descriptors' place, and the SCALES_TMA constexpr tells them apart)
        SCALES_TMA: gl.constexpr = as_desc is not None
        sa_bufs, sb_bufs = _allocate_scale_ring(as_desc, bs_desc, NUM_STAGES, SCALES_TMA)
        if not SCALES_TMA:
            as_desc = a_desc
            bs_desc = a_desc
        gl.warp_specialize(
            [
                (
                    _consumer,
                    (
                        c_desc,
                        as_ptr,
                        bs_ptr,
                        a_bufs,
                        b_bufs,
                        ready,
                        empty,
                        c_smem,
                        M,
                        N,
                        K,
                        B_BLOCKWISE,
                        BLOCK_M,
                        BLOCK_N,
                        GROUP_M,
                        NUM_STAGES,
                        B_COLS,
                        WARPS_N,
                        sa_bufs,
                        sb_bufs,
                        SCALES_TMA,
                    ),
                ),  # fmt: skip
                (
                    _producer,
                    (a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, BLOCK_M, BLOCK_N, GROUP_M, NUM_STAGES,
                     as_desc, bs_desc, sa_bufs, sb_bufs, SCALES_TMA),
                ),  # fmt: skip
            ],
            [1],
            [PRODUCER_REGS],
        )

    # -----------------------------------------------------------------------------------------
    # Grouped (MoE experts) variant, B in 128x128 blocks (fp8_grouped_gemm's forward and dgrad). Same
    # producer, ring, main loop (_produce_tile, _scaled_mainloop) as above; what differs is the tile walk
    # and the epilogue.
    # Tiles: (row tile of one expert, N tile). Row tile t has expert tile_expert[t] and first row
    # tile_row[t] (fp8_grouped_gemm._tile_map, built on the device for BLOCK_M); the tail of the static
    # ceil(S / BLOCK_M) + min(E, S) row tiles is idle. Both partitions read the number of real row tiles from
    # device memory (ntiles_ptr) and walk only tile ids < ntiles * num_n: no host sync, and no program
    # spends time on idle tiles (the persistent grid is sized for the static bound). Tile order is
    # _tile_offsets's GROUP_M order over row tiles: an expert's row tiles (neighbours in t) load the
    # same B tile at about the same time, so the expert's weight is read from memory about once.

    @gluon.jit
    def _grouped_tile(tile_id, num_t, num_n, tile_expert_ptr, tile_row_ptr, BLOCK_N: gl.constexpr,
                      GROUP_M: gl.constexpr):  # fmt: skip
        t, off_n = _tile_offsets(tile_id, num_t, num_n, 1, BLOCK_N, GROUP_M)
        return gl.load(tile_expert_ptr + t), gl.load(tile_row_ptr + t), off_n

    @gluon.jit
    def _grouped_producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, tile_expert_ptr, tile_row_ptr, ntiles_ptr,
                          N, K, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, NUM_STAGES: gl.constexpr):  # fmt: skip
        # A rows from the tile's first row: a tile may run past its expert's last row into the next
        # expert's rows (not stored) or past S (zero-filled). B: expert e's rows start at e * N of the
        # [E * N, K] view; with N % BLOCK_N != 0 the last N tile reads expert e + 1's first rows (or
        # zero fill past E * N) into columns that are not stored.
        num_n = gl.cdiv(N, BLOCK_N)
        num_t = gl.load(ntiles_ptr)
        kb = gl.cdiv(K, _BK)
        it = 0
        for tile_id in range(gl.program_id(0), num_t * num_n, gl.num_programs(0)):
            e, row0, off_n = _grouped_tile(tile_id, num_t, num_n, tile_expert_ptr, tile_row_ptr, BLOCK_N, GROUP_M)
            it = _produce_tile(a_desc, b_desc, a_bufs, b_bufs, ready, empty, it, row0, e * N + off_n, kb, NUM_STAGES)

    @gluon.constexpr_function
    def _grouped_mma_layout(warps, block_n):
        """The grouped consumers' accumulator layout: m64nBLOCK_Nk32 wgmmas, warps stacked along rows."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, block_n, 32])

    @gluon.constexpr_function
    def _grouped_store_layout(warps, block_n, out_bits):
        """The grouped consumers' masked epilogue: c_smem read back in 16-byte row vectors (vec elements, block_n /
        vec threads a row)."""
        vec = 128 // out_bits
        return gl.BlockedLayout([1, vec], [32 * vec // block_n, block_n // vec], [warps, 1], [1, 0])

    @gluon.jit
    def _grouped_scale_ptrs(as_ptr, bs_ptr, first, e, off_n, S, kb, nb, ROWS: gl.constexpr, rows_l: gl.constexpr):
        # A tile's scale pointers from its first row: a_s rows clamped at S - 1 (their products are not stored); b_s
        # one 128x128 block a tile.
        as_ptrs = as_ptr + gl.minimum(first + gl.arange(0, ROWS, rows_l), S - 1) * kb
        return as_ptrs, bs_ptr + (e * nb + off_n // _BK) * kb

    @gluon.jit
    def _grouped_consumer(c_desc, c_ptr, as_ptr, bs_ptr, offs_ptr, tile_expert_ptr, tile_row_ptr, ntiles_ptr,
                          a_bufs, b_bufs, ready, empty, c_smem, S, N, K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                          GROUP_M: gl.constexpr, NUM_STAGES: gl.constexpr):  # fmt: skip
        num_warps: gl.constexpr = gl.num_warps()
        mma: gl.constexpr = _grouped_mma_layout(num_warps, BLOCK_N)
        rows_l: gl.constexpr = gl.SliceLayout(1, mma)
        cols_l: gl.constexpr = gl.SliceLayout(0, mma)
        store_l: gl.constexpr = _grouped_store_layout(num_warps, BLOCK_N, c_desc.dtype.primitive_bitwidth)
        num_n = gl.cdiv(N, BLOCK_N)
        num_t = gl.load(ntiles_ptr)
        kb = gl.cdiv(K, _BK)
        nb = gl.cdiv(N, _BK)
        zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
        it = 0
        for tile_id in range(gl.program_id(0), num_t * num_n, gl.num_programs(0)):
            e, row0, off_n = _grouped_tile(tile_id, num_t, num_n, tile_expert_ptr, tile_row_ptr, BLOCK_N, GROUP_M)
            row_end = gl.load(offs_ptr + e)
            as_ptrs, bs_ptrs = _grouped_scale_ptrs(as_ptr, bs_ptr, row0, e, off_n, S, kb, nb, BLOCK_M, rows_l)
            acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
            acc, it = _scaled_mainloop(a_bufs, b_bufs, ready, empty, it, kb, zero, acc, as_ptr, as_ptrs, bs_ptr,
                                       bs_ptrs, cols_l, True, False, NUM_STAGES)  # fmt: skip
            _grouped_epilogue(c_desc, c_ptr, c_smem, acc, row0, row_end, off_n, N, BLOCK_M, BLOCK_N, store_l)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _grouped_epilogue(c_desc, c_ptr, c_smem, acc, row0, row_end, off_n, N, ROWS: gl.constexpr,
                          BLOCK_N: gl.constexpr, store_l: gl.constexpr):  # fmt: skip
        # acc holds output rows [row0, row0 + ROWS) of expert rows ending at row_end.
        tma.store_wait(pendings=0)  # the previous tile's TMA store has read c_smem
        c_smem.store(acc.to(c_desc.dtype))
        if (row0 + ROWS <= row_end) & (off_n + BLOCK_N <= N):
            # Every row is this expert's and every column < N: the asynchronous TMA store, waited
            # for at the next tile's epilogue (overlaps the next main loop).
            fence_async_shared()
            _tma_store(c_desc, [row0, off_n], c_smem)
        else:
            # The expert's last tile (or the last N tile of a ragged N): a TMA store would write the
            # next expert's rows, so masked 16-byte stores from registers instead.
            out = c_smem.load(store_l)
            rows = row0 + gl.arange(0, ROWS, gl.SliceLayout(1, store_l))
            cols = off_n + gl.arange(0, BLOCK_N, gl.SliceLayout(0, store_l))
            mask = (rows < row_end)[:, None] & (cols < N)[None, :]
            gl.store(c_ptr + (rows.to(gl.int64) * N)[:, None] + cols[None, :], out, mask=mask)

    @gluon.jit
    def _grouped_split_consumer(HALF: gl.constexpr, c_desc, c_ptr, as_ptr, bs_ptr, offs_ptr, tile_expert_ptr,
                                tile_row_ptr, ntiles_ptr, a_bufs, b_bufs, ready, empty, c_bufs, S, N, K,
                                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
                                NUM_STAGES: gl.constexpr):  # fmt: skip
        # _grouped_consumer as one of two one-warpgroup partitions (SPLIT_CONSUMERS): rows [64 HALF, 64 HALF + 64)
        # of every tile, with its own accumulator, epilogue tile and store; both read the same ring slots (a slot is
        # free once both have arrived on its empty barrier). Two things this buys over the cooperative kernel:
        # a half whose rows all lie past its expert's end (the second half of an expert's last tile, when at most
        # 64 rows are left: about half the experts at random routing) issues no wgmma, it only hands the tile's
        # ring slots back, and the other half has the tensor cores to itself; and nothing but the ring ties the
        # two halves together (the cooperative consumers meet at a barrier of all their warps before every slot's
        # release and every store). Measured alone (benchmarks/RESULTS.md, session 14): 3-6% faster at V3's random
        # routing, 1-3% slower where every expert fills whole tiles. Same products summed in the same order: results
        # bit-identical to the cooperative kernel's.
        HALF_M: gl.constexpr = BLOCK_M // 2
        mma: gl.constexpr = _grouped_mma_layout(4, BLOCK_N)
        rows_l: gl.constexpr = gl.SliceLayout(1, mma)
        cols_l: gl.constexpr = gl.SliceLayout(0, mma)
        store_l: gl.constexpr = _grouped_store_layout(4, BLOCK_N, c_desc.dtype.primitive_bitwidth)
        a_halves = a_bufs._reinterpret(a_bufs.dtype, [2 * NUM_STAGES, HALF_M, _BK], a_bufs.layout)
        c_smem = c_bufs.index(HALF)
        num_n = gl.cdiv(N, BLOCK_N)
        num_t = gl.load(ntiles_ptr)
        kb = gl.cdiv(K, _BK)
        nb = gl.cdiv(N, _BK)
        zero = gl.zeros([HALF_M, BLOCK_N], gl.float32, mma)
        it = 0
        for tile_id in range(gl.program_id(0), num_t * num_n, gl.num_programs(0)):
            e, row0, off_n = _grouped_tile(tile_id, num_t, num_n, tile_expert_ptr, tile_row_ptr, BLOCK_N, GROUP_M)
            row_end = gl.load(offs_ptr + e)
            first = row0 + HALF * HALF_M
            if first < row_end:
                as_ptrs, bs_ptrs = _grouped_scale_ptrs(as_ptr, bs_ptr, first, e, off_n, S, kb, nb, HALF_M, rows_l)
                acc = gl.zeros([HALF_M, BLOCK_N], gl.float32, mma)
                acc, it = _scaled_mainloop(a_halves, b_bufs, ready, empty, it, kb, zero, acc, as_ptr, as_ptrs, bs_ptr,
                                           bs_ptrs, cols_l, True, False, NUM_STAGES, HALF=HALF)  # fmt: skip
                _grouped_epilogue(c_desc, c_ptr, c_smem, acc, first, row_end, off_n, N, HALF_M, BLOCK_N, store_l)
            else:
                for _ in range(kb):  # the slot must have landed before it is handed back
                    mbarrier.wait(ready.index(it % NUM_STAGES), (it // NUM_STAGES) & 1)
                    mbarrier.arrive(empty.index(it % NUM_STAGES))
                    it += 1
        tma.store_wait(pendings=0)

    @gluon.jit
    def _fp8_grouped_gluon_kernel(a_desc, b_desc, c_desc, c_ptr, as_ptr, bs_ptr, offs_ptr, tile_expert_ptr,
                                  tile_row_ptr, ntiles_ptr, S, N, K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                  GROUP_M: gl.constexpr, NUM_STAGES: gl.constexpr, PRODUCER_REGS: gl.constexpr):  # fmt: skip
        a_bufs, b_bufs, c_smem, ready, empty = _allocate_ring(a_desc, b_desc, c_desc, NUM_STAGES)
        # (argument tuples written inline: built into a local variable first, the constexprs reached the
        # partitions as tensors, a CompilationError in gl.zeros)
        gl.warp_specialize(
            [
                (_grouped_consumer, (c_desc, c_ptr, as_ptr, bs_ptr, offs_ptr, tile_expert_ptr, tile_row_ptr, ntiles_ptr,
                                     a_bufs, b_bufs, ready, empty, c_smem, S, N, K, BLOCK_M, BLOCK_N, GROUP_M,
                                     NUM_STAGES)),
                (_grouped_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, tile_expert_ptr, tile_row_ptr,
                                     ntiles_ptr, N, K, BLOCK_N, GROUP_M, NUM_STAGES)),
            ],
            [1],
            [PRODUCER_REGS],
        )  # fmt: skip

    @gluon.jit
    def _fp8_grouped_split_kernel(a_desc, b_desc, c_desc, c_ptr, as_ptr, bs_ptr, offs_ptr, tile_expert_ptr,
                                  tile_row_ptr, ntiles_ptr, S, N, K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                  GROUP_M: gl.constexpr, NUM_STAGES: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                                  CONSUMER_REGS: gl.constexpr):  # fmt: skip
        # c_desc: one partition's [BLOCK_M / 2, BLOCK_N] half of a tile.
        a_bufs, b_bufs, c_bufs, ready, empty = _allocate_ring(a_desc, b_desc, c_desc, NUM_STAGES, 2)
        gl.warp_specialize(
            [
                (_grouped_split_consumer, (0, c_desc, c_ptr, as_ptr, bs_ptr, offs_ptr, tile_expert_ptr, tile_row_ptr,
                                           ntiles_ptr, a_bufs, b_bufs, ready, empty, c_bufs, S, N, K, BLOCK_M,
                                           BLOCK_N, GROUP_M, NUM_STAGES)),
                (_grouped_split_consumer, (1, c_desc, c_ptr, as_ptr, bs_ptr, offs_ptr, tile_expert_ptr, tile_row_ptr,
                                           ntiles_ptr, a_bufs, b_bufs, ready, empty, c_bufs, S, N, K, BLOCK_M,
                                           BLOCK_N, GROUP_M, NUM_STAGES)),
                (_grouped_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, tile_expert_ptr, tile_row_ptr,
                                     ntiles_ptr, N, K, BLOCK_N, GROUP_M, NUM_STAGES)),
            ],
            [4, 1],
            [CONSUMER_REGS, PRODUCER_REGS],
        )  # fmt: skip


    # -----------------------------------------------------------------------------------------
    # Grouped wgrad for the MoE experts padded to whole 128-token tiles (fp8_grouped_gemm_wgrad with
    # tokens_aligned): dW[e] = dy^T x over expert e's tokens [offs[e-1], offs[e]), every offset a multiple of 128.
    # The dense kernel's producer, ring (with SCALES_TMA) and main loop over work items (expert, output tile),
    # expert-major so that an expert's token columns stay in L2 while its tiles run; an item's K loop starts at
    # the expert's first step (k0). An expert without tokens stores zeros. dW is addressed as [E * N, K], so N
    # must be a multiple of BLOCK_M (a tile never reaches the next expert's rows).

    @gluon.jit
    def _expert_steps(offs_ptr, item, tiles, E):
        # (first 128-token step, end step) of item's expert, clamped to the last expert past the end. The consumers
        # load it one item ahead: a global load at an item's start would leave its latency exposed (an item is two
        # or three steps at V3's 256 tokens an expert). The producer runs ahead by the ring and loads it in turn.
        e = gl.minimum(item // tiles, E - 1)
        start = gl.load(offs_ptr + e - 1, mask=e > 0, other=0)
        end = gl.load(offs_ptr + e)
        return start // _BK, end // _BK

    @gluon.jit
    def _grouped_wgrad_producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, offs_ptr, N, K, E,
                                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
                                NUM_STAGES: gl.constexpr, as_desc, bs_desc, sa_bufs, sb_bufs):  # fmt: skip
        num_m = gl.cdiv(N, BLOCK_M)
        num_n = gl.cdiv(K, BLOCK_N)
        tiles = num_m * num_n
        it = 0
        # Not loaded an item ahead as the consumers do. Carried across iterations, the pair met a Triton 3.6 Gluon
        # miscompile: a loop-carried value that an inner loop takes as its trip count is replaced by its initial
        # value (the gluon-inline pass; reproduced in a 20-line @gluon.jit kernel without warp_specialize, while
        # @triton.jit compiles the same code right). The producer then ran its first item's step count for every
        # item and stalled the ring where an expert's count changed (session 11). The consumers' carried pair only
        # feeds branch conditions and a derived bound, and survives; test_grouped_wgrad_compiles_for_sm90 checks
        # that this producer loads its item's range in the loop.
        for item in range(gl.program_id(0), E * tiles, gl.num_programs(0)):
            k0, k1 = _expert_steps(offs_ptr, item, tiles, E)
            off_m, off_n = _tile_offsets(item % tiles, num_m, num_n, BLOCK_M, BLOCK_N, GROUP_M)
            it = _produce_tile(a_desc, b_desc, a_bufs, b_bufs, ready, empty, it, off_m, off_n, k1 - k0, NUM_STAGES,
                               as_desc, bs_desc, sa_bufs, sb_bufs, N, K, True, k0)  # fmt: skip

    @gluon.jit
    def _grouped_wgrad_consumer(c_desc, a_bufs, b_bufs, ready, empty, c_smem, offs_ptr, N, K, E,
                                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
                                NUM_STAGES: gl.constexpr, WARPS_N: gl.constexpr, sa_bufs, sb_bufs):  # fmt: skip
        num_warps: gl.constexpr = gl.num_warps()
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps // WARPS_N, WARPS_N],
                                                      instr_shape=[16, BLOCK_N // WARPS_N, 32])  # fmt: skip
        rows_l: gl.constexpr = gl.SliceLayout(1, mma)
        cols_l: gl.constexpr = gl.SliceLayout(0, mma)
        num_m = gl.cdiv(N, BLOCK_M)
        num_n = gl.cdiv(K, BLOCK_N)
        tiles = num_m * num_n
        zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
        it = 0
        k0_next, k1_next = _expert_steps(offs_ptr, gl.program_id(0), tiles, E)
        for item in range(gl.program_id(0), E * tiles, gl.num_programs(0)):
            steps = k1_next - k0_next
            k0_next, k1_next = _expert_steps(offs_ptr, item + gl.num_programs(0), tiles, E)
            e = item // tiles
            off_m, off_n = _tile_offsets(item % tiles, num_m, num_n, BLOCK_M, BLOCK_N, GROUP_M)
            acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
            if steps > 0:
                acc, it = _scaled_mainloop(a_bufs, b_bufs, ready, empty, it, steps, zero, acc, 0, 0, 0, 0, cols_l,
                                           False, False, NUM_STAGES, sa_bufs, sb_bufs, rows_l, True)  # fmt: skip
            tma.store_wait(pendings=0)  # the previous item's TMA store has read c_smem
            c_smem.store(acc.to(c_desc.dtype))
            fence_async_shared()
            _tma_store(c_desc, [e * N + off_m, off_n], c_smem)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _grouped_wgrad_gluon_kernel(a_desc, b_desc, c_desc, as_desc, bs_desc, offs_ptr, N, K, E,
                                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
                                    NUM_STAGES: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                                    WARPS_N: gl.constexpr):  # fmt: skip
        a_bufs, b_bufs, c_smem, ready, empty = _allocate_ring(a_desc, b_desc, c_desc, NUM_STAGES)
        sa_bufs, sb_bufs = _allocate_scale_ring(as_desc, bs_desc, NUM_STAGES, True)
        gl.warp_specialize(
            [
                (_grouped_wgrad_consumer, (c_desc, a_bufs, b_bufs, ready, empty, c_smem, offs_ptr, N, K, E, BLOCK_M,
                                           BLOCK_N, GROUP_M, NUM_STAGES, WARPS_N, sa_bufs, sb_bufs)),
                (_grouped_wgrad_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, offs_ptr, N, K, E, BLOCK_M,
                                           BLOCK_N, GROUP_M, NUM_STAGES, as_desc, bs_desc, sa_bufs, sb_bufs)),
            ],
            [1],
            [PRODUCER_REGS],
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Launcher


def can_use_gluon(*tensors: torch.Tensor) -> bool:
    """Gluon kernel: Triton with Gluon, not interpreting, CUDA cc exactly 9.0 (wgmma), TMA-aligned tensors."""
    if not HAS_GLUON or tt.interpreting() or not all(t.is_cuda for t in tensors):
        return False
    if tt.capabilities().compute_capability != (9, 0):
        return False
    return all(
        t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
        for t in tensors
    )


_GL_DTYPE = {}
if HAS_GLUON:
    _GL_DTYPE = {torch.float8_e4m3fn: gl.float8e4nv, torch.bfloat16: gl.bfloat16, torch.float32: gl.float32,
                 torch.float16: gl.float16}  # fmt: skip


@functools.lru_cache(maxsize=64)
def _smem_layout(block: tuple[int, int], dtype: torch.dtype):
    # ~5 us of host time a call uncached, three a launch: as much as 10% of a 100 us GEMM.
    return gl.NVMMASharedLayout.get_default_for(list(block), _GL_DTYPE[dtype])


def _desc(t: torch.Tensor, block: list[int]):
    return GluonTensorDescriptor(t, list(t.shape), list(t.stride()), block, _smem_layout(tuple(block), t.dtype))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_gluon(a, a_s, b, b_s, b_blockwise: bool, out_dtype: torch.dtype, config: str | None = None, out=None):
    """C = A B^T block-scaled (see module docstring). Same argument convention as fp8_gemm._launch."""
    assert config is None or config in DENSE_CONFIGS, f"{config}: not a configuration of the dense kernel"
    bm, bn, stages, group_m, occ, *_ = GLUON_CONFIGS[config or DEFAULT_CONFIG]
    M, K = a.shape
    N = b.shape[0]
    c = torch.empty(M, N, dtype=out_dtype, device=a.device) if out is None else out
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    if not can_use_gluon(a, b, c):
        raise ValueError("launch_gluon: needs CUDA cc 9.0, Gluon, no interpreter, and 16-byte aligned operand rows")
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    grid = (min(_num_sms(a.device.index or 0) * occ, tiles),)
    scale_descs = {}
    if _scales_tma(config or DEFAULT_CONFIG) and not b_blockwise:
        scale_descs = dict(as_desc=_scale_desc(a_s, bm), bs_desc=_scale_desc(b_s, bn))
    else:  # read by pointer as [rows, Kb] (a wgrad's 128x1 scales may come step-major: quant.quantize_act_t)
        a_s, b_s = a_s.contiguous(), b_s.contiguous()
    _fp8_gemm_gluon_kernel[grid](
        _desc(a, [bm, BLOCK_K]), _desc(b, [bn, BLOCK_K]), _desc(c, [bm, bn]), a_s, b_s, M, N, K,
        B_BLOCKWISE=b_blockwise, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=group_m, NUM_STAGES=stages,
        **_kernel_opts(config or DEFAULT_CONFIG), **scale_descs, num_warps=bm // 16, maxnreg=_maxnreg(bm, occ),
    )  # fmt: skip
    return c


@functools.cache
def _scale_layout():
    # A step's scale vector in shared memory: unswizzled (read once a step, no bank-conflict pattern to avoid).
    return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)


def _scale_desc(s_rows_Kb: torch.Tensor, block: int):
    """SCALES_TMA: per-row scales [rows, Kb] as the producer loads them, transposed and flattened to [Kb * rows] (a
    step's vector contiguous) under a 1-D TMA descriptor of one tile's vector. quant.quantize_act_t's scales are
    already a view of that storage: no copy then."""
    flat = s_rows_Kb.t().contiguous().view(-1)
    return GluonTensorDescriptor(flat, [flat.numel()], [1], [block], _scale_layout())


# Grouped (MoE) kernel: the 128x128-block configurations (WARPS_N = 1, no B_COLS), the cooperative kernel and the
# two-consumer one (128x128h2, _grouped_split_consumer); timings at gluon_grouped_config. 64-row tiles pad an
# expert's rows less but lost at V3 size.
GROUPED_CONFIGS = ("128x128s4", "128x128s5", "64x128s4o2", "64x128s6", "128x128h2")
GROUPED_DEFAULT_CONFIG = "128x128h2"


def launch_gluon_grouped(x_SK, x_s, w_ENK, w_s, offs_E, out_dtype, config=None, out=None):
    """y[S, N]: rows of expert e (offs_E's ranges, fp8_grouped_gemm's contract) times W[e]^T, e4m3 x with
    1x128 scales, W [E, N, K] in 128x128 blocks (w_s [E, Nb, Kb]). dgrad is the same call on dy with the
    K-major copy W [E, K, N] and the transposed scales, as fp8_grouped_gemm_dgrad does. Rows past
    offs_E[-1] are not written."""
    from .fp8_grouped_gemm import _check_offs, _tile_map

    config = config or GROUPED_DEFAULT_CONFIG
    assert config in GROUPED_CONFIGS, f"{config}: not a 128x128-block configuration"
    bm, bn, stages, group_m, occ, *_ = GLUON_CONFIGS[config]
    S, K = x_SK.shape
    E, N, Kw = w_ENK.shape
    assert Kw == K, f"reduction dims differ: {K} vs {Kw}"
    Kb, Nb = triton.cdiv(K, BLOCK_K), triton.cdiv(N, BLOCK_K)
    assert x_s.shape == (S, Kb) and w_s.shape == (E, Nb, Kb), "scales must be [S, Kb] and [E, Nb, Kb]"
    assert x_s.dtype == w_s.dtype == torch.float32 and x_s.is_contiguous() and w_s.is_contiguous()
    _check_offs(offs_E, E)
    c = torch.empty(S, N, dtype=out_dtype, device=x_SK.device) if out is None else out
    assert c.shape == (S, N) and c.is_contiguous(), "out must be a contiguous [S, N] (masked stores use row stride N)"
    if S == 0 or N == 0 or E == 0:
        return c
    if K == 0:
        return c.zero_()
    w = w_ENK.reshape(E * N, K)  # stacked: expert e's rows start at row e * N (a copy if not contiguous)
    if not (offs_E.is_cuda and can_use_gluon(x_SK, w, c)):
        raise ValueError("launch_gluon_grouped: needs CUDA cc 9.0, Gluon, no interpreter, 16-byte aligned rows")
    tile_expert, tile_row = _tile_map(offs_E, S, bm)
    ntiles = (tile_expert >= 0).sum(dtype=torch.int32)  # real row tiles, on the device: no host sync
    grid = (min(_num_sms(x_SK.device.index or 0) * occ, tile_expert.numel() * triton.cdiv(N, bn)),)
    opts = _kernel_opts(config)
    if opts.get("SPLIT_CONSUMERS"):
        _fp8_grouped_split_kernel[grid](
            _desc(x_SK, [bm, BLOCK_K]), _desc(w, [bn, BLOCK_K]), _desc(c, [bm // 2, bn]), c, x_s, w_s, offs_E,
            tile_expert, tile_row, ntiles, S, N, K, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=group_m, NUM_STAGES=stages,
            PRODUCER_REGS=opts["PRODUCER_REGS"], CONSUMER_REGS=opts["CONSUMER_REGS"], num_warps=4,
            maxnreg=_maxnreg(bm, occ),
        )  # fmt: skip
        return c
    _fp8_grouped_gluon_kernel[grid](
        _desc(x_SK, [bm, BLOCK_K]), _desc(w, [bn, BLOCK_K]), _desc(c, [bm, bn]), c, x_s, w_s, offs_E, tile_expert,
        tile_row, ntiles, S, N, K, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=group_m, NUM_STAGES=stages,
        PRODUCER_REGS=opts["PRODUCER_REGS"], num_warps=bm // 16, maxnreg=_maxnreg(bm, occ),
    )  # fmt: skip
    return c


def launch_gluon_grouped_wgrad(dyT_NP, dyT_s, xT_KP, xT_s, offs_P, out_dtype, config=None):
    """dW [E, N, K] of fp8_grouped_gemm_wgrad with tokens_aligned (every offs_P a multiple of 128: the experts padded
    to whole tiles, pad_experts_to_tiles; not checked, it would sync), both operands in the 128x1 tiling along the P
    padded tokens: dyT_NP [N, P] with dyT_s [N, Pb], xT_KP [K, P] with xT_s [K, Pb]. A SCALES_TMA configuration
    (WGRAD_DEFAULT_CONFIG); N must be a multiple of its BLOCK_M."""
    config = config or WGRAD_DEFAULT_CONFIG
    assert _scales_tma(config), f"{config}: not a SCALES_TMA configuration"
    bm, bn, stages, group_m, occ, *_ = GLUON_CONFIGS[config]
    (N, P), K, E = dyT_NP.shape, xT_KP.shape[0], offs_P.numel()
    assert N % bm == 0, f"N = {N} must be a multiple of {bm}"
    Pb = triton.cdiv(P, BLOCK_K)
    assert xT_KP.shape[1] == P and dyT_s.shape == (N, Pb) and xT_s.shape == (K, Pb), "operands and scales disagree"
    c = torch.empty(E, N, K, dtype=out_dtype, device=dyT_NP.device)
    if E == 0 or K == 0:
        return c
    if P == 0:
        return c.zero_()
    if not (offs_P.is_cuda and can_use_gluon(dyT_NP, xT_KP, c.view(E * N, K))):
        raise ValueError("launch_gluon_grouped_wgrad: needs CUDA cc 9.0, Gluon, no interpreter, 16-byte aligned rows")
    grid = (min(_num_sms(dyT_NP.device.index or 0) * occ, E * (N // bm) * triton.cdiv(K, bn)),)
    opts = _kernel_opts(config)
    _grouped_wgrad_gluon_kernel[grid](
        _desc(dyT_NP, [bm, BLOCK_K]), _desc(xT_KP, [bn, BLOCK_K]), _desc(c.view(E * N, K), [bm, bn]),
        _scale_desc(dyT_s, bm), _scale_desc(xT_s, bn), offs_P, N, K, E, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=group_m,
        NUM_STAGES=stages, PRODUCER_REGS=opts["PRODUCER_REGS"], WARPS_N=opts["WARPS_N"], num_warps=bm // 16,
        maxnreg=_maxnreg(bm, occ),
    )  # fmt: skip
    return c


def _kernel_opts(config: str) -> dict:
    """The configuration's kernel constexprs (SCALES_TMA is the launcher's: it passes the scale descriptors)."""
    opts = GLUON_CONFIGS[config][5:]
    opts = _KERNEL_OPTS | opts[0] if opts else _KERNEL_OPTS
    return {k: v for k, v in opts.items() if k != "SCALES_TMA"}


def _scales_tma(config: str) -> bool:
    """Whether the configuration brings per-row scales in by TMA: B scaled per row only (the wgrad); with B in
    128x128 blocks (forward, dgrad) it runs as without the option."""
    opts = GLUON_CONFIGS[config][5:]
    return bool(opts and opts[0].get("SCALES_TMA"))


def _maxnreg(bm: int, occ: int = 1) -> int:
    # The kernel runs consumers (bm / 16 warps) + a producer warpgroup; `occ` programs share the
    # register file (64K): cap * threads * occ <= 65536, a multiple of 8, at most 255 (ptxas ignores
    # more). The warp-specialize pass then moves the producer's unused registers to the consumers
    # with setmaxnreg (e.g. 168 at entry -> 240 a consumer thread for 128-row tiles).
    threads = (bm // 16 + 4) * 32
    return min(248, 65536 // (threads * occ) // 8 * 8)


_SIG_DTYPE = {torch.float8_e4m3fn: "fp8e4nv", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}


def _compile(kernel, config: str, constexprs: dict, signature: dict, divisible: tuple[str, ...], num_warps=None):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    bm, _, _, _, occ, *_ = GLUON_CONFIGS[config]
    signature = signature | {name: "constexpr" for name in constexprs}
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = GluonASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=num_warps or bm // 16, maxnreg=_maxnreg(bm, occ))
    return triton.compile(src, target=GPUTarget("cuda", 90, 64), options=options)


def _desc_sig(block, dtype) -> str:
    return f"tensordesc<{_SIG_DTYPE[dtype]}{list(block)},{_smem_layout(tuple(block), dtype)!r}>"


def compile_sm90(config: str, b_blockwise: bool, out_dtype: torch.dtype = torch.float32):
    """Compile the kernel for sm_90 as launch_gluon would launch `config`, without a GPU: returns the
    triton CompiledKernel (.asm["ptx"], .asm["cubin"]) for reading registers, spills and SASS.
    Same constexprs, num_warps, maxnreg and descriptor block shapes as the launcher; the pointers and
    M, N, K are specialised as 16-divisible (the V3 shapes). Must run outside TRITON_INTERPRET (under
    it the @triton.jit-level imports are interpreter objects); tests run it in a subprocess."""
    bm, bn, stages, group_m, occ, *_ = GLUON_CONFIGS[config]
    constexprs = dict(B_BLOCKWISE=b_blockwise, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=group_m, NUM_STAGES=stages)
    constexprs |= _kernel_opts(config)
    fp8 = torch.float8_e4m3fn
    signature = dict(a_desc=_desc_sig([bm, BLOCK_K], fp8), b_desc=_desc_sig([bn, BLOCK_K], fp8),
                     c_desc=_desc_sig([bm, bn], out_dtype), as_ptr="*fp32", bs_ptr="*fp32", M="i32", N="i32", K="i32")  # fmt: skip
    if _scales_tma(config) and not b_blockwise:
        layout = repr(_scale_layout())
        signature |= dict(as_desc=f"tensordesc<fp32[{bm}],{layout}>", bs_desc=f"tensordesc<fp32[{bn}],{layout}>")
    else:
        constexprs |= dict(as_desc=None, bs_desc=None)
    return _compile(_fp8_gemm_gluon_kernel, config, constexprs, signature, ("as_ptr", "bs_ptr", "M", "N", "K"))


def compile_sm90_grouped(config: str, out_dtype: torch.dtype = torch.float32):
    """compile_sm90 for the grouped kernel as launch_gluon_grouped would launch `config` (S not assumed
    16-divisible: routed row counts are arbitrary)."""
    bm, bn, stages, group_m, occ, *_ = GLUON_CONFIGS[config]
    opts = _kernel_opts(config)
    split = opts.get("SPLIT_CONSUMERS", False)
    constexprs = dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=group_m, NUM_STAGES=stages, PRODUCER_REGS=opts["PRODUCER_REGS"])
    constexprs |= dict(CONSUMER_REGS=opts["CONSUMER_REGS"]) if split else {}
    fp8 = torch.float8_e4m3fn
    ptrs = ("c_ptr", "as_ptr", "bs_ptr", "offs_ptr", "tile_expert_ptr", "tile_row_ptr", "ntiles_ptr")
    signature = dict(a_desc=_desc_sig([bm, BLOCK_K], fp8), b_desc=_desc_sig([bn, BLOCK_K], fp8),
                     c_desc=_desc_sig([bm // 2 if split else bm, bn], out_dtype), c_ptr="*" + _SIG_DTYPE[out_dtype],
                     as_ptr="*fp32", bs_ptr="*fp32", offs_ptr="*i32", tile_expert_ptr="*i32", tile_row_ptr="*i32",
                     ntiles_ptr="*i32", S="i32", N="i32", K="i32")  # fmt: skip
    kernel = _fp8_grouped_split_kernel if split else _fp8_grouped_gluon_kernel
    return _compile(kernel, config, constexprs, signature, (*ptrs, "N", "K"), num_warps=4 if split else None)


def compile_sm90_grouped_wgrad(config: str = WGRAD_DEFAULT_CONFIG, out_dtype: torch.dtype = torch.bfloat16):
    """compile_sm90 for the grouped wgrad as launch_gluon_grouped_wgrad would launch `config`."""
    bm, bn, stages, group_m, occ, *_ = GLUON_CONFIGS[config]
    opts = _kernel_opts(config)
    constexprs = dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=group_m, NUM_STAGES=stages,
                      PRODUCER_REGS=opts["PRODUCER_REGS"], WARPS_N=opts["WARPS_N"])  # fmt: skip
    fp8, layout = torch.float8_e4m3fn, repr(_scale_layout())
    signature = dict(a_desc=_desc_sig([bm, BLOCK_K], fp8), b_desc=_desc_sig([bn, BLOCK_K], fp8),
                     c_desc=_desc_sig([bm, bn], out_dtype), as_desc=f"tensordesc<fp32[{bm}],{layout}>",
                     bs_desc=f"tensordesc<fp32[{bn}],{layout}>", offs_ptr="*i32", N="i32", K="i32", E="i32")  # fmt: skip
    return _compile(_grouped_wgrad_gluon_kernel, config, constexprs, signature, ("offs_ptr", "N", "K"))
