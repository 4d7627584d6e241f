"""`dsv3 info`: parameters, activated parameters, MTP parameters, KV-cache bytes and FLOPs per token.

Everything is computed analytically from the config (nothing is instantiated), so it works for 671B:

    dsv3 info deepseek-v3-671b                  # a name from the package's hub_configs/
    dsv3 info hub_configs/deepseek-v3-debug     # a config or model folder (or a config.json file)
    dsv3 info deepseek-v3-671b --json --seq-len 4096

Conventions (stated in the output too):
- total: every parameter of the main model (embedding, all experts, output head; no MTP). Buffers such as
  e_score_correction_bias are not parameters.
- activated per token: everything a token runs through, with the routed experts counted num_experts_per_tok out of
  n_routed_experts. The output head counts in full (every token's logits multiply the whole matrix) and the
  embedding counts one row (a lookup reads only the token's row). At 671B this gives 36.6B, the paper's "37B";
  counting the whole embedding table as well would give 37.55B, which does not round to 37.
- MTP: the MTP modules' own parameters (norms, eh_proj, a full decoder block, shared_head.norm). The embedding and
  output head are shared with the main model and not counted (11.6B at 671B). The official checkpoint stores its own
  copies of both in layer 61 (13.46B). The paper's "14B" is the difference of two rounded totals:
  DeepSeek's Hugging Face repository holds 685B tensor values (684.53B: main + MTP with its copies + the fp32
  `weight_scale_inv` blocks of the FP8 weights), minus the main model's 671B. `mtp_params_paper` reproduces it.
- KV cache: MLA caches the normalised latent and the shared roped key, (kv_lora_rank + qk_rope_head_dim) values per
  layer per token; the expanded alternative stores per-head K and V, num_heads * (qk_head_dim + v_head_dim).
- forward FLOPs per token: 2 x the activated weight-matrix parameters (one multiply-add per weight; norms, biases,
  the embedding lookup and softmax are not counted) plus attention: QK^T and PV over the naive (expanded) MLA
  path, 2 * num_heads * (qk_head_dim + v_head_dim) FLOPs per layer per attended token, averaged over the positions
  of one causal sequence of --seq-len tokens (mean context (S + 1) / 2). Main model only; MTP not included.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import math
from pathlib import Path

from .configuration_dsv3 import DSV3Config

REPO_HUB_CONFIGS = Path(__file__).resolve().parent.parent / "hub_configs"
FP8_BLOCK = 128  # DeepSeek's FP8 checkpoints hold one fp32 scale per 128x128 weight block


# --------------------------------------------------------------------------------------------------- config lookup
def hub_config_names() -> list[str]:
    """Names of the configs shipped in the package's hub_configs (e.g. deepseek-v3-671b)."""
    return sorted(p.name for p in _hub_configs_root().iterdir() if (p / "config.json").is_file())


def _hub_configs_root():
    try:
        return importlib.resources.files("modeling_deepseek_v3.hub_configs")
    except ModuleNotFoundError:  # running from a checkout that was not pip-installed
        return REPO_HUB_CONFIGS


def find_config_file(name_or_path: str | Path) -> Path:
    """config.json of a folder, a config.json path, or a hub_configs name; FileNotFoundError says which exist."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / "config.json").is_file():
            return path / "config.json"
        raise FileNotFoundError(f"{path} is a folder without config.json: not a config or model folder")
    for root in (_hub_configs_root(), REPO_HUB_CONFIGS):
        candidate = root / str(name_or_path) / "config.json"
        if candidate.is_file():
            return Path(str(candidate))
    raise FileNotFoundError(
        f"{name_or_path!r} is neither a file, a folder, nor one of the package's hub configs {hub_config_names()}"
    )


def load_config(name_or_path: str | Path) -> DSV3Config:
    """DSV3Config from a config or model folder, a config.json file or a hub_configs name."""
    return DSV3Config.from_json_file(str(find_config_file(name_or_path)))


# ------------------------------------------------------------------------------------------------------- counting
def _attention_params(c: DSV3Config) -> tuple[int, int]:
    """(all parameters, weight-matrix parameters) of one MLA module."""
    H, D, bias = c.num_attention_heads, c.hidden_size, int(c.attention_bias)
    if c.q_lora_rank is None:
        q_mat = D * H * c.qk_head_dim
        q_other = 0
    else:
        q_mat = D * c.q_lora_rank + c.q_lora_rank * H * c.qk_head_dim
        q_other = c.q_lora_rank * (1 + bias)  # q_a_layernorm, q_a_proj bias
    kv_a = c.kv_lora_rank + c.qk_rope_head_dim
    mat = q_mat + D * kv_a + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim) + H * c.v_head_dim * D
    other = q_other + kv_a * bias + c.kv_lora_rank + D * bias  # kv_a bias, kv_a_layernorm, o_proj bias
    return mat + other, mat


def _block_params(c: DSV3Config, layer_idx: int) -> dict[str, int]:
    """One decoder block: total, activated per token, activated weight-matrix parameters, routed-expert parameters."""
    attn, attn_mat = _attention_params(c)
    norms = 2 * c.hidden_size
    D = c.hidden_size
    if c.is_moe_layer(layer_idx):
        expert = 3 * D * c.moe_intermediate_size  # gate, up, down
        routed = c.n_routed_experts * expert
        dense = c.n_shared_experts * expert + c.n_routed_experts * D  # shared experts + router (run for every token)
        active_routed = c.num_experts_per_tok * expert
    else:
        routed = active_routed = 0
        dense = 3 * D * c.intermediate_size
    return {
        "total": attn + norms + dense + routed,
        "activated": attn + norms + dense + active_routed,
        "activated_matmul": attn_mat + dense + active_routed,
        "routed": routed,
    }


def _fp8_scales(c: DSV3Config, layer_idx: int) -> int:
    """fp32 scale values of one block in an FP8 checkpoint: one per 128x128 block of each linear but the router."""
    blocks = lambda n, k: math.ceil(n / FP8_BLOCK) * math.ceil(k / FP8_BLOCK)
    H, D = c.num_attention_heads, c.hidden_size
    if c.q_lora_rank is None:
        q = blocks(H * c.qk_head_dim, D)
    else:
        q = blocks(c.q_lora_rank, D) + blocks(H * c.qk_head_dim, c.q_lora_rank)
    attn = q + blocks(c.kv_lora_rank + c.qk_rope_head_dim, D)
    attn += blocks(H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank) + blocks(D, H * c.v_head_dim)
    mlp = lambda width: 2 * blocks(width, D) + blocks(D, width)
    if c.is_moe_layer(layer_idx):
        ffn = c.n_routed_experts * mlp(c.moe_intermediate_size)
        ffn += mlp(c.n_shared_experts * c.moe_intermediate_size) if c.n_shared_experts else 0
    else:
        ffn = mlp(c.intermediate_size)
    return attn + ffn


def model_stats(config: DSV3Config, seq_len: int = 4096, cache_dtype_bytes: int = 2) -> dict:
    """Parameter, cache and FLOP counts of a DSV3ForCausalLM with this config, computed without instantiating it.

    Keys: total_params, activated_params, activated_params_full_embedding, mtp_params, mtp_checkpoint_params,
    fp8_checkpoint_tensor_values, mtp_params_paper (billions), routed_expert_params, kv_cache_bytes_per_token,
    expanded_kv_cache_bytes_per_token, forward_flops_per_token (with its parts), and `conventions` (text).
    See the module docstring for what each convention counts and why.
    """
    c, D, V, L = config, config.hidden_size, config.vocab_size, config.num_hidden_layers
    embed = V * D
    head = 0 if c.tie_word_embeddings else V * D  # a tied head is the embedding: one tensor
    blocks = [_block_params(c, i) for i in range(L)]
    total = embed + head + D + sum(b["total"] for b in blocks)  # + final norm
    # The head multiplies every token (tied or not); the embedding lookup reads one row (tied: a row of the head).
    embed_row = 0 if c.tie_word_embeddings else D
    activated = V * D + embed_row + D + sum(b["activated"] for b in blocks)
    activated_matmul = V * D + sum(b["activated_matmul"] for b in blocks)

    mtp = 0
    for k in range(c.num_nextn_predict_layers):
        mtp += 2 * D + 2 * D * D + _block_params(c, L + k)["total"] + D  # enorm, hnorm, eh_proj, block, head norm
    # The official layout stores each MTP module with its own embed_tokens and shared_head.head copies.
    mtp_checkpoint = mtp + c.num_nextn_predict_layers * 2 * V * D
    moe_blocks = sum(c.is_moe_layer(i) for i in range(L + c.num_nextn_predict_layers))
    scales = sum(_fp8_scales(c, i) for i in range(L + c.num_nextn_predict_layers))
    checkpoint_fp8 = total + mtp_checkpoint + scales
    checkpoint_fp8 += moe_blocks * c.n_routed_experts  # e_score_correction_bias (fp32) is a stored tensor too

    H = c.num_attention_heads
    cache_values = L * (c.kv_lora_rank + c.qk_rope_head_dim)
    expanded_values = L * H * (c.qk_head_dim + c.v_head_dim)
    mean_context = (seq_len + 1) / 2
    attention_flops = 2 * L * H * (c.qk_head_dim + c.v_head_dim) * mean_context
    return {
        "total_params": total,
        "activated_params": activated,
        "activated_params_full_embedding": activated - embed_row + (0 if c.tie_word_embeddings else embed),
        "routed_expert_params": sum(b["routed"] for b in blocks),
        "mtp_params": mtp,
        "mtp_checkpoint_params": mtp_checkpoint,
        "fp8_checkpoint_tensor_values": checkpoint_fp8,
        "mtp_params_paper": round(checkpoint_fp8 / 1e9) - round(total / 1e9),
        "kv_cache_values_per_token": cache_values,
        "kv_cache_bytes_per_token": cache_values * cache_dtype_bytes,
        "expanded_kv_cache_bytes_per_token": expanded_values * cache_dtype_bytes,
        "cache_dtype_bytes": cache_dtype_bytes,
        "seq_len": seq_len,
        "matmul_flops_per_token": 2 * activated_matmul,
        "attention_flops_per_token": attention_flops,
        "forward_flops_per_token": 2 * activated_matmul + attention_flops,
        "conventions": {
            "activated": "output head in full, embedding one row, routed experts num_experts_per_tok/n_routed_experts",
            "mtp_params": "MTP modules' own parameters; embedding and head are shared with the main model",
            "mtp_params_paper": "round(FP8 checkpoint tensor values, B) - round(main total, B), as the paper's 685B - 671B",
            "kv_cache": "latent: (kv_lora_rank + qk_rope_head_dim) x layers; expanded: heads x (qk + v head dims) x layers",
            "flops": "forward, main model: 2 x activated weight-matrix params + naive-MLA attention "
            "(QK^T, PV) averaged over a causal sequence of seq_len tokens; norms, softmax, MTP excluded",
        },
    }


# ----------------------------------------------------------------------------------------------------------- CLI
def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def format_stats(name: str, s: dict) -> str:
    """The human-readable report `dsv3 info` prints."""
    ratio = s["expanded_kv_cache_bytes_per_token"] / s["kv_cache_bytes_per_token"]
    rows = [
        ("total parameters (main model)", f"{_human(s['total_params'])}  ({s['total_params']:,})"),
        ("activated per token", f"{_human(s['activated_params'])}  ({s['activated_params']:,})"),
        ("  routed experts (all)", f"{_human(s['routed_expert_params'])}"),
        ("MTP parameters (own)", f"{_human(s['mtp_params'])}  ({s['mtp_params']:,})"),
        ("MTP in the checkpoint", f"{_human(s['mtp_checkpoint_params'])}  (with its embedding and head copies)"),
        ("FP8 checkpoint tensors", f"{_human(s['fp8_checkpoint_tensor_values'])}  "
         f"(MTP as the paper counts it: {s['mtp_params_paper']}B)"),
        ("KV cache per token (latent)", f"{s['kv_cache_bytes_per_token']:,} B  "
         f"({s['kv_cache_values_per_token']:,} values x {s['cache_dtype_bytes']} B)"),
        ("KV cache per token (expanded)", f"{s['expanded_kv_cache_bytes_per_token']:,} B  ({ratio:.1f}x the latent)"),
        (f"forward FLOPs per token (S={s['seq_len']})", f"{_human(s['forward_flops_per_token'], ' FLOP')}  "
         f"(matmuls {_human(s['matmul_flops_per_token'])}, attention {_human(s['attention_flops_per_token'])})"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    lines = [f"{name}"] + [f"  {k:<{width}}  {v}" for k, v in rows] + ["conventions:"]
    lines += [f"  {k}: {v}" for k, v in s["conventions"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv3 info", description=__doc__.split("\n")[0])
    parser.add_argument("config", help=f"config or model folder, config.json, or one of {hub_config_names()}")
    parser.add_argument("--seq-len", type=int, default=4096, help="sequence length for attention FLOPs")
    parser.add_argument("--cache-dtype-bytes", type=int, default=2, help="bytes per cached value (bf16: 2)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except FileNotFoundError as e:
        parser.error(str(e))
    stats = model_stats(config, seq_len=args.seq_len, cache_dtype_bytes=args.cache_dtype_bytes)
    print(json.dumps(stats, indent=2) if args.json else format_stats(args.config, stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
