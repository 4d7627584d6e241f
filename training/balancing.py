"""Auxiliary-loss-free load balancing (DeepSeek-V3 paper section 2.1.2; arXiv 2408.15664), shared by the
Accelerate pretraining loop and the TRL callbacks.

After every optimizer step, each MoE layer's router bias moves toward balance:

    b_i += gamma * sign(mean_j c_j - c_i)

where c_i is the number of tokens routed to expert i during the step, summed over its micro-batches and over all
ranks (all_reduce when torch.distributed is initialised), so every rank applies the same update and keeps
identical biases. The bias is an fp32 buffer (`gate.e_score_correction_bias`): a step of 1e-3 would be lost in bf16.

MaxVio = (max_i c_i - mean c) / mean c (arXiv 2408.15664): "batch" MaxVio from one step's loads, "global" MaxVio
from the loads accumulated over the whole run.

Shape suffixes: L MoE layers (main model, then MTP), E routed experts.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn


def moe_layers(model: nn.Module) -> list[nn.Module]:
    """The MoE layers in `expert_load` row order, through any wrapper (DDP's .module, FSDP, PEFT)."""
    from modeling_deepseek_v3.modeling_dsv3 import DSV3MoE

    return [m for m in model.modules() if isinstance(m, DSV3MoE)]


def fully_shard_routers_fp32(model: nn.Module, **fsdp_kwargs) -> list[nn.Module]:
    """Give every MoE router its own FSDP2 unit that computes and reduces in fp32; returns the routers.

    FSDP2's MixedPrecisionPolicy casts all parameters of a unit to its param_dtype for compute and reduces their
    gradients in reduce_dtype. Under a bf16 policy the router weight, kept fp32 by the model itself (its `_apply`),
    would be gathered as bf16 and its gradient summed in bf16, while the paper keeps the gating in higher precision.
    A nested unit keeps its own policy, and its parent unit (the decoder layer) leaves its parameters alone.
    Call before the layers are sharded; `fsdp_kwargs` (mesh, reshard_after_forward, offload_policy) as theirs.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    routers = [layer.gate for layer in moe_layers(model)]
    for router in routers:
        fully_shard(router, mp_policy=fp32, **fsdp_kwargs)
    return routers


def keep_routers_fp32_under_fsdp2(accelerator, model: nn.Module) -> None:
    """Where `accelerator` shards with FSDP2 under mixed precision, give every router its own fp32 unit
    (`fully_shard_routers_fp32`, with the plugin's resharding, offload and mesh). Call it after the accelerator exists
    and before `prepare()`, which then leaves these units alone (`dsv3 train`; `dsv3 sft`/`grpo` through
    DSV3TrainerMixin). FSDP1 has one precision a unit: it warns. Elsewhere nothing to do."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP or accelerator.mixed_precision == "no":
        return
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        warnings.warn("FSDP1 with mixed precision computes the router in bf16; use fsdp_version: 2 to keep it fp32",
                      stacklevel=2)  # fmt: skip
        return
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is not None:
        mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    fully_shard_routers_fp32(model, reshard_after_forward=plugin.reshard_after_forward,
                             offload_policy=plugin.cpu_offload, mesh=mesh)  # fmt: skip


def all_reduce_sum(loads_LE: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; int64 so counts stay exact); identity when not distributed."""
    loads_LE = loads_LE.detach().to(torch.int64).clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(loads_LE, op=dist.ReduceOp.SUM)
    return loads_LE


def max_violation(loads_LE: torch.Tensor) -> torch.Tensor:
    """MaxVio per layer [L]: (max load - mean load) / mean load; 0 for a layer that saw no tokens."""
    loads_LE = loads_LE.double()
    mean_L = loads_LE.mean(-1)
    vio_L = (loads_LE.max(-1).values - mean_L) / mean_L.clamp_min(1e-12)
    return torch.where(mean_L > 0, vio_L, torch.zeros_like(vio_L))


@torch.no_grad()
def update_router_biases(model: nn.Module, loads_LE: torch.Tensor, gamma: float, reduce: bool = True) -> torch.Tensor:
    """Apply b_i += gamma * sign(mean load - load_i) to every MoE layer and return the loads it used.

    `loads_LE` holds this rank's token counts for the step (summed over micro-batches); with `reduce` they are
    summed over all ranks first, so the update, and hence the biases, are identical on every rank.
    A layer with fewer rows than MoE layers (MTP layers skipped while lambda = 0) gets zero rows: sign(0) = 0.
    """
    layers = moe_layers(model)
    if loads_LE.shape[0] > len(layers):
        raise ValueError(f"expert loads have {loads_LE.shape[0]} rows but the model has {len(layers)} MoE layers")
    if loads_LE.shape[0] < len(layers):
        loads_LE = torch.cat([loads_LE, loads_LE.new_zeros(len(layers) - loads_LE.shape[0], loads_LE.shape[1])])
    if reduce:
        loads_LE = all_reduce_sum(loads_LE)
    if gamma == 0:
        return loads_LE
    loads_f = loads_LE.float()
    step_LE = gamma * torch.sign(loads_f.mean(-1, keepdim=True) - loads_f)
    for layer, step_E in zip(layers, step_LE, strict=True):
        bias = layer.gate.e_score_correction_bias
        if bias.dtype != torch.float32:
            raise TypeError(f"router bias must stay fp32, found {bias.dtype}")
        bias.add_(step_E.to(bias.device))
    return loads_LE


class ExpertLoadTracker:
    """Accumulates `expert_load` over the micro-batches of one optimizer step, and over the run.

    Call `add(out.expert_load)` after each forward and `step(model, gamma)` when gradients sync (once per optimizer
    step): it updates the biases from the step's loads summed over ranks and returns the batch MaxVio per layer.
    `state_dict`/`load_state_dict` keep the run totals (global MaxVio) across a resume.
    """

    def __init__(self, num_layers: int, num_experts: int):
        self.step_loads_LE = torch.zeros(num_layers, num_experts, dtype=torch.int64)
        self.total_loads_LE = torch.zeros(num_layers, num_experts, dtype=torch.int64)

    def add(self, expert_load_LE: torch.Tensor | None) -> None:
        if expert_load_LE is None:
            return
        # Summed where the loads are (the GPU): a copy to the host here would sync every micro-batch; step()'s is
        # the one sync a step.
        if self.step_loads_LE.device != expert_load_LE.device:
            self.step_loads_LE = self.step_loads_LE.to(expert_load_LE.device)
        rows = expert_load_LE.shape[0]
        self.step_loads_LE[:rows] += expert_load_LE.detach().to(torch.int64)

    def step(self, model: nn.Module, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Bias update for the finished step; returns (global loads of the step [L, E], batch MaxVio [L])."""
        device = moe_layers(model)[0].gate.e_score_correction_bias.device  # NCCL reduces device tensors only
        loads_LE = update_router_biases(model, self.step_loads_LE.to(device), gamma).cpu()
        self.total_loads_LE += loads_LE
        self.step_loads_LE.zero_()
        return loads_LE, max_violation(loads_LE)

    def global_max_violation(self) -> torch.Tensor:
        return max_violation(self.total_loads_LE)

    def state_dict(self) -> dict:
        return {"total_loads_LE": self.total_loads_LE.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.total_loads_LE.copy_(state["total_loads_LE"])
