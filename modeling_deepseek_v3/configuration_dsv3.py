"""DSV3Config: DeepSeek-V3's official config.json fields (same names, 671B defaults) plus training fields.

Loads, unchanged, the official config.json (model_type "deepseek_v3", `rope_scaling` with `type: yarn`,
`quantization_config` fp8) and configs saved by transformers' built-in DeepseekV3 (`rope_parameters`).
Every rule is checked at construction time and a violation raises a ValueError naming the field.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

# The official 671B RoPE: YaRN stretching a 4K pretraining context by 40x (arXiv 2412.19437, section 4.3).
OFFICIAL_ROPE = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 40.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "original_max_position_embeddings": 4096,
}
ROPE_TYPES = ("default", "yarn")
MLA_IMPLEMENTATIONS = ("auto", "naive", "absorbed", "triton")
MOE_IMPLEMENTATIONS = ("auto", "eager", "grouped_mm", "sorted", "fp8")
LINEAR_IMPLEMENTATIONS = ("torch", "fp8")
AUX_LOSS_SCOPES = ("sequence", "batch")
# Tells "no RoPE fields given" (take the official YaRN) from an explicit `"rope_scaling": null` (plain RoPE).
_NOT_GIVEN: Any = object()


class DSV3Config(PretrainedConfig):
    r"""Configuration of a DeepSeek-V3 model.

    Field names and defaults are those of DeepSeek-V3's official config.json (671B). The extra fields are:

    - `bias_update_speed` (gamma, 0.001): step of the auxiliary-loss-free router-bias update.
    - `seq_aux_loss_alpha` (alpha, 0.0001): weight of the sequence-wise balance loss (0 disables it).
    - `aux_loss_scope`: "sequence" (the paper's complementary sequence-wise loss, eq. 17-20) or "batch" (the classic
      auxiliary loss over all tokens of a micro-batch, the baseline the aux-loss-free paper compares against).
    - `mtp_loss_weight` (lambda, 0.3): weight of the MTP loss, divided by `num_nextn_predict_layers`.
    - `mla_implementation`: "auto" (naive prefill/training, absorbed decode), "naive", "absorbed", or "triton"
      (as "auto", with one-token decode steps in the Triton latent-cache kernel, kernels/mla_decode.py).
    - `moe_implementation`: "auto" (grouped_mm where torch has it, else "sorted"), "eager" (the test
      reference loop), "grouped_mm", "sorted", or "fp8" (Triton kernels).
    - `linear_implementation`: "torch" or "fp8" (block-scaled FP8 Triton kernels).
    - `fp8_weight_cache` (False): the FP8 layers keep each quantised master weight while it is unchanged
      (kernels.QuantizedWeightCache; eager mode): gradient-accumulation micro-batches after the first and
      forward-only calls between optimizer steps skip the weight quantisation, for about two bytes a parameter.

    `rope_scaling` (official) and `rope_parameters` (transformers) are both accepted and stored as
    `rope_parameters`, a dict with `rope_type` in {"default", "yarn"} and `rope_theta`.
    """

    model_type = "dsv3"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"}

    def __init__(
        self,
        vocab_size: int = 129280,
        hidden_size: int = 7168,
        intermediate_size: int = 18432,
        moe_intermediate_size: int = 2048,
        num_hidden_layers: int = 61,
        num_nextn_predict_layers: int = 1,
        num_attention_heads: int = 128,
        num_key_value_heads: int | None = None,
        n_shared_experts: int = 1,
        n_routed_experts: int = 256,
        num_experts_per_tok: int = 8,
        n_group: int = 8,
        topk_group: int = 4,
        routed_scaling_factor: float = 2.5,
        scoring_func: str = "sigmoid",
        topk_method: str = "noaux_tc",
        norm_topk_prob: bool = True,
        first_k_dense_replace: int = 3,
        moe_layer_freq: int = 1,
        q_lora_rank: int | None = 1536,
        kv_lora_rank: int = 512,
        qk_nope_head_dim: int = 128,
        qk_rope_head_dim: int = 64,
        v_head_dim: int = 128,
        hidden_act: str = "silu",
        max_position_embeddings: int = 163840,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 0,
        eos_token_id: int | list[int] | None = 1,
        tie_word_embeddings: bool = False,
        rope_theta: float | None = None,
        rope_scaling: dict | None = _NOT_GIVEN,
        rope_parameters: dict | None = _NOT_GIVEN,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        quantization_config: dict | None = None,
        bias_update_speed: float = 0.001,
        seq_aux_loss_alpha: float = 0.0001,
        aux_loss_scope: str = "sequence",
        mtp_loss_weight: float = 0.3,
        mla_implementation: str = "auto",
        moe_implementation: str = "auto",
        linear_implementation: str = "torch",
        fp8_weight_cache: bool = False,
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_nextn_predict_layers = num_nextn_predict_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.n_shared_experts = n_shared_experts
        self.n_routed_experts = n_routed_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.scoring_func = scoring_func
        self.topk_method = topk_method
        self.norm_topk_prob = norm_topk_prob
        self.first_k_dense_replace = first_k_dense_replace
        self.moe_layer_freq = moe_layer_freq
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.quantization_config = quantization_config
        self.bias_update_speed = bias_update_speed
        self.seq_aux_loss_alpha = seq_aux_loss_alpha
        self.aux_loss_scope = aux_loss_scope
        self.mtp_loss_weight = mtp_loss_weight
        self.mla_implementation = mla_implementation
        self.moe_implementation = moe_implementation
        self.linear_implementation = linear_implementation
        self.fp8_weight_cache = fp8_weight_cache
        # Set before PretrainedConfig.__init__ so that transformers' RoPE standardisation finds it complete and
        # never sees the legacy `rope_scaling` key (whose setter warns and re-standardises).
        self.rope_parameters = _normalise_rope(rope_parameters, rope_scaling, rope_theta)
        for derived in ("head_dim", "qk_head_dim"):  # transformers' built-in config saves these; never inputs
            kwargs.pop(derived, None)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate()

    # ----------------------------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_theta(self) -> float:
        return self.rope_parameters["rope_theta"]

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Official rule: dense for the first `first_k_dense_replace` layers, then MoE every `moe_layer_freq`."""
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    def validate(self) -> None:
        """Raise a ValueError naming the first field that breaks a rule."""

        def fail(field: str, rule: str) -> None:
            raise ValueError(f"DSV3Config.{field}={getattr(self, field, None)!r}: {rule}")

        for field in (
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
            "moe_layer_freq",
        ):  # fmt: skip
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(field, "must be a positive integer")
        for field in ("n_shared_experts", "num_nextn_predict_layers", "first_k_dense_replace"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 0:
                fail(field, "must be a non-negative integer")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            fail("q_lora_rank", "must be a positive integer, or None for a plain q_proj")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "must be even: RoPE rotates pairs of dimensions")
        if self.num_key_value_heads != self.num_attention_heads:
            fail("num_key_value_heads", "MLA has one latent shared by all heads; must equal num_attention_heads")
        if self.n_routed_experts % self.n_group:
            fail("n_routed_experts", f"must be divisible by n_group={self.n_group}")
        if self.n_routed_experts // self.n_group < 2:
            fail("n_group", "each group needs at least 2 experts: group scores sum each group's top 2")
        if self.topk_group > self.n_group:
            fail("topk_group", f"must be <= n_group={self.n_group}")
        kept = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.num_experts_per_tok > kept:
            fail("num_experts_per_tok", f"must be <= the {kept} experts that topk_group={self.topk_group} groups hold")
        if self.scoring_func != "sigmoid":
            fail("scoring_func", "DeepSeek-V3 scores experts with 'sigmoid'")
        if self.topk_method != "noaux_tc":
            fail("topk_method", "DeepSeek-V3 routes with 'noaux_tc' (group-limited, bias-corrected top-k)")
        if not self.routed_scaling_factor > 0:
            fail("routed_scaling_factor", "must be > 0")
        if not self.rms_norm_eps > 0:
            fail("rms_norm_eps", "must be > 0")
        for field in ("bias_update_speed", "seq_aux_loss_alpha", "mtp_loss_weight", "attention_dropout"):
            if not getattr(self, field) >= 0:
                fail(field, "must be >= 0")
        for field, allowed in (
            ("mla_implementation", MLA_IMPLEMENTATIONS),
            ("moe_implementation", MOE_IMPLEMENTATIONS),
            ("linear_implementation", LINEAR_IMPLEMENTATIONS),
            ("aux_loss_scope", AUX_LOSS_SCOPES),
        ):
            if getattr(self, field) not in allowed:
                fail(field, f"must be one of {allowed}")
        if getattr(self, "rope_interleave", True) is not True:
            fail("rope_interleave", "DeepSeek-V3 checkpoints rotate interleaved pairs; only True is supported")
        rope = self.rope_parameters
        if rope["rope_type"] not in ROPE_TYPES:
            fail("rope_parameters", f"rope_type must be one of {ROPE_TYPES}")
        if not rope["rope_theta"] > 0:
            fail("rope_parameters", "rope_theta must be > 0")
        if rope["rope_type"] == "yarn":
            if not rope.get("factor", 0) >= 1:
                fail("rope_parameters", "yarn needs factor >= 1")
            if not rope.get("original_max_position_embeddings", 0) > 0:
                fail("rope_parameters", "yarn needs original_max_position_embeddings > 0")
        q = self.quantization_config
        if q is not None:
            if not isinstance(q, dict):
                q = q.to_dict()
            if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
                fail("quantization_config", "only DeepSeek's block-scaled fp8 (quant_method 'fp8', fmt 'e4m3')")
            if list(q.get("weight_block_size", [128, 128])) != [128, 128]:
                fail("quantization_config", "weight_block_size must be [128, 128]")


def _normalise_rope(rope_parameters: dict | None, rope_scaling: dict | None, rope_theta: float | None) -> dict:
    """One RoPE dict from the official (`rope_scaling` + `rope_theta`) or transformers (`rope_parameters`) form."""
    if rope_parameters is _NOT_GIVEN and rope_scaling is _NOT_GIVEN:
        rope = dict(OFFICIAL_ROPE)
        if rope_theta is not None:
            rope["rope_theta"] = float(rope_theta)
        return rope
    given = rope_parameters if rope_parameters not in (_NOT_GIVEN, None) else rope_scaling
    rope = dict(given) if given not in (_NOT_GIVEN, None) else {"rope_type": "default"}
    rope["rope_type"] = rope.pop("type", rope.get("rope_type", "default"))
    if rope_theta is not None and "rope_theta" not in rope:
        rope["rope_theta"] = float(rope_theta)
    rope.setdefault("rope_theta", 10000.0)
    return rope


__all__ = ["DSV3Config"]
