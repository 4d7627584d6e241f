"""FP8-checkpoint inference vs the dequantised bf16 model, side by side in one process (issue 3), one GPU.

An official FP8 checkpoint holds every projection as e4m3 plus `weight_scale_inv` per 128x128 block. Loaded with
`linear_implementation="fp8", moe_implementation="fp8"`, the model keeps them so (about one byte a parameter) and
computes with the block-scaled kernels; the comparison is the same checkpoint dequantised to bf16 (what
transformers' built-in loader makes of it), running cuBLAS bf16 and torch's grouped_mm. Both models here hold the
same e4m3 weights: random bf16 weights are quantised block-wise by the kernel, and the bf16 model's weights are
overwritten with their dequantisation (no disk round trip: at V3's widths a checkpoint is tens of GB).

Reported, for each model: the bytes its weights and buffers hold on the GPU (and per parameter of the quantised
matrices); a prefill forward (median of timed runs after warm-up); greedy decoding through generate() and through
fast_greedy_generate (static latent cache, CUDA graph), new tokens/s, the FP8 model's decoding also with its
projections always through quantize_act + fp8_gemm (`fp8_two_step` row, fp8_linear.GEMV_MAX_ROWS = 0), to show
what the default's fp8_gemv for the small projections gives; and the FP8 logits' relative error against
the dequantised model's, with the bound that tests/kernels/test_fp8_inference.py derives (each rounded GEMM input
adds ~0.026 RMS relative error, in quadrature along the deepest path: 5 rounded GEMMs a layer).

Default shape: DeepSeek-V3's widths (hidden 7168, 128 heads, MLA ranks 1536/512, 256 experts top-8 of width 2048,
one shared expert, dense width 18432, vocab 129,280) with two layers, the first dense and the second MoE, no MTP:
about 14B parameters (28 GB in bf16).

    PYTHONUNBUFFERED=1 python3 benchmarks/bench_fp8_inference.py          # writes $OUT/bench_fp8_inference.json
    TRITON_INTERPRET=1 python3 benchmarks/bench_fp8_inference.py --tiny   # CPU smoke run, debug config
"""

# ruff: noqa: B023  (each lambda is timed inside its own loop iteration)
from __future__ import annotations

import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from modeling_deepseek_v3 import DSV3Config, DSV3ForCausalLM
from modeling_deepseek_v3.fast_decode import fast_greedy_generate
from modeling_deepseek_v3.modeling_dsv3 import DSV3Experts, DSV3MoE, use_fp8_weight_storage

V3_LAYERS = dict(num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=0)
DEBUG = Path(__file__).resolve().parents[1] / "hub_configs" / "deepseek-v3-debug"
FP8 = dict(linear_implementation="fp8", moe_implementation="fp8")
# (batch, prompt length) of the prefill and decode cases; new tokens a decode run
PREFILL = ((1, 4096), (4, 2048))
DECODE = ((1, 128), (16, 128))
NEW_TOKENS = 64
DEFAULT_GEMV_ROWS = importlib.import_module("modeling_deepseek_v3.kernels.fp8_linear").GEMV_MAX_ROWS
PER_ROUNDING = 0.026  # RMS relative error of one e4m3 rounding of a GEMM input (tests/kernels/conftest.py)


def config(tiny: bool, **overrides) -> DSV3Config:
    if tiny:
        return DSV3Config.from_pretrained(DEBUG, moe_intermediate_size=128, num_nextn_predict_layers=0, **overrides)
    return DSV3Config(**V3_LAYERS, **overrides)  # the official config.json's widths are DSV3Config's defaults


def quantised_matrices(model: nn.Module) -> dict[str, nn.Module]:
    """What use_fp8_weight_storage stores in e4m3: every nn.Linear but the output head (FP8InferenceLinear once
    stored so), and the routed experts."""
    from modeling_deepseek_v3.kernels import FP8InferenceLinear

    kinds = (nn.Linear, FP8InferenceLinear, DSV3Experts)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds) and m is not model.lm_head}


@torch.no_grad()
def build_pair(tiny: bool, device: str):
    """(dequantised bf16 model, FP8 model) holding the same e4m3 weights."""
    from modeling_deepseek_v3.kernels import dequantize_weight, quantize_weight

    torch.manual_seed(0)
    with torch.device(device):
        ref = DSV3ForCausalLM(config(tiny)).to(torch.bfloat16).eval()  # the router stays fp32
    for p in ref.parameters():  # real-looking weights: routing spreads over the experts
        if p.dim() >= 2:
            p.normal_(std=0.02)
    state = {}
    for name, module in quantised_matrices(ref).items():
        for w_name in ("gate_up_proj", "down_proj") if isinstance(module, DSV3Experts) else ("weight",):
            w = getattr(module, w_name)
            q, s = quantize_weight(w.data.contiguous())
            w.data.copy_(dequantize_weight(q, s, w.dtype))  # the bf16 model is the dequantised checkpoint
            state[f"{name}.{w_name}"], state[f"{name}.{w_name}_scale_inv"] = q, s
    with torch.device("meta"):
        fp8 = DSV3ForCausalLM(config(tiny, **FP8)).to(torch.bfloat16)
    use_fp8_weight_storage(fp8)
    fp8 = fp8.to_empty(device=device).eval()
    full = {**ref.state_dict(), **state}
    missing, unexpected = fp8.load_state_dict({k: v for k, v in full.items() if k in fp8.state_dict()}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    persistent = fp8.state_dict().keys()
    ref_buffers = dict(ref.named_buffers())
    for name, buf in fp8.named_buffers():  # non-persistent buffers (rotary inv_freq) are not in a state dict
        if name not in persistent:
            buf.copy_(ref_buffers[name])
    for m in (ref, fp8):
        m.config._attn_implementation = "sdpa"
    return ref, fp8


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return round(((got.float() - ref.float()).norm() / ref.float().norm()).item(), 4)


@torch.no_grad()
def same_routing_logits(ref: nn.Module, fp8: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both models' logits with the FP8 model's routers replaying the bf16 model's choices (logits, weights and
    experts), layer by layer: the FP8 GEMMs' error without the expert flips that near-ties in a random router
    make of it."""
    taken = []
    record = [layer.mlp.gate.register_forward_hook(lambda _m, _a, out: taken.append(out))
              for layer in ref.model.layers if isinstance(layer.mlp, DSV3MoE)]  # fmt: skip
    a = ref(ids).logits
    for h in record:
        h.remove()
    replay = iter(taken)
    pinned = [layer.mlp.gate.register_forward_hook(lambda _m, _a, _out: next(replay))
              for layer in fp8.model.layers if isinstance(layer.mlp, DSV3MoE)]  # fmt: skip
    b = fp8(ids).logits
    for h in pinned:
        h.remove()
    return a, b


@torch.no_grad()
def first_layer_outputs(ref: nn.Module, fp8: nn.Module, ids: torch.Tensor) -> dict[str, float]:
    """The first (dense) layer's output three ways: the bf16 model, the same model with every quantised linear's
    input rounded to e4m3 in 1x128 tiles first (the recipe simulated in torch: kernels.quantize_act, then
    dequantize_act_ref), and the FP8 model. Against bf16: the recipe's error and the kernels' in one layer, which
    should be equal. FP8 against the simulation: what the kernels' own summation (fp32 promotion every 128 K, bf16
    outputs) makes of it, which the next roundings and the SwiGLU gate amplify as they amplify any such difference
    (benchmarks/RESULTS.md measures how much)."""
    from modeling_deepseek_v3.kernels import dequantize_act_ref, quantize_act

    def fake_quant(_m, args):
        x = args[0]
        q, s = quantize_act(x.reshape(-1, x.shape[-1]).contiguous())
        return (dequantize_act_ref(q, s).to(x.dtype).view_as(x),)

    def output_of(model: nn.Module, hooked: list[nn.Module] = ()) -> torch.Tensor:
        out = []
        hooks = [m.register_forward_pre_hook(fake_quant) for m in hooked]
        hooks.append(model.model.layers[0].register_forward_hook(lambda _m, _a, o: out.append(o[0])))
        model(ids)
        for h in hooks:
            h.remove()
        return out[0]

    linears = [m for m in quantised_matrices(ref).values() if isinstance(m, nn.Linear)]
    bf16, sim, got = output_of(ref), output_of(ref, linears), output_of(fp8)
    return dict(
        fp8_vs_bf16=rel_err(got, bf16), fp8_vs_simulated=rel_err(got, sim), simulated_vs_bf16=rel_err(sim, bf16)
    )


def set_gemv_rows(rows: int) -> None:
    """FP8InferenceLinear takes fp8_gemv up to `rows` rows (0: never)."""
    importlib.import_module("modeling_deepseek_v3.kernels.fp8_linear").GEMV_MAX_ROWS = rows


def weight_bytes(model: nn.Module) -> dict:
    tensors = list(model.parameters()) + list(model.buffers())
    total = sum(t.numel() * t.element_size() for t in tensors)
    quantised = [p for m in quantised_matrices(model).values() for p in m.parameters(recurse=False) if p.dim() >= 2]
    q_bytes = sum(p.numel() * p.element_size() for p in quantised)
    q_params = sum(p.numel() for p in quantised)
    return dict(gib=round(total / 2**30, 3), quantised_params_b=round(q_params / 1e9, 3),
                bytes_per_quantised_param=round(q_bytes / max(q_params, 1), 3))  # fmt: skip


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device: str, warmup: int, runs: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    tiny = "--tiny" in sys.argv
    device = "cpu" if tiny else "cuda"
    prefill, decode, new_tokens = (((1, 16),), ((2, 8),), 3) if tiny else (PREFILL, DECODE, NEW_TOKENS)
    warmup, runs = (0, 1) if tiny else (2, 5)
    ref, fp8 = build_pair(tiny, device)
    vocab = ref.config.vocab_size
    gen = torch.Generator(device=device).manual_seed(1)
    result = {"config": "deepseek-v3-debug" if tiny else "V3 widths, 2 layers (dense + MoE)", "device": device}
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    result["torch"] = torch.__version__

    # Agreement: the same prompts through both; the bound as tests/kernels/test_fp8_inference.py derives it.
    ids = torch.randint(0, vocab, prefill[0], device=device, generator=gen)
    a, b = ref(ids).logits, fp8(ids).logits
    rounded = 5 * ref.config.num_hidden_layers  # q_a -> q_b -> o_proj, gate/up -> down, a layer
    result["logits_rel_err"] = rel_err(b, a)
    result["top1_agreement"] = round((a.argmax(-1) == b.argmax(-1)).float().mean().item(), 4)
    a, b = same_routing_logits(ref, fp8, ids)
    result["logits_rel_err_same_routing"] = rel_err(b, a)
    result["top1_agreement_same_routing"] = round((a.argmax(-1) == b.argmax(-1)).float().mean().item(), 4)
    result["logits_rel_err_estimate"] = round(rounded**0.5 * PER_ROUNDING, 4)
    result["first_layer_rel_err"] = first_layer_outputs(ref, fp8, ids)
    del a, b

    # fp8_two_step: the same FP8 model without fp8_gemv (fp8_linear.GEMV_MAX_ROWS = 0); prefill's thousands of rows
    # never take it, so only decoding is timed again.
    variants = (("bf16_dequantised", ref, 0), ("fp8", fp8, DEFAULT_GEMV_ROWS), ("fp8_two_step", fp8, 0))
    for name, model, gemv_rows in variants:
        set_gemv_rows(gemv_rows)
        row = {"weights": weight_bytes(model)}
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
        for B, S in prefill if name != "fp8_two_step" else ():
            x = torch.randint(0, vocab, (B, S), device=device, generator=gen)
            t = median_time(lambda: model(x, logits_to_keep=1), device, warmup, runs)
            row[f"prefill_{B}x{S}"] = dict(ms=round(t * 1e3, 2), tokens_per_s=round(B * S / t))
        for B, S in decode:
            x = torch.randint(2, vocab, (B, S), device=device, generator=gen)
            mask = torch.ones_like(x)
            kw = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            t = median_time(lambda: model.generate(x, **kw), device, min(warmup, 1), max(runs // 2, 1))
            row[f"generate_{B}x{S}"] = dict(s=round(t, 3), new_tokens_per_s=round(B * new_tokens / t, 1))
            try:
                t = median_time(lambda: fast_greedy_generate(model, x, mask, max_new_tokens=new_tokens), device,
                                min(warmup, 1), max(runs // 2, 1))  # fmt: skip
                row[f"fast_generate_{B}x{S}"] = dict(s=round(t, 3), new_tokens_per_s=round(B * new_tokens / t, 1))
            except Exception as e:  # noqa: BLE001 - reported, not hidden: the other rows still count
                row[f"fast_generate_{B}x{S}"] = f"{type(e).__name__}: {e}"[:300]
        if device == "cuda":
            row["peak_above_held_gib"] = round((torch.cuda.max_memory_allocated() - held) / 2**30, 2)
        result[name] = row
        print(name, json.dumps(row), flush=True)
    set_gemv_rows(DEFAULT_GEMV_ROWS)
    for name in ("fp8", "fp8_two_step"):
        speedups = {}
        for key, v in result[name].items():
            base = result["bf16_dequantised"].get(key)
            if isinstance(v, dict) and isinstance(base, dict):
                unit = (
                    "tokens_per_s" if "tokens_per_s" in v else "new_tokens_per_s" if "new_tokens_per_s" in v else None
                )
                if unit:
                    speedups[key] = round(v[unit] / base[unit], 3)
        result[f"{name}_vs_bf16"] = speedups
    result["weights_ratio"] = round(result["fp8"]["weights"]["gib"] / result["bf16_dequantised"]["weights"]["gib"], 3)
    keys = (
        "logits_rel_err",
        "top1_agreement",
        "logits_rel_err_same_routing",
        "top1_agreement_same_routing",
        "logits_rel_err_estimate",
        "first_layer_rel_err",
        "fp8_vs_bf16",
        "fp8_two_step_vs_bf16",
        "weights_ratio",
    )
    print(json.dumps({k: result[k] for k in keys}))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_fp8_inference.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
