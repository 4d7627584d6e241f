"""DeepSeek-V3 (arXiv 2412.19437) as transformers PreTrainedModel classes.

Reads top to bottom like DeepSeek's inference/model.py: norm, rope, attention (MLA), MLP, router, experts,
MoE, decoder block, MTP block, model, causal LM. Parameter names are those of the official checkpoint; the
only layout difference (fused 3-D experts, MTP modules in their own list) is handled in checkpoint.py.

Shape suffixes in MoE code: T tokens, D hidden, E routed experts, K experts per token, F expert width,
G groups; `x_TD` is a [T, D] tensor.
"""

from __future__ import annotations

import copy
import functools
import importlib
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from .configuration_dsv3 import DSV3Config

logger = logging.get_logger(__name__)

# transformers 5.24 renamed `past_key_values` to `cache` in forward/generate and in the output classes. We accept
# both names and fill whichever field this transformers' output classes have.
CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


# ---------------------------------------------------------------------------------------------------------- norm
class DSV3RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, scale in the input dtype: the numerics of the official and built-in models.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


# ---------------------------------------------------------------------------------------------------------- rope
def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(config: DSV3Config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [qk_rope_head_dim // 2] and the cos/sin scale, for plain RoPE or YaRN.

    YaRN blends interpolated (1/factor) and original frequencies with a linear ramp between the dimensions that
    complete beta_fast and beta_slow rotations over the original context, as DeepSeek's official code does.
    """
    rope, dim = config.rope_parameters, config.qk_rope_head_dim
    base = rope["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    if rope["rope_type"] == "default":
        return inv_freq, 1.0
    factor, original = rope["factor"], rope["original_max_position_embeddings"]
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float) - low) / max(high - low, 0.001)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if rope.get("attention_factor") is not None:
        cos_sin_scale = rope["attention_factor"]
    elif mscale and mscale_all_dim:
        cos_sin_scale = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
        cos_sin_scale = yarn_mscale(factor)
    return inv_freq, cos_sin_scale


def softmax_scale(config: DSV3Config) -> float:
    """1/sqrt(d_qk), times YaRN's mscale(factor, mscale_all_dim)^2 (the official softmax_scale)."""
    scale = config.qk_head_dim**-0.5
    rope = config.rope_parameters
    if rope["rope_type"] == "yarn" and rope.get("mscale_all_dim"):
        scale *= yarn_mscale(rope["factor"], rope["mscale_all_dim"]) ** 2
    return scale


class DSV3RotaryEmbedding(nn.Module):
    def __init__(self, config: DSV3Config):
        super().__init__()
        self.config = config
        inv_freq, self.cos_sin_scale = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_parameters(self) -> None:
        """Recompute the (non-persistent) frequencies, e.g. after materialising a meta-device model."""
        self.inv_freq = rope_frequencies(self.config)[0].to(self.inv_freq.device)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs_BSR = position_ids[..., None].float() * self.inv_freq.float()  # R = rope_dim / 2
        cos = (freqs_BSR.cos() * self.cos_sin_scale).to(x.dtype)
        sin = (freqs_BSR.sin() * self.cos_sin_scale).to(x.dtype)
        return cos, sin


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (x0, x1), (x2, x3), ... of x [B, S, H, rope_dim] by cos/sin [B, S, rope_dim/2].

    The result is written de-interleaved ([all even-rotated; all odd-rotated]). Queries and cached keys get the same
    permutation, so q.k is unchanged, and it avoids a strided copy (as transformers' built-in does).
    """
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ------------------------------------------------------------------------------------------------------ backends
def optional_kernels(feature: str):
    """The FP8 Triton kernels, checked to run here (else a RuntimeError saying why: no package, no Triton, no CUDA,
    compute capability < 8.9). They ship with the installed package, not with a Hub folder's remote code, so they
    are imported by name at call time and transformers' remote-code import check never asks for them."""
    if torch.compiler.is_compiling():  # importlib cannot be traced; the eager call or the constructor checked already
        kernels = sys.modules.get("modeling_deepseek_v3.kernels")
        if kernels is None:
            raise RuntimeError(f"{feature}: run the model once outside torch.compile first, to load the kernels")
        return kernels
    try:
        kernels = importlib.import_module("modeling_deepseek_v3.kernels")
    except ImportError as err:
        raise RuntimeError(
            f"{feature} needs the deepseek-v3-hf package (pip install 'deepseek-v3-hf[triton]')"
        ) from err
    kernels.require_fp8(feature)
    return kernels


def make_linear(config: DSV3Config, in_features: int, out_features: int, bias: bool = False) -> nn.Linear:
    """The one selection point for the projections that may run in FP8 (MLA, dense and shared MLPs, MTP eh_proj).
    The embedding, router, norms and output head always stay in high precision, as in the paper (section 3.3.1).
    FP8Linear subclasses nn.Linear with the same `weight`, so checkpoints are unchanged."""
    if config.linear_implementation == "fp8":
        kernels = optional_kernels("linear_implementation='fp8'")
        return kernels.FP8Linear(in_features, out_features, bias=bias, cache_weight=config.fp8_weight_cache)
    return nn.Linear(in_features, out_features, bias=bias)


def linear_matrix(module: nn.Module) -> torch.Tensor | None:
    """W with module(x) == x W^T, for code that multiplies by a projection's matrix instead of calling it (absorbed
    MLA's kv_b_proj): a linear layer's weight, or a PEFT LoRA layer's base weight plus its active adapters' scaled
    B A, which the matrix would otherwise leave out of every decoded token. None where no such matrix is at hand (an
    FP8-stored weight, another wrapper, DoRA, an adapter bias, adapter dropout while training): call the module."""
    base = getattr(module, "base_layer", None)
    if base is None:
        weight = getattr(module, "weight", None)
        high_precision = isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.itemsize > 1
        return weight if high_precision else None
    weight = linear_matrix(base)
    if weight is None or getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return weight  # merged: the base holds the adapters' deltas; disabled: the base alone (PEFT's forward)
    if not hasattr(module, "get_delta_weight"):
        return None
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if module.use_dora.get(name, False) or getattr(module.lora_B[name], "bias", None) is not None:
            return None
        if module.training and not isinstance(module.lora_dropout[name], nn.Identity):
            return None
        weight = weight + module.get_delta_weight(name).to(weight.dtype)
    return weight


def shared_input_linears(x: torch.Tensor, *layers: nn.Module) -> tuple[torch.Tensor, ...]:
    """layer(x) for projections of one input. FP8 layers run as one FP8 GEMM (FP8Linear.forward_shared_input: x
    quantised once, one set of kernel launches); any other backend calls each layer."""
    stacked = getattr(type(layers[0]), "forward_shared_input", None)
    return stacked(x, layers) if stacked is not None else tuple(layer(x) for layer in layers)


# ----------------------------------------------------------------------------------------------------- attention
def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention. query [B, H, S, d], key [B, H, T, d], value [B, H, T, v]; mask bool [B, 1, S, T]."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    else:  # no padding and no past: plain causal
        S, T = scores.shape[-2:]
        causal = torch.ones(S, T, dtype=torch.bool, device=scores.device).tril(T - S)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class DSV3Attention(nn.Module):
    """Multi-head Latent Attention.

    K and V of all heads come from one latent c_kv [kv_lora_rank] plus one shared roped key k_pe [qk_rope_head_dim]
    per token; only these (576 values at 671B) are cached. Two paths compute the same function:
    - naive: expand per-head K/V from the latent with kv_b_proj and run a fused attention (training, prefill);
    - absorbed: fold kv_b_proj's key half into the query and its value half into the output, and attend over the
      latent directly (decode: reads only the cache, never builds per-head K/V for cached tokens).
    """

    def __init__(self, config: DSV3Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_groups = 1  # read by transformers' sdpa wrapper: K/V already have every head
        self.is_causal = True
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.scaling = softmax_scale(config)
        H, D, bias = self.num_heads, config.hidden_size, config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = make_linear(config, D, H * self.qk_head_dim)
        else:
            self.q_a_proj = make_linear(config, D, self.q_lora_rank, bias)
            self.q_a_layernorm = DSV3RMSNorm(self.q_lora_rank, eps=config.rms_norm_eps)
            self.q_b_proj = make_linear(config, self.q_lora_rank, H * self.qk_head_dim)
        self.kv_a_proj_with_mqa = make_linear(config, D, self.kv_lora_rank + self.qk_rope_head_dim, bias)
        self.kv_a_layernorm = DSV3RMSNorm(self.kv_lora_rank, eps=config.rms_norm_eps)
        self.kv_b_proj = make_linear(config, self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim))
        self.o_proj = make_linear(config, H * self.v_head_dim, D, bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        B, S, _ = hidden_states.shape
        q_in = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        q, kv_a = shared_input_linears(hidden_states, q_in, self.kv_a_proj_with_mqa)
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q_BSHd = q.view(B, S, self.num_heads, self.qk_head_dim)
        q_nope, q_pe = q_BSHd.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = kv_a.split([self.kv_lora_rank, self.qk_rope_head_dim], -1)
        c_kv = self.kv_a_layernorm(c_kv)
        cos, sin = position_embeddings
        q_pe = apply_rotary_interleaved(q_pe, cos, sin)
        k_pe = apply_rotary_interleaved(k_pe.unsqueeze(2), cos, sin).squeeze(2)

        past_length = 0
        if cache is not None:
            past_length = cache.get_seq_length(self.layer_idx)
            # The latent cache: keys hold c_kv [B, 1, T, kv_lora_rank], values hold k_pe [B, 1, T, rope_dim].
            c_kv, k_pe = cache.update(c_kv.unsqueeze(1), k_pe.unsqueeze(1), self.layer_idx)
            c_kv, k_pe = c_kv.squeeze(1), k_pe.squeeze(1)

        mode = self.config.mla_implementation
        absorb = None
        if mode == "absorbed" or (mode in ("auto", "triton") and past_length > 0):
            absorb = self._kv_b_products()
        if absorb is not None:
            out_BSHv = self._absorbed(absorb, q_nope, q_pe, c_kv, k_pe, attention_mask)
        else:
            out_BSHv = self._naive(q_nope, q_pe, c_kv, k_pe, attention_mask, **kwargs)
        return self.o_proj(out_BSHv.reshape(B, S, self.num_heads * self.v_head_dim))

    def _naive(self, q_nope, q_pe, c_kv_BTR, k_pe_BTd, attention_mask, **kwargs) -> torch.Tensor:
        B, T, _ = c_kv_BTR.shape
        kv = self.kv_b_proj(c_kv_BTR).view(B, T, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, value = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        key = torch.cat([k_nope, k_pe_BTd.unsqueeze(2).expand(-1, -1, self.num_heads, -1)], dim=-1)
        query = torch.cat([q_nope, q_pe], dim=-1)
        impl = self.config._attn_implementation or "eager"
        attention = eager_attention if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
        out, _ = attention(
            self,
            query.transpose(1, 2),  # [B, H, S, qk_head_dim]
            key.transpose(1, 2),  # [B, H, T, qk_head_dim]
            value.transpose(1, 2),  # [B, H, T, v_head_dim]
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return out  # [B, S, H, v_head_dim]

    def _kv_b_products(self):
        """The absorbed path's two products with kv_b_proj, (q_nope -> q_lat, o_lat -> out), or None where its
        matrix is not at hand (the caller then takes the naive path, which calls the module)."""
        kv_b, n, v = self.kv_b_proj, self.qk_nope_head_dim, self.v_head_dim
        if hasattr(kv_b, "absorb_query") and not hasattr(kv_b, "base_layer"):
            # An FP8-stored kv_b_proj (kernels.FP8InferenceLinear) computes both products from its e4m3 weight.
            return functools.partial(kv_b.absorb_query, v=v), functools.partial(kv_b.absorb_output, n=n, v=v)
        weight = linear_matrix(kv_b)
        if weight is None:
            return None
        # kv_b_proj's matrix [H*(n+v), R] viewed per head: W_UK [H, n, R] maps the latent to keys, W_UV [H, v, R] to
        # values.
        w_uk, w_uv = weight.view(self.num_heads, n + v, self.kv_lora_rank).split([n, v], dim=1)

        def absorb_query(q_nope_BSHn):
            return torch.einsum("bshn,hnr->bshr", q_nope_BSHn, w_uk)

        def absorb_output(o_lat_BSHR):
            return torch.einsum("bshr,hvr->bshv", o_lat_BSHR, w_uv)

        return absorb_query, absorb_output

    def _absorbed(self, absorb, q_nope_BSHn, q_pe_BSHr, c_kv_BTR, k_pe_BTr, attention_mask) -> torch.Tensor:
        absorb_query, absorb_output = absorb  # _kv_b_products
        q_lat_BSHR = absorb_query(q_nope_BSHn)  # q_nope . (W_UK c) == (q_nope W_UK) . c
        if self.config.mla_implementation == "triton" and q_lat_BSHR.shape[1] == 1:  # decode: kernels/mla_decode.py
            mla_decode = importlib.import_module("modeling_deepseek_v3.kernels").mla_decode  # package only, like FP8
            mask_BT = None if attention_mask is None else attention_mask[:, 0, 0, :]  # [B, 1, 1, T] -> [B, T]
            o_lat_BHR = mla_decode(q_lat_BSHR[:, 0], q_pe_BSHr[:, 0], c_kv_BTR, k_pe_BTr, self.scaling, mask=mask_BT)
            return absorb_output(o_lat_BHR[:, None])  # [B, 1, H, v]
        scores = torch.einsum("bshr,btr->bhst", q_lat_BSHR, c_kv_BTR)
        scores = (scores + torch.einsum("bshr,btr->bhst", q_pe_BSHr, k_pe_BTr)).float() * self.scaling
        S, T = scores.shape[-2:]
        if attention_mask is None:
            attention_mask = torch.ones(S, T, dtype=torch.bool, device=scores.device).tril(T - S)
        probs = scores.masked_fill(~attention_mask, float("-inf")).softmax(dim=-1).to(c_kv_BTR.dtype)
        o_lat_BSHR = torch.einsum("bhst,btr->bshr", probs, c_kv_BTR)
        return absorb_output(o_lat_BSHR)


# ----------------------------------------------------------------------------------------------------------- MLP
class DSV3MLP(nn.Module):
    def __init__(self, config: DSV3Config, intermediate_size: int | None = None):
        super().__init__()
        width = intermediate_size or config.intermediate_size
        self.gate_proj = make_linear(config, config.hidden_size, width)
        self.up_proj = make_linear(config, config.hidden_size, width)
        self.down_proj = make_linear(config, width, config.hidden_size)
        self.act_fn = ACT2FN[config.hidden_act]
        self._silu = config.hidden_act == "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gated = getattr(type(self.gate_proj), "forward_gated", None)
        if gated is not None:  # FP8: one GEMM for gate and up, and given F.silu itself SwiGLU's kernels (FP8Linear)
            return self.down_proj(gated(x, self.gate_proj, self.up_proj, F.silu if self._silu else self.act_fn))
        gate, up = shared_input_linears(x, self.gate_proj, self.up_proj)
        return self.down_proj(self.act_fn(gate) * up)


# -------------------------------------------------------------------------------------------------------- router
def _top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries along the last dim, largest first, and their indices.

    Under torch.compile by a stable descending sort: inductor lowers sort to a Triton kernel (ir.Sort) that can take
    in the ops producing x, but keeps topk an ATen fallback unless its decompose_sort_ops option is set (the
    router's three topk calls took 4.3 ms of a compiled training step). With the sort (and the compiled loss) the
    compiled step on an H200 went from 2.00x to 2.21x the built-in. Eager by topk, which took less GPU time there
    (the eager sorts: 6.6 ms a step, about 130 us of host time a call). The two choose the same entries but on exact
    ties (the sort keeps the lower index; topk's choice among equals is unspecified)."""
    if torch.compiler.is_compiling():
        values, indices = x.sort(dim=-1, descending=True, stable=True)
        return values[..., :k], indices[..., :k]
    return x.topk(k, dim=-1)


def _bf16_pieces(t: torch.Tensor, n: int) -> list[torch.Tensor]:
    """fp32 t as n bf16 tensors, largest first, whose sum is t to 8n significant bits (n = 3: all of fp32's 24)."""
    pieces = []
    for _ in range(n):
        pieces.append(t.to(torch.bfloat16))
        t = t - pieces[-1].float()
    return pieces


_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(..., out_dtype=): recent torch only


def _mm_fp32(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """a @ b of bf16 operands with fp32 accumulation (each bf16 product is exact in fp32), rounded once to out_dtype
    (fp32, or the operands' bf16: the GEMM's own output, no fp32 result written out and converted after)."""
    if not a.is_cuda:
        return (a.float() @ b.float()).to(out_dtype)
    return torch.mm(a, b) if out_dtype == a.dtype else torch.mm(a, b, out_dtype=out_dtype)


class _RouterLogits(torch.autograd.Function):
    """The router's fp32 logits x W^T for bf16 x as bf16 tensor-core GEMMs with fp32 accumulation, in place of fp32
    GEMMs, which have no tensor-core path short of TF32's 10-bit rounding. Every piece product is exact:
    - forward: W in three bf16 pieces (all 24 bits), one GEMM against their concatenation;
    - dW (fp32): the gradient in three pieces against bf16 x, likewise;
    - dx (rounded to bf16, x's dtype): both in three pieces, the six piece products that reach 2^-24 of the result.
    What remains is the accumulation. On an H200 at V3's router (8192 x 7168 x 256) the tensor cores' fp32 sums
    left the logits 7.9e-6 and dW 9.1e-6 from fp64, cuBLAS's fp32 GEMMs 1.1e-6 and 6.1e-7; both are far inside
    bf16's 2^-9 (the paper keeps the gating in BF16 or FP32; DeepSeek's inference code runs it as a bf16 GEMM).
    Forward+backward 0.85 ms against 2.16 (benchmarks/RESULTS.md, session 11)."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, weight_ED: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_TD, weight_ED)
        E = weight_ED.shape[0]
        parts_T3E = _mm_fp32(x_TD, torch.cat(_bf16_pieces(weight_ED, 3)).t())
        return (parts_T3E[:, 2 * E :] + parts_T3E[:, E : 2 * E]) + parts_T3E[:, :E]  # smallest first

    @staticmethod
    def backward(ctx, grad_TE: torch.Tensor):
        x_TD, weight_ED = ctx.saved_tensors
        E = weight_ED.shape[0]
        g = _bf16_pieces(grad_TE.float(), 3)
        dx = dw = None
        if ctx.needs_input_grad[0]:  # g_i w_j for i + j <= 2; the three left out are below 2^-24
            w = _bf16_pieces(weight_ED, 3)
            g_T6E = torch.cat([g[0], g[1], g[0], g[2], g[1], g[0]], dim=1)
            dx = _mm_fp32(g_T6E, torch.cat([w[0], w[0], w[1], w[0], w[1], w[2]]), x_TD.dtype)
        if ctx.needs_input_grad[1]:
            parts_3ED = _mm_fp32(torch.cat(g, dim=1).t(), x_TD)
            dw = (parts_3ED[2 * E :] + parts_3ED[E : 2 * E]) + parts_3ED[:E]
        return dx, dw


def router_logits(x_TD: torch.Tensor, weight_ED: torch.Tensor) -> torch.Tensor:
    """fp32 x W^T for the router, autocast off (it would run the GEMM in bf16). Training in eager mode on CUDA with
    bf16 x: bf16 GEMMs (_RouterLogits). Else an fp32 F.linear: under torch.compile inductor's mm with an fp32 out
    dtype left dW 1.7e-3 from eager's on an H200; without gradients (decode, prefill) the weight's split, paid
    every call, is not repaid by the one forward GEMM at few tokens, and that case was not measured."""
    with torch.autocast(x_TD.device.type, enabled=False):
        split = _MM_OUT_DTYPE and x_TD.is_cuda and x_TD.dtype == torch.bfloat16 and weight_ED.dtype == torch.float32
        tracked = torch.is_grad_enabled() and (x_TD.requires_grad or weight_ED.requires_grad)
        if split and tracked and not torch.compiler.is_compiling():
            return _RouterLogits.apply(x_TD, weight_ED)
        return F.linear(x_TD.float(), weight_ED.float())


class DSV3TopkRouter(nn.Module):
    """Sigmoid affinities; bias-corrected, group-limited top-k choice; weights from the uncorrected scores.

    e_score_correction_bias only chooses experts (auxiliary-loss-free balancing, paper eq. 16); it never scales
    an expert's output. Both the weight and the bias stay fp32 whatever dtype the model is cast to: a bias step of
    gamma = 1e-3 would vanish in bf16 next to values around 1.
    """

    def __init__(self, config: DSV3Config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.weight.is_floating_point() and self.weight.dtype != torch.float32:
            self.weight.data = self.weight.data.float()
        if self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns router logits [T, E] (fp32), top-k weights [T, K] (fp32) and top-k expert indices [T, K]."""
        logits_TE = router_logits(x_TD, self.weight)
        scores_TE = logits_TE.sigmoid()
        route = None if torch.compiler.is_compiling() else _eager_kernels(scores_TE.device, "router_topk")
        if route is not None and route.ROUTE_TOPK_KERNEL and route.supports(self.n_routed_experts, self.n_group):
            topk_idx_TK = route.route_topk(scores_TE.detach(), self.e_score_correction_bias, self.n_group,
                                           self.topk_group, self.top_k)  # fmt: skip
        else:
            topk_idx_TK = _select_experts(scores_TE + self.e_score_correction_bias, self.n_group, self.topk_group,
                                          self.top_k)  # fmt: skip
        topk_weight_TK = scores_TE.gather(1, topk_idx_TK)
        if self.norm_topk_prob:
            topk_weight_TK = topk_weight_TK / (topk_weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return logits_TE, topk_weight_TK * self.routed_scaling_factor, topk_idx_TK


def _select_experts(choice_TE: torch.Tensor, n_group: int, topk_group: int, top_k: int) -> torch.Tensor:
    """The top_k experts of each token's choice, largest first, among the topk_group groups whose two best choices
    sum highest (the torch form of kernels/router_topk.py, which eager mode on a GPU runs instead)."""
    T, E = choice_TE.shape
    group_TG = _top_k(choice_TE.view(T, n_group, -1), 2)[0].sum(dim=-1)
    group_idx = _top_k(group_TG, topk_group)[1]
    group_mask_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, group_idx, True)
    expert_mask_TE = group_mask_TG.repeat_interleave(E // n_group, dim=1)
    return _top_k(choice_TE.masked_fill(~expert_mask_TE, float("-inf")), top_k)[1]


# ------------------------------------------------------------------------------------------------------- experts
def experts_eager(experts: DSV3Experts, x_TD, topk_idx_TK, topk_weight_TK) -> torch.Tensor:
    """Reference: a loop over all experts. Kept for tests; never the default."""
    out_TD = torch.zeros_like(x_TD, dtype=torch.float32)
    for e in range(experts.num_experts):
        token_idx, slot = torch.where(topk_idx_TK == e)
        gate, up = F.linear(x_TD[token_idx], experts.gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(experts.act_fn(gate) * up, experts.down_proj[e])
        out_TD.index_add_(0, token_idx, y.float() * topk_weight_TK[token_idx, slot, None])
    return out_TD.to(x_TD.dtype)


def count_per_expert(idx: torch.Tensor, num_experts: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """torch.bincount(idx, weight, minlength=num_experts) without its device sync (CUDA bincount reads max(idx) to
    size its output), so that a decode step can be captured in a CUDA graph. Same int64 counts."""
    weight = torch.ones_like(idx) if weight is None else weight.to(idx.dtype)
    return torch.zeros(num_experts, dtype=torch.long, device=idx.device).scatter_add_(0, idx, weight)


def _sort_by_expert(x_TD, topk_idx_TK, num_experts):
    """Rows of x repeated per chosen expert and sorted by expert id (_Gather); their routing (order, token of each
    row, row of each (token, slot)); rows per expert."""
    flat_idx = topk_idx_TK.reshape(-1)
    order = flat_idx.argsort(stable=True)  # [T*K] positions in the flattened (token, slot) grid
    token_of_row = order // topk_idx_TK.shape[1]
    row_of_slot = torch.empty_like(order)
    row_of_slot[order] = torch.arange(order.shape[0], device=order.device)
    row_of_slot = row_of_slot.view(topk_idx_TK.shape)
    counts_E = count_per_expert(flat_idx, num_experts)
    return _Gather.apply(x_TD, token_of_row, row_of_slot), (order, token_of_row, row_of_slot), counts_E


@functools.cache
def _eager_kernels(device: torch.device, module: str):
    """kernels/<module>.py (topk_sum, router_topk) where its kernels run on `device` (the package with Triton, a CUDA
    GPU the FP8 kernels run on), else None: eager mode then stays in torch. Optional like every kernel here: the
    model runs without the package (Hub remote code). Not on the CPU under Triton's interpreter, which the tests set:
    every MoE call of the model's tests would run through it (the whole suite took three times as long)."""
    if device.type != "cuda":
        return None
    try:
        kernels = importlib.import_module("modeling_deepseek_v3.kernels")
        kernels.require_fp8(module)
        # imported by name: the package does not import these submodules, so they are no attributes of it until then
        return importlib.import_module(f"modeling_deepseek_v3.kernels.{module}")
    except (ImportError, RuntimeError):
        return None


def _sum_slots(y_RD, routing, weight_TK=None):
    """out[t] = sum over slots k of (weight[t, k] *) y[row_of_slot[t, k]]: products in y's dtype, summed in fp32,
    rounded once to y's dtype; routing as _sort_by_expert returns it. Under torch.compile by gathering each slot's
    row (_sum_slots_in_slot_order; inductor fuses the loop into one kernel: no atomics, a fixed order; index_add's
    fp32 atomics took 228 us a deepseek-v3-small MoE layer on an H200, benchmarks/RESULTS.md). In eager mode on a GPU
    with the kernels, kernels/topk_sum.py's kernel, the same sum bit for bit (inside the autograd Functions only: it
    has no backward); else one index_add, as each slot's gather would be written out in full there. On an H200 the
    kernel was 8.7 ms faster in a V3-size FP8 layer's forward+backward, and deepseek-v3-small's eager bf16 step ran
    1.42x the built-in with it and slot_dots against 1.10x with the torch code (benchmarks/RESULTS.md, sessions 9 and
    13, bench_topk_step.py). topk_sum.SUM_SLOTS_KERNEL off restores the index_add."""
    order, token_of_row, row_of_slot = routing
    if not torch.compiler.is_compiling():
        topk_sum = _eager_kernels(y_RD.device, "topk_sum")
        tracked = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (y_RD, weight_TK))
        if topk_sum is not None and topk_sum.SUM_SLOTS_KERNEL and not tracked:
            return topk_sum.sum_slots(y_RD, row_of_slot, weight_TK)
        rows_RD = y_RD if weight_TK is None else y_RD * weight_TK.reshape(-1)[order, None].to(y_RD.dtype)
        out_TD = y_RD.new_zeros(row_of_slot.shape[0], y_RD.shape[1], dtype=torch.float32)
        return out_TD.index_add_(0, token_of_row, rows_RD.float()).to(y_RD.dtype)
    return _sum_slots_in_slot_order(y_RD, row_of_slot, weight_TK)


def _sum_slots_in_slot_order(y_RD, row_of_slot, weight_TK=None):
    """_sum_slots by one gather a slot, the fp32 sum taken in slot order."""
    out_TD = None
    for k in range(row_of_slot.shape[1]):
        term = y_RD[row_of_slot[:, k]]
        term = (term if weight_TK is None else term * weight_TK[:, k : k + 1].to(y_RD.dtype)).float()
        out_TD = term if out_TD is None else out_TD + term
    # No `.to` where the dtype already matches: on torch 2.11 an autograd.Function whose forward returned such a no-op
    # `.to` (an fp32 model) was traced by Dynamo with a zero output gradient, so every gradient through it came out
    # zero (benchmarks/RESULTS.md, session 9); torch 2.13 does not do this.
    return out_TD if out_TD.dtype == y_RD.dtype else out_TD.to(y_RD.dtype)


def _slot_dots(dout_TD, y_RD, row_of_slot) -> torch.Tensor:
    """The routing weights' gradient of the weighted top-k sum: dweight[t, k] = dout[t] . y[row_of_slot[t, k]],
    products and sum in fp32, rounded once to y's dtype. In eager mode on a GPU with the kernels, topk_sum's kernel;
    else (torch.compile, or topk_sum.SLOT_DOTS_KERNEL off) each slot's gather, which inductor fuses into one
    reduction."""
    topk_sum = None if torch.compiler.is_compiling() else _eager_kernels(y_RD.device, "topk_sum")
    if topk_sum is not None and topk_sum.SLOT_DOTS_KERNEL:
        return topk_sum.slot_dots(dout_TD, y_RD, row_of_slot)
    dout_TD = dout_TD.float()
    slots = range(row_of_slot.shape[1])
    return torch.stack([(dout_TD * y_RD[row_of_slot[:, k]].float()).sum(-1) for k in slots], 1).to(y_RD.dtype)


class _Gather(torch.autograd.Function):
    """x[token_of_row]: each token's row once per expert it goes to. Backward: each token's rows summed in fp32
    (_sum_slots), where autograd would scatter-add them in x's dtype (index_put with accumulate)."""

    @staticmethod
    def forward(ctx, x_TD, token_of_row, row_of_slot):
        ctx.save_for_backward(token_of_row, row_of_slot)
        return x_TD[token_of_row]

    @staticmethod
    def backward(ctx, dx_RD):
        token_of_row, row_of_slot = ctx.saved_tensors
        return _sum_slots(dx_RD, (None, token_of_row, row_of_slot)), None, None


class _Combine(torch.autograd.Function):
    """out[t] = sum over slots k of weight[t, k] * y[row_of_slot[t, k]] (_sum_slots): each token's expert rows,
    weighted in the model dtype (autograd then keeps y at that width) and summed in fp32. The backward is written
    out because autograd would scatter the slot gathers' gradients back (atomics again) where each row belongs to
    exactly one slot: dy = dout[token_of_row] * the row's weight, a gather."""

    @staticmethod
    def forward(ctx, y_RD, topk_weight_TK, order, token_of_row, row_of_slot):
        ctx.save_for_backward(y_RD, topk_weight_TK, order, token_of_row, row_of_slot)
        return _sum_slots(y_RD, (order, token_of_row, row_of_slot), topk_weight_TK)

    @staticmethod
    def backward(ctx, dout_TD):
        y_RD, topk_weight_TK, order, token_of_row, row_of_slot = ctx.saved_tensors
        dout_TD = dout_TD.to(y_RD.dtype)
        dy = dweight = None
        if ctx.needs_input_grad[0]:
            dy = dout_TD[token_of_row] * topk_weight_TK.reshape(-1)[order, None].to(y_RD.dtype)
        if ctx.needs_input_grad[1]:
            dweight = _slot_dots(dout_TD, y_RD, row_of_slot).to(topk_weight_TK.dtype)
        return dy, dweight, None, None, None


def _combine(y_RD, routing, topk_weight_TK) -> torch.Tensor:
    """Weighted sum of each token's expert rows (_Combine); routing as _sort_by_expert returns it."""
    return _Combine.apply(y_RD, topk_weight_TK, *routing)


def experts_grouped_mm(experts: DSV3Experts, x_TD, topk_idx_TK, topk_weight_TK) -> torch.Tensor:
    """Sort rows by expert, then two grouped GEMMs (torch grouped_mm): no host sync, no loop over experts."""
    x_RD, routing, counts_E = _sort_by_expert(x_TD, topk_idx_TK, experts.num_experts)
    offsets = counts_E.cumsum(0).to(torch.int32)
    # grouped_mm has no autocast rule: under autocast x comes in the autocast dtype (DSV3Experts.forward) and the
    # fp32 master weights are cast here, as autocast casts F.linear's (a no-op when the model is bf16 already).
    w_gate_up, w_down = experts.gate_up_proj.to(x_RD.dtype), experts.down_proj.to(x_RD.dtype)
    gate_up_RF = _grouped_mm(x_RD, w_gate_up.transpose(1, 2), offs=offsets)
    gate, up = gate_up_RF.chunk(2, dim=-1)
    y_RD = _grouped_mm(experts.act_fn(gate) * up, w_down.transpose(1, 2), offs=offsets)
    return _combine(y_RD, routing, topk_weight_TK)


def experts_sorted(experts: DSV3Experts, x_TD, topk_idx_TK, topk_weight_TK) -> torch.Tensor:
    """Sort rows by expert and run one GEMM pair per expert that received rows (torch without grouped_mm)."""
    x_RD, routing, counts_E = _sort_by_expert(x_TD, topk_idx_TK, experts.num_experts)
    pieces = []
    for e, rows in enumerate(x_RD.split(counts_E.tolist())):
        if rows.shape[0]:
            gate, up = F.linear(rows, experts.gate_up_proj[e]).chunk(2, dim=-1)
            pieces.append(F.linear(experts.act_fn(gate) * up, experts.down_proj[e]))
    y_RD = torch.cat(pieces) if pieces else x_RD
    return _combine(y_RD, routing, topk_weight_TK)


def experts_fp8(experts: DSV3Experts, x_TD, topk_idx_TK, topk_weight_TK) -> torch.Tensor:
    kernels = optional_kernels("moe_implementation='fp8'")
    act = F.silu if experts.config.hidden_act == "silu" else experts.act_fn  # F.silu itself: the kernels fuse SwiGLU
    if experts.gate_up_proj.dtype == torch.float8_e4m3fn:  # checkpoint storage (see use_fp8_weight_storage)
        return kernels.fp8_experts_inference(
            x_TD, topk_idx_TK, topk_weight_TK, experts.gate_up_proj, experts.gate_up_proj_scale_inv,
            experts.down_proj, experts.down_proj_scale_inv, act,
        )  # fmt: skip
    # Training: master weights stay high precision and are quantised on each call (or kept while unchanged, with
    # config.fp8_weight_cache).
    return kernels.fp8_experts_forward(
        x_TD, topk_idx_TK, topk_weight_TK, experts.gate_up_proj, experts.down_proj, act,
        weight_cache=experts.fp8_weight_cache,
    )  # fmt: skip


EXPERTS_FUNCTIONS = {
    "eager": experts_eager,
    "grouped_mm": experts_grouped_mm,
    "sorted": experts_sorted,
    "fp8": experts_fp8,
}


def to_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in the autocast dtype where autocast is on for its device, as autocast casts a linear layer's input; else x.
    Under accelerate's bf16 mixed precision (fp32 weights and residual stream) the experts and the FP8 layers then
    compute, and hand on activations, in bf16 like the linear layers autocast handles."""
    device = x.device.type
    return x.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else x


def resolve_experts_implementation(name: str, x: torch.Tensor) -> str:
    """The one place that picks the experts backend; "auto" takes grouped_mm where this torch runs it."""
    if name != "auto":
        return name
    # grouped_mm takes bf16 everywhere; fp32 only in eager mode on the CPU (its fake-tensor rule under
    # torch.compile, like CUDA, asks for bf16).
    fp32_ok = x.device.type == "cpu" and not torch.compiler.is_compiling()
    if _grouped_mm is not None and (x.dtype == torch.bfloat16 or fp32_ok):
        return "grouped_mm"
    return "sorted"


class DSV3Experts(nn.Module):
    """All routed experts as two fused 3-D weights: gate_up_proj [E, 2F, D] (gate rows first), down_proj [E, D, F]."""

    def __init__(self, config: DSV3Config):
        super().__init__()
        self.config = config
        self.num_experts = config.n_routed_experts
        F_, D = config.moe_intermediate_size, config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * F_, D))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, D, F_))
        self.act_fn = ACT2FN[config.hidden_act]
        self.fp8_weight_cache = None
        if config.moe_implementation == "fp8":
            kernels = optional_kernels("moe_implementation='fp8'")  # fail at construction, with the reason
            self.fp8_weight_cache = kernels.QuantizedWeightCache() if config.fp8_weight_cache else None

    def to_fp8_storage(self) -> None:
        """Hold the experts as an official FP8 checkpoint does: e4m3 weights (one byte each, frozen) and fp32
        `*_scale_inv` per 128x128 block, gate blocks then up blocks. Needs moe_intermediate_size % 128 == 0, so that
        no scale block straddles the gate and up halves."""
        E, F2, D = self.gate_up_proj.shape
        if (F2 // 2) % 128:
            raise ValueError(f"FP8 expert storage needs moe_intermediate_size % 128 == 0, got {F2 // 2}")
        device, e4m3 = self.gate_up_proj.device, torch.float8_e4m3fn
        blocks = lambda n: -(-n // 128)  # ceil
        self.gate_up_proj = nn.Parameter(torch.empty(E, F2, D, dtype=e4m3, device=device), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(E, D, F2 // 2, dtype=e4m3, device=device), requires_grad=False)
        self.register_buffer("gate_up_proj_scale_inv", torch.ones(E, blocks(F2), blocks(D), device=device))
        self.register_buffer("down_proj_scale_inv", torch.ones(E, blocks(D), blocks(F2 // 2), device=device))

    def forward(self, x_TD, topk_idx_TK, topk_weight_TK) -> torch.Tensor:
        # The expert GEMMs run in the model dtype, or in the autocast dtype under autocast (accelerate's bf16 mixed
        # precision keeps fp32 weights and an fp32 residual stream): then "auto" still finds grouped_mm, not the
        # sorted loop whose per-expert host sync and data-dependent shapes break torch.compile and CUDA graphs.
        x_TD_compute = to_autocast_dtype(x_TD)
        impl = resolve_experts_implementation(self.config.moe_implementation, x_TD_compute)
        # The routing weights are fp32; the combine weights rows in the compute dtype.
        out_TD = EXPERTS_FUNCTIONS[impl](self, x_TD_compute, topk_idx_TK, topk_weight_TK.to(x_TD_compute.dtype))
        return out_TD.to(x_TD.dtype)


@dataclass
class RouterStats:
    """What one MoE layer reports per forward: router logits [T, E], tokens per expert [E], weighted balance loss."""

    logits: torch.Tensor
    expert_load: torch.Tensor
    seq_aux_loss: torch.Tensor | None


class DSV3MoE(nn.Module):
    def __init__(self, config: DSV3Config):
        super().__init__()
        self.config = config
        self.gate = DSV3TopkRouter(config)
        self.experts = DSV3Experts(config)
        self.shared_experts = (
            DSV3MLP(config, config.moe_intermediate_size * config.n_shared_experts) if config.n_shared_experts else None
        )

    def forward(
        self, x_BSD: torch.Tensor, token_mask_BS: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RouterStats]:
        """token_mask_BS (True = real token) keeps padding out of the expert loads and the balance loss: padded
        positions are still computed, but they must not steer the router-bias update."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        logits_TE, topk_weight_TK, topk_idx_TK = self.gate(x_TD)
        out_TD = self.experts(x_TD, topk_idx_TK, topk_weight_TK)
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        with torch.no_grad():
            # Padding is weighted out rather than indexed out: a boolean index would sync the device.
            real_TK = None if token_mask_BS is None else token_mask_BS.reshape(-1, 1).expand_as(topk_idx_TK)
            load_E = count_per_expert(
                topk_idx_TK.reshape(-1), self.gate.n_routed_experts, None if real_TK is None else real_TK.reshape(-1)
            )
        aux = None
        if self.config.seq_aux_loss_alpha > 0 and torch.is_grad_enabled():
            # "batch" scope: the whole micro-batch as one sequence, i.e. the classic auxiliary loss.
            groups = B if self.config.aux_loss_scope == "sequence" else 1
            aux = self.config.seq_aux_loss_alpha * sequence_balance_loss(
                logits_TE.view(groups, B * S // groups, -1), topk_idx_TK.view(groups, B * S // groups, -1),
                None if token_mask_BS is None else token_mask_BS.reshape(groups, -1),
            )  # fmt: skip
        return out_TD.view(B, S, D), RouterStats(logits_TE, load_E, aux)


def sequence_balance_loss(
    logits_BSE: torch.Tensor, topk_idx_BSK: torch.Tensor, token_mask_BS: torch.Tensor | None = None
) -> torch.Tensor:
    """Complementary sequence-wise balance loss, paper eq. 17-20, averaged over the batch (without alpha).

    f_i = E / (K T) * #{tokens of the sequence routed to i};  P_i = mean_t s_{i,t} / sum_j s_{j,t};  L = sum_i f_i P_i,
    over the T real (unmasked) tokens of each sequence. f counts choices (no gradient); the gradient flows through
    the normalised affinities P.
    """
    B, S, E = logits_BSE.shape
    K = topk_idx_BSK.shape[-1]
    mask_BS = torch.ones(B, S, device=logits_BSE.device) if token_mask_BS is None else token_mask_BS.float()
    tokens_B1 = mask_BS.sum(-1, keepdim=True).clamp(min=1)
    scores = logits_BSE.float().sigmoid()
    p_BE = ((scores / scores.sum(-1, keepdim=True)) * mask_BS[..., None]).sum(dim=1) / tokens_B1
    counts_BE = torch.zeros(B, E, device=logits_BSE.device).scatter_add_(
        1, topk_idx_BSK.reshape(B, S * K), mask_BS.repeat_interleave(K, dim=1)
    )
    f_BE = counts_BE * E / (K * tokens_B1)
    return (f_BE * p_BE).sum(-1).mean()


# --------------------------------------------------------------------------------------------------------- block
class DSV3DecoderLayer(nn.Module):
    def __init__(self, config: DSV3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = DSV3Attention(config, layer_idx)
        self.mlp = DSV3MoE(config) if config.is_moe_layer(layer_idx) else DSV3MLP(config)
        self.input_layernorm = DSV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DSV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, token_mask=None, **kwargs):
        h = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache=cache, **kwargs
        )
        if isinstance(self.mlp, DSV3MoE):
            y, stats = self.mlp(self.post_attention_layernorm(h), token_mask)
        else:
            y, stats = self.mlp(self.post_attention_layernorm(h)), None
        return h + y, stats


class DSV3MTPLayer(DSV3DecoderLayer):
    """MTP module k (paper section 2.2): h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]), then a full
    decoder block; logits come from shared_head.norm and the main model's output head.

    The concat order (embedding first) is the one official MTP weights were trained with (as vLLM and SGLang
    load them); the paper writes the two halves the other way round.
    """

    def __init__(self, config: DSV3Config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.enorm = DSV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hnorm = DSV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.eh_proj = make_linear(config, 2 * config.hidden_size, config.hidden_size)
        self.shared_head = nn.Module()
        self.shared_head.norm = DSV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, hidden_states, token_embeds, position_embeddings, attention_mask, cache=None, token_mask=None, **kwargs
    ):
        """Returns (h, router stats, shared_head.norm(h)): h feeds depth k + 1, the normed copy the output head. The
        norm runs here, inside the module, because FSDP2 gathers a unit's parameters only for its own forward."""
        h = self.eh_proj(torch.cat([self.enorm(token_embeds), self.hnorm(hidden_states)], dim=-1))
        h, stats = super().forward(h, position_embeddings, attention_mask, cache, token_mask, **kwargs)
        return h, stats, self.shared_head.norm(h)


def build_attention_mask(
    attention_mask: torch.Tensor | None, batch: int, query_length: int, past_length: int, device
) -> torch.Tensor | None:
    """Boolean [B, 1, S, T] mask (True = attend), or None when plain causal attention from position 0 is exact.

    Built here rather than by transformers' mask utilities, whose signature changed across 5.x. A 4-D mask (from a
    static cache in generate) passes through, converted to boolean. A query that may attend to nothing (a left-pad
    position) is allowed to attend everywhere instead: its output is never used, but an all-masked softmax is NaN,
    which the cache would then carry into real rows (0 weight x NaN value = NaN), as transformers' masks also avoid.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        return mask | ~mask.any(dim=-1, keepdim=True)
    total = past_length + query_length
    if attention_mask is None and past_length == 0:
        return None
    q_pos = torch.arange(past_length, total, device=device)
    mask = (torch.arange(total, device=device)[None, :] <= q_pos[:, None])[None, None]  # [1, 1, S, T]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -total:].bool()
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask.expand(batch, 1, query_length, total)


def use_fp8_weight_storage(model: nn.Module) -> None:
    """Store weights as an official FP8 checkpoint does (about one byte per parameter, inference only): with
    linear_implementation='fp8' every FP8-capable projection becomes an FP8InferenceLinear (e4m3 weight plus
    weight_scale_inv), and with moe_implementation='fp8' the routed experts switch to e4m3 storage. The output head,
    embedding, router and norms keep their dtype. Call on a meta-device model, before its weights are loaded."""
    config = model.config
    if config.linear_implementation == "fp8":
        kernels = optional_kernels("FP8 weight storage")
        head = getattr(model, "lm_head", None)
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear) and child is not head:
                    fp8 = kernels.FP8InferenceLinear(child.in_features, child.out_features, bias=child.bias is not None,
                                                     device=child.weight.device, dtype=child.weight.dtype)  # fmt: skip
                    setattr(module, name, fp8)
    if config.moe_implementation == "fp8":
        for module in model.modules():
            if isinstance(module, DSV3Experts):
                module.to_fp8_storage()


def real_tokens(attention_mask: torch.Tensor | None, query_length: int) -> torch.Tensor | None:
    """[B, S] booleans marking the current chunk's real (unpadded) tokens, from a 2-D mask; None when all are."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    return attention_mask[:, -query_length:].bool()


# ---------------------------------------------------------------------------------------------------- pretrained
class DSV3PreTrainedModel(PreTrainedModel):
    config_class = DSV3Config
    config: DSV3Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DSV3DecoderLayer", "DSV3MTPLayer"]
    _keep_in_fp32_modules_strict = ["e_score_correction_bias", "gate.weight"]
    _supports_sdpa = True
    _supports_flash_attn = False  # qk and v head dims differ (192 vs 128)
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # the sorted/eager expert paths sync on counts; grouped_mm does not

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, DSV3RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, DSV3TopkRouter):
            module.weight.normal_(0.0, std)
            module.e_score_correction_bias.zero_()
        elif isinstance(module, DSV3Experts):
            module.gate_up_proj.normal_(0.0, std)
            module.down_proj.normal_(0.0, std)
        elif isinstance(module, DSV3RotaryEmbedding):
            module.reset_parameters()

    def moe_layers(self) -> list[DSV3MoE]:
        """Every MoE layer, main model then MTP, in a fixed order (the rows of `expert_load`)."""
        return [m for m in self.modules() if isinstance(m, DSV3MoE)]

    def compile_layers(self, **compile_kwargs) -> None:
        """Regional compilation: torch.compile each decoder and MTP layer in place (`nn.Module.compile`). The layers
        share one code path, so torch compiles it once and reuses it, which starts much faster than compiling the
        whole model; the embedding and the head stay eager. Training and prefill only: generation's growing cache
        shapes would recompile at every step (fast_decode.py has the compiled decode step).

        The loss function is compiled too (the main and the MTP cross-entropy), so that inductor can fuse its fp32
        upcast of the logits into the log-softmax instead of materialising fp32 [tokens, vocab] logits (8.5 GB at
        vocab 129,280 and 16K tokens). On an H200 the compiled bf16 train step of benchmarks/bench_model_gpu.py
        (vocab 32000) peaked at 22.8 GiB after this change against 26.7 GiB the session before (the router's
        top-k changed in between too). Never under CUDA graphs (`mode` is dropped for it): its input, the logits, is a
        new tensor each call, which a graph would first copy."""
        for module in self.modules():
            if isinstance(module, (DSV3DecoderLayer, DSV3MTPLayer)):
                module.compile(**compile_kwargs)
        loss_kwargs = {k: v for k, v in compile_kwargs.items() if k != "mode"}
        self.loss_function = torch.compile(self.loss_function, **loss_kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load an official-format (or transformers-saved) folder: see `checkpoint.load_pretrained`."""
        from .checkpoint import load_pretrained

        return load_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Write config, generation config and sharded safetensors in the official DeepSeek-V3 key layout."""
        from .checkpoint import save_pretrained

        return save_pretrained(self, save_directory, *args, **kwargs)


@dataclass
class DSV3ModelOutput(MoeModelOutputWithPast):
    """Adds per-layer expert loads [n_moe_layers, E] and the weighted sequence-wise balance loss."""

    expert_load: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class DSV3Model(DSV3PreTrainedModel):
    def __init__(self, config: DSV3Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DSV3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DSV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DSV3RotaryEmbedding(config)
        # Stored in the official checkpoint as model.layers.{num_hidden_layers + k}; see checkpoint.py.
        self.mtp_layers = nn.ModuleList(
            DSV3MTPLayer(config, config.num_hidden_layers + k) for k in range(config.num_nextn_predict_layers)
        )
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _run_layer(self, layer, *args):
        # Positional arguments only: reentrant checkpointing takes no keyword arguments.
        if self.gradient_checkpointing and self.training:
            return self._gradient_checkpointing_func(layer.__call__, *args)
        return layer(*args)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> DSV3ModelOutput:
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = DynamicCache()
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, S, _ = inputs_embeds.shape
        past_length = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + S, device=inputs_embeds.device)[None]
        mask = build_attention_mask(attention_mask, B, S, past_length, inputs_embeds.device)
        token_mask = real_tokens(attention_mask, S)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        hidden_states, all_hidden, all_stats = inputs_embeds, [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, stats = self._run_layer(layer, hidden_states, position_embeddings, mask, cache, token_mask)
            if stats is not None:
                all_stats.append(stats)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        return self._output(hidden_states, cache, all_hidden, all_stats, output_router_logits)

    def mtp_forward(
        self,
        hidden_states: torch.Tensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
    ) -> tuple[list[torch.Tensor], list[RouterStats]]:
        """Training-time MTP over full sequences: depth k sees token t_{i+k} at position i (ids rolled left by k;
        the last k positions see padding and must carry no label). Returns each depth's output-head input
        (shared_head.norm of its hidden states) and router stats."""
        B, S, _ = hidden_states.shape
        if position_ids is None:
            position_ids = torch.arange(S, device=hidden_states.device)[None]
        mask = build_attention_mask(attention_mask, B, S, 0, hidden_states.device)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        token_mask = real_tokens(attention_mask, S)
        if token_mask is None:
            token_mask = torch.ones(B, S, dtype=torch.bool, device=hidden_states.device)
        outputs, all_stats = [], []
        for k, layer in enumerate(self.mtp_layers, start=1):
            shifted = F.pad(input_ids[:, k:], (0, k), value=self.config.pad_token_id or 0)
            # Position i is real at depth k only if token i+k is real too (the last k positions embed padding).
            sees_real = token_mask & F.pad(token_mask[:, k:], (0, k), value=False)
            hidden_states, stats, head_input = self._run_layer(
                layer, hidden_states, self.embed_tokens(shifted), position_embeddings, mask, None, sees_real
            )
            outputs.append(head_input)
            if stats is not None:
                all_stats.append(stats)
        return outputs, all_stats

    def _output(self, hidden_states, cache, all_hidden, all_stats, output_router_logits) -> DSV3ModelOutput:
        losses = [s.seq_aux_loss for s in all_stats if s.seq_aux_loss is not None]
        return DSV3ModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) or None,
            router_logits=tuple(s.logits for s in all_stats) if output_router_logits else None,
            expert_load=torch.stack([s.expert_load for s in all_stats]) if all_stats else None,
            aux_loss=torch.stack(losses).sum() if losses else None,
            **{CACHE_FIELD: cache},
        )


def _merge_stats(expert_load, aux_loss, stats: list[RouterStats]):
    """Append MTP layers' loads and balance losses to the main model's (either side may have no MoE layer)."""
    loads = ([expert_load] if expert_load is not None else []) + [s.expert_load[None] for s in stats]
    losses = ([aux_loss] if aux_loss is not None else []) + [
        s.seq_aux_loss for s in stats if s.seq_aux_loss is not None
    ]
    return (torch.cat(loads) if loads else None), (torch.stack(losses).sum() if losses else None)


@dataclass
class DSV3CausalLMOutput(MoeCausalLMOutputWithPast):
    """`loss` = lm_loss + mtp_loss + aux_loss, the objective to train. The parts are reported apart: lm_loss
    (next-token cross-entropy), mtp_loss ((lambda / D) * sum of the D MTP cross-entropies), aux_loss (alpha-weighted
    sequence-wise balance loss). expert_load [n_moe_layers, E] counts tokens per expert (main layers, then MTP)."""

    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None


# GenerationConfig values that mean "off" although they differ from its defaults (callers such as TRL spell them out).
NEUTRAL_GENERATION_VALUES = {
    "num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "repetition_penalty": 1.0, "top_k": 0,
    "top_p": 1.0, "typical_p": 1.0, "temperature": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_repetition_penalty": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_new_tokens": 0, "min_length": 0,
}  # fmt: skip


def resolve_generate_call(
    model: PreTrainedModel, inputs, generation_config, kwargs: dict, supported: set[str], feature: str
) -> tuple[torch.LongTensor, torch.Tensor | None, GenerationConfig, int]:
    """Resolve a generate() call for the package's own decoders as GenerationMixin would: the generation config
    (the given one or the model's, updated by keywords), input_ids, attention_mask (guessed from pad_token_id when
    absent) and the number of new tokens. Any other keyword, and any config value outside `supported` that differs
    from transformers' default, is refused with a ValueError naming it: silently ignoring an option would change
    the output. None, False and the values in NEUTRAL_GENERATION_VALUES change nothing and pass."""
    kwargs = dict(kwargs)
    input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
    if input_ids is None:
        raise ValueError(f"{feature} needs input_ids")
    attention_mask = kwargs.pop("attention_mask", None)
    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    unused = config.update(**kwargs)
    changed = {
        k for k, v in config.to_diff_dict().items()
        if k not in supported and v is not None and v is not False
        and not (k in NEUTRAL_GENERATION_VALUES and NEUTRAL_GENERATION_VALUES[k] == v)
    }  # fmt: skip
    unsupported = sorted(set(unused) | changed)
    if unsupported:
        raise ValueError(f"{feature} does not support: {', '.join(unsupported)}")
    max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - input_ids.shape[1]
    if attention_mask is None and config.pad_token_id is not None and config.pad_token_id != config.eos_token_id:
        attention_mask = input_ids.ne(config.pad_token_id).long()  # generate()'s guess when no mask is passed
    return input_ids, attention_mask, config, max_new


class DSV3ForCausalLM(DSV3PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DSV3Config):
        super().__init__(config)
        self.model = DSV3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def generate(self, inputs=None, generation_config=None, use_mtp: bool = False, **kwargs):
        """GenerationMixin.generate, plus two decoders of this package's own:
        - `use_mtp=True`: MTP self-speculative decoding (speculative.py);
        - `cache_implementation="static"` (keyword or generation config; TRL's `--cache_implementation static`):
          a preallocated latent cache and a CUDA-graph-replayed decode step (fast_decode.py), greedy or sampled.
        Both refuse generation options they do not implement rather than ignore them."""
        if use_mtp:
            from .speculative import generate_with_mtp  # lazy: speculative.py imports this module

            return generate_with_mtp(self, inputs, generation_config, **kwargs)
        cache_implementation = kwargs.get("cache_implementation",
                                          getattr(generation_config or self.generation_config, "cache_implementation", None))  # fmt: skip
        if cache_implementation == "static":
            from .fast_decode import generate_static  # lazy: fast_decode.py imports this module

            return generate_static(self, inputs, generation_config, **kwargs)
        return super().generate(inputs, generation_config, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> DSV3CausalLMOutput:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits,
        )
        hidden_states = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        num_items = kwargs.get("num_items_in_batch")

        lm_loss = mtp_loss = None
        expert_load, aux_loss = out.expert_load, out.aux_loss
        if labels is not None:
            lm_loss = self.loss_function(logits, labels, self.config.vocab_size, num_items_in_batch=num_items)
            depth = self.config.num_nextn_predict_layers
            if depth and self.config.mtp_loss_weight > 0:
                if input_ids is None:
                    raise ValueError("The MTP loss needs input_ids (it embeds the future tokens).")
                mtp_hidden, mtp_stats = self.model.mtp_forward(hidden_states, input_ids, attention_mask, position_ids)
                mtp_loss = 0.0
                for k, h in enumerate(mtp_hidden, start=1):
                    mtp_logits = self.lm_head(h)
                    # Position i predicts t_{i+k+1}: labels rolled left by k (the loss shifts by one more).
                    mtp_labels = F.pad(labels[:, k:], (0, k), value=-100)
                    mtp_loss = mtp_loss + self.loss_function(
                        mtp_logits, mtp_labels, self.config.vocab_size, num_items_in_batch=num_items
                    )
                mtp_loss = self.config.mtp_loss_weight / depth * mtp_loss
                expert_load, aux_loss = _merge_stats(expert_load, aux_loss, mtp_stats)
            if aux_loss is not None and num_items is not None:
                # The Trainer sums micro-batch losses normalised by the whole step's label count (num_items) and
                # does not divide by the accumulation steps; weight this micro-batch's mean balance loss likewise.
                aux_loss = aux_loss * (labels[:, 1:] != -100).sum() / num_items
        loss = None
        if lm_loss is not None:
            loss = lm_loss + (mtp_loss if mtp_loss is not None else 0) + (aux_loss if aux_loss is not None else 0)
        return DSV3CausalLMOutput(
            loss=loss,
            lm_loss=lm_loss,
            mtp_loss=mtp_loss,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=out.hidden_states,
            router_logits=out.router_logits,
            expert_load=expert_load,
            **{CACHE_FIELD: getattr(out, CACHE_FIELD)},
        )


__all__ = ["DSV3PreTrainedModel", "DSV3Model", "DSV3ForCausalLM", "DSV3CausalLMOutput"]
