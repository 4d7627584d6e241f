"""The router's group-limited top-k choice (DeepSeek-V3 sec. 2.1.2 and its inference code) as one Triton kernel, for
eager mode.

    choice = scores + bias                                   (bias: the auxiliary-loss-free correction)
    group score = sum of the group's two largest choices;    keep the topk_group best groups
    idx = the top_k largest choices in the kept groups, largest first

In torch this is three `topk` calls and the masking between them: about 0.4 ms of GPU time a V3-size layer's
forward (8192 tokens, 256 experts) on an H200, most of it in the top-k kernels (benchmarks/RESULTS.md, session 16).
Here one program holds a few tokens' rows of scores in registers and picks each maximum by a row reduction.

Ties are broken towards the lower index at every step, as the stable descending sort of the torch path under
torch.compile does (modeling_dsv3._top_k); eager torch's `topk` leaves the choice among exact equals unspecified.
Only the indices come from here: the routing weights are gathered from the scores in torch, where autograd
tracks them.

Shape legend: T tokens, E routed experts in G groups of E / G, Kt experts a token.
"""

from __future__ import annotations

import torch

from . import _triton as tt

triton, tl = tt.triton, tt.tl

# On: modeling_dsv3.DSV3TopkRouter reads it at call time in eager mode on a GPU; False restores the torch code
# (benchmarks/bench_topk_step.py times both).
ROUTE_TOPK_KERNEL = True

if tt.HAS_TRITON:

    @triton.jit
    def _route_topk_kernel(
        scores_ptr, bias_ptr, idx_ptr, T,
        E: tl.constexpr, G: tl.constexpr, TOPK_GROUP: tl.constexpr, KT: tl.constexpr, BLOCK_T: tl.constexpr,
    ):  # fmt: skip
        # One program: the choice of BLOCK_T tokens, their [BLOCK_T, E] rows in registers.
        EG: tl.constexpr = E // G
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = offs_t < T
        offs_e = tl.arange(0, E)
        scores = tl.load(
            scores_ptr + offs_t[:, None].to(tl.int64) * E + offs_e[None, :], mask=mask_t[:, None], other=0.0
        )
        choice = scores + tl.load(bias_ptr + offs_e)[None, :]  # the same fp32 add as torch's
        # A group's score: its largest choice plus its second (the first maximum's position taken out).
        per_group = tl.reshape(choice, [BLOCK_T, G, EG])
        first = tl.argmax(per_group, axis=2, tie_break_left=True)
        in_group = tl.arange(0, EG)[None, None, :]
        second = tl.max(tl.where(in_group == first[:, :, None], float("-inf"), per_group), axis=2)
        group_score = tl.max(per_group, axis=2) + second  # [BLOCK_T, G]
        group_of_expert = offs_e[None, :] // EG
        offs_g = tl.arange(0, G)[None, :]
        kept = tl.zeros([BLOCK_T, E], dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.argmax(group_score, axis=1, tie_break_left=True)
            group_score = tl.where(offs_g == best[:, None], float("-inf"), group_score)
            kept = kept | (group_of_expert == best[:, None])
        choice = tl.where(kept, choice, float("-inf"))
        for k in tl.static_range(KT):
            best = tl.argmax(choice, axis=1, tie_break_left=True)
            tl.store(idx_ptr + offs_t * KT + k, best.to(tl.int64), mask=mask_t)
            choice = tl.where(offs_e[None, :] == best[:, None], float("-inf"), choice)


def supports(num_experts: int, n_group: int) -> bool:
    """Whether route_topk takes this router: E and G powers of two (register tiles), at least two experts a group."""
    powers_of_two = num_experts & (num_experts - 1) == 0 and n_group & (n_group - 1) == 0
    return num_experts > 0 and n_group > 0 and powers_of_two and num_experts // n_group >= 2


def route_topk(
    scores_TE: torch.Tensor, bias_E: torch.Tensor, n_group: int, topk_group: int, top_k: int
) -> torch.Tensor:
    """idx [T, top_k] int64: the experts each token goes to, largest (scores + bias) first (see the module
    docstring). scores_TE: fp32 [T, E] (the sigmoid affinities); bias_E: fp32 [E]."""
    tt.require_fp8("route_topk")  # Triton and a GPU the FP8 kernels run on, or the interpreter
    T, E = scores_TE.shape
    assert supports(E, n_group), f"route_topk: {E} experts in {n_group} groups (powers of two, >= 2 a group)"
    assert 1 <= topk_group <= n_group and 1 <= top_k <= topk_group * (E // n_group), (
        f"route_topk: top_k {top_k} of the experts in {topk_group} of {n_group} groups"
    )
    assert scores_TE.dtype == bias_E.dtype == torch.float32 and bias_E.shape == (E,), "fp32 scores [T, E], bias [E]"
    scores_TE, bias_E = scores_TE.contiguous(), bias_E.contiguous()
    idx = torch.empty(T, top_k, dtype=torch.int64, device=scores_TE.device)
    if T == 0:
        return idx
    block_t = max(1, min(16, 4096 // E))  # [BLOCK_T, E] fp32 rows: 32 values a thread at 4 warps and E = 256
    _route_topk_kernel[(triton.cdiv(T, block_t),)](
        scores_TE, bias_E, idx, T, E=E, G=n_group, TOPK_GROUP=topk_group, KT=top_k, BLOCK_T=block_t, num_warps=4,
    )  # fmt: skip
    return idx
