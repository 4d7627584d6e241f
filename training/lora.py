"""PEFT LoRA for DeepSeek-V3: the target set, a check that every target exists, save / load / merge.

    from modeling_deepseek_v3.training.lora import lora_config, apply_lora, load_adapter, merge_adapter
    model = apply_lora(model, lora_config(model, r=16))   # PeftModel; only adapter weights train
    model.save_pretrained("adapter/")                      # adapter_model.safetensors + adapter_config.json
    model = load_adapter(DSV3ForCausalLM.from_pretrained(base_dir), "adapter/")
    merged = merge_adapter(model)                          # a plain DSV3ForCausalLM; save_pretrained writes the
                                                           # official layout

The default target set (`default_targets`):
- MLA projections, by module name: q_a_proj, q_b_proj (q_proj where q_lora_rank is None), kv_a_proj_with_mqa,
  kv_b_proj, o_proj;
- dense MLPs (the first_k_dense_replace layers) and shared experts: gate_proj, up_proj, down_proj;
- routed experts through `target_parameters` on the fused 3-D weights mlp.experts.gate_up_proj [E, 2F, D] and
  mlp.experts.down_proj [E, D, F]: PEFT gives each expert its own rank-r pair. PEFT's parameter LoRA cannot factor
  dropout out of the product, so lora_dropout must be 0 whenever experts are targeted.
Not targeted: the router (gate.weight, fp32; its bias is balanced by the callback, not trained), norms, the
embedding and the output head (TRL computes log-probs from lm_head.weight directly, so an adapter there would never
train). MTP layers have the same module names, so they are adapted too.
"""

from __future__ import annotations

import re

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
EXPERT_TARGETS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def mla_targets(model: nn.Module) -> list[str]:
    q = ["q_proj"] if model.config.q_lora_rank is None else ["q_a_proj", "q_b_proj"]
    return [*q, "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


def default_targets(model: nn.Module, experts: bool = True) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) of the documented target set for this model's config."""
    return mla_targets(model) + list(MLP_TARGETS), list(EXPERT_TARGETS) if experts else []


def lora_config(
    model: nn.Module,
    r: int = 16,
    alpha: int = 32,
    target_modules: list[str] | None = None,
    target_parameters: list[str] | None = None,
    experts: bool = True,
    dropout: float = 0.0,
) -> LoraConfig:
    """A causal-LM LoraConfig; targets default to `default_targets(model, experts)`."""
    modules, params = default_targets(model, experts)
    target_modules = modules if target_modules is None else list(target_modules)
    target_parameters = params if target_parameters is None else list(target_parameters)
    if target_parameters and dropout:
        raise ValueError(f"LoRA on the routed experts (target_parameters) needs lora_dropout=0, got {dropout}")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        target_parameters=target_parameters or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _matches(name: str, target: str) -> bool:
    # PEFT's rule for a list of names: the full name, or its last components, equal the target.
    return name == target or name.endswith("." + target)


def check_targets(model: nn.Module, config: LoraConfig) -> None:
    """Raise ValueError naming every target that matches nothing in `model` (PEFT only fails when none match)."""
    modules = config.target_modules
    if isinstance(modules, str):  # a regex: PEFT matches it against full names
        module_missing = [] if any(re.fullmatch(modules, n) for n, _ in model.named_modules()) else [modules]
    else:
        names = [n for n, _ in model.named_modules()]
        module_missing = [t for t in modules or [] if not any(_matches(n, t) for n in names)]
    param_names = [n for n, _ in model.named_parameters()]
    param_missing = [t for t in config.target_parameters or [] if not any(_matches(n, t) for n in param_names)]
    if module_missing or param_missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"LoRA targets that match nothing in {type(model).__name__}: target_modules {module_missing}, "
            f"target_parameters {param_missing}. Linear modules: {leaves}; expert weights: {list(EXPERT_TARGETS)}"
        )


def apply_lora(model: nn.Module, config: LoraConfig) -> PeftModel:
    """Check the targets, then wrap `model`: only the adapter weights are trainable."""
    check_targets(model, config)
    return get_peft_model(model, config)


def load_adapter(model: nn.Module, adapter_dir: str, is_trainable: bool = False) -> PeftModel:
    """A saved adapter on top of its base model."""
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable)


def merge_adapter(model: PeftModel) -> nn.Module:
    """Fold the adapter into the base weights and return the plain base model (same logits as the adapter model)."""
    return model.merge_and_unload()


__all__ = [
    "EXPERT_TARGETS", "MLP_TARGETS", "apply_lora", "check_targets", "default_targets", "load_adapter", "lora_config",
    "merge_adapter", "mla_targets",
]  # fmt: skip
