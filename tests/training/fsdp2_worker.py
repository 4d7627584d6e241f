"""Run by test_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU): the debug model with MTP sharded by
FSDP2 (`fully_shard` per decoder/MTP layer, then the root; the units of training/accelerate_configs/fsdp2.yaml),
a few SGD steps on this rank's rows of a fixed global batch with the aux-loss-free bias update, then this rank's
losses, total gradient norms, router biases and the gathered full parameters are saved.

With no argument beyond the output folder it runs the same steps in one process without FSDP (the reference).
A second argument, "bf16" or "bf16-router-fp32", shards with a bf16 MixedPrecisionPolicy (what accelerate's FSDP2
plugin uses for mixed_precision="bf16"), the latter after `fully_shard_routers_fp32` (what `dsv3 train` does); the
worker then also saves the dtype of the router weight each router forward computed with."""

import json
import os
import sys

import torch
import torch.distributed as dist
from modeling_deepseek_v3.training.balancing import fully_shard_routers_fp32, moe_layers, update_router_biases

from modeling_deepseek_v3 import DSV3Config, DSV3ForCausalLM
from modeling_deepseek_v3.modeling_dsv3 import DSV3TopkRouter

DEBUG = os.path.join(os.path.dirname(__file__), "..", "..", "hub_configs", "deepseek-v3-debug")
STEPS, GLOBAL_ROWS, SEQ, GAMMA = 3, 4, 12, 0.01


def record_router_dtypes() -> list[str]:
    """Patch the router's forward to note the dtype of the weight it computes with (FSDP2 has gathered it by then)."""
    seen, forward = [], DSV3TopkRouter.forward

    def recording_forward(self, x):
        seen.append(str(self.weight.dtype))
        return forward(self, x)

    DSV3TopkRouter.forward = recording_forward
    return seen


def main(output_dir: str, precision: str = "fp32") -> None:
    distributed = "RANK" in os.environ
    router_dtypes = record_router_dtypes()
    rank, world = 0, 1
    if distributed:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = DSV3Config.from_pretrained(DEBUG, vocab_size=512, num_nextn_predict_layers=1, seq_aux_loss_alpha=1e-3)
    model = DSV3ForCausalLM(config)
    if not distributed:  # the reference also records the common starting point
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(output_dir, "initial.pt"))
    data = torch.randint(0, 512, (STEPS, GLOBAL_ROWS, SEQ), generator=torch.Generator().manual_seed(1))
    if distributed:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy()  # fp32
        if precision.startswith("bf16"):
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
        if precision == "bf16-router-fp32":
            fully_shard_routers_fp32(model)
        for layer in [*model.model.layers, *model.model.mtp_layers]:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    # Plain SGD: its update is linear in the gradient, so a gradient averaged wrongly over ranks (summed, halved,
    # from one shard) shows in the parameters; Adam's normalised update would hide a scale error.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, grad_norms = [], []
    for step in range(STEPS):
        rows = data[step, rank::world]  # this rank's half of the global batch
        out = model(rows, labels=rows)
        out.loss.backward()  # FSDP2 averages the gradients over ranks: the mean over the global batch
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # the total norm, nothing clipped
        grad_norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        optimizer.step()
        optimizer.zero_grad()
        update_router_biases(model, out.expert_load, GAMMA)  # loads summed over ranks, as in training/pretrain.py
        loss = out.loss.detach().clone()
        if distributed:
            dist.all_reduce(loss)
        losses.append(loss.item() / world)
    full = {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()
    }
    if rank == 0:
        with open(os.path.join(output_dir, "losses.json"), "w") as f:
            json.dump(losses, f)
        with open(os.path.join(output_dir, "grad_norms.json"), "w") as f:
            json.dump(grad_norms, f)
        with open(os.path.join(output_dir, "router_dtypes.json"), "w") as f:
            json.dump(sorted(set(router_dtypes)), f)
        torch.save(full, os.path.join(output_dir, "state.pt"))
    torch.save([m.gate.e_score_correction_bias.clone() for m in moe_layers(model)],
               os.path.join(output_dir, f"biases-rank{rank}.pt"))  # fmt: skip
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
