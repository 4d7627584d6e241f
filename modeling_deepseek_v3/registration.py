"""Registration on import: AutoConfig/AutoModel/AutoModelForCausalLM know "dsv3", and transformers' ExpertsInterface
knows `experts_implementation="dsv3_fp8"` (this package's block-scaled FP8 experts, for transformers' own MoE models)."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_dsv3 import DSV3Config
from .modeling_dsv3 import DSV3ForCausalLM, DSV3Model, optional_kernels

FP8_EXPERTS_IMPLEMENTATION = "dsv3_fp8"
# (is_transposed, has_bias, has_gate, is_concatenated, has_post_expert_norm) that use_experts_implementation sets on
# an experts module: the fused layout that fp8_experts_forward computes (DeepseekV3Experts' and most others').
_FUSED_LAYOUT = (False, False, True, True, False)


def fp8_experts_for_transformers(self, hidden_states, top_k_index, top_k_weights):
    """transformers' ExpertsInterface entry "dsv3_fp8": the routed experts of a transformers model (e.g. the built-in
    DeepseekV3ForCausalLM, loaded with `experts_implementation="dsv3_fp8"`) in the DeepSeek-V3 FP8 recipe, forward and
    backward (kernels.fp8_experts_forward): gate_up_proj [E, 2I, D] (gate rows first), down_proj [E, D, I], kept in
    high precision and quantised in 128x128 blocks each call, activations in 1x128 tiles. Layouts it does not
    compute (transposed, biased, ungated, interleaved, post-norm, a custom gate) raise instead of computing wrong."""
    from transformers.integrations.moe import _default_apply_gate

    layout = tuple(getattr(self, name, default) for name, default in (
        ("is_transposed", False), ("has_bias", False), ("has_gate", True), ("is_concatenated", True),
        ("has_post_expert_norm", False)))  # fmt: skip
    if layout != _FUSED_LAYOUT or getattr(type(self), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        raise ValueError(
            f'experts_implementation="{FP8_EXPERTS_IMPLEMENTATION}" computes act(gate) * up over fused, untransposed, '
            f"bias-free gate_up_proj / down_proj weights; {type(self).__name__} has (is_transposed, has_bias, "
            f"has_gate, is_concatenated, has_post_expert_norm) = {layout} or its own _apply_gate"
        )
    kernels = optional_kernels(f'experts_implementation="{FP8_EXPERTS_IMPLEMENTATION}"')
    return kernels.fp8_experts_forward(
        hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, self.act_fn
    )


def register() -> None:
    """Idempotent: safe to call again (e.g. after a hub folder's remote code registered its own copy)."""
    AutoConfig.register(DSV3Config.model_type, DSV3Config, exist_ok=True)
    AutoModel.register(DSV3Config, DSV3Model, exist_ok=True)
    AutoModelForCausalLM.register(DSV3Config, DSV3ForCausalLM, exist_ok=True)
    try:  # transformers without the experts interface (before 5.x) simply does not get the entry
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return
    ExpertsInterface.register(FP8_EXPERTS_IMPLEMENTATION, fp8_experts_for_transformers)
