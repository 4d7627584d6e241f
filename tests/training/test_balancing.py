"""Auxiliary-loss-free bias update and MaxVio, checked against values computed by hand."""

from __future__ import annotations

import pytest
import torch
from modeling_deepseek_v3.training.balancing import (
    ExpertLoadTracker,
    max_violation,
    moe_layers,
    update_router_biases,
)

from modeling_deepseek_v3 import DSV3ForCausalLM


@pytest.fixture
def model(tiny_config):
    # debug shape: 3 layers, first dense -> 2 main MoE layers + 1 MTP MoE layer, 16 experts each
    return DSV3ForCausalLM(tiny_config())


def loads(*rows_of_four):
    """[L, 16] loads: each given 4-vector repeated over the 16 experts' four quarters."""
    return torch.tensor([list(r) * 4 for r in rows_of_four], dtype=torch.int64)


def test_bias_update_by_hand(model):
    gamma = 0.01
    step_LE = loads([3, 1, 0, 4], [2, 2, 1, 3], [5, 5, 5, 5])  # means 2, 2, 5
    returned = update_router_biases(model, step_LE, gamma)
    assert torch.equal(returned, step_LE)
    biases = [m.gate.e_score_correction_bias for m in moe_layers(model)]
    g = torch.tensor(gamma, dtype=torch.float32)
    # b_i += gamma * sign(mean - load_i): over-loaded experts go down, under-loaded up, at-mean stay.
    assert torch.equal(biases[0], torch.tensor([-1, 1, 1, -1] * 4, dtype=torch.float32) * g)
    assert torch.equal(biases[1], torch.tensor([0, 0, 1, -1] * 4, dtype=torch.float32) * g)
    assert torch.equal(biases[2], torch.zeros(16))
    update_router_biases(model, step_LE, gamma)  # a second step adds the same again
    assert torch.equal(biases[0], torch.tensor([-1, 1, 1, -1] * 4, dtype=torch.float32) * g * 2)


def test_gamma_zero_and_missing_mtp_rows(model):
    update_router_biases(model, loads([3, 1, 0, 4], [1, 1, 1, 1], [9, 0, 0, 0]), gamma=0.0)
    assert all(torch.equal(m.gate.e_score_correction_bias, torch.zeros(16)) for m in moe_layers(model))
    # lambda = 0 skips the MTP layer: its row is missing and its bias must not move
    update_router_biases(model, loads([3, 1, 0, 4], [1, 1, 1, 1]), gamma=0.5)
    assert torch.equal(moe_layers(model)[2].gate.e_score_correction_bias, torch.zeros(16))
    with pytest.raises(ValueError, match="4 rows but the model has 3 MoE layers"):
        update_router_biases(model, loads([1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]), gamma=0.1)


def test_bias_stays_fp32_under_bf16(model):
    model.to(torch.bfloat16)
    bias = moe_layers(model)[0].gate.e_score_correction_bias
    assert bias.dtype == torch.float32
    update_router_biases(model, loads([3, 1, 0, 4], [1, 1, 1, 1], [1, 1, 1, 1]), gamma=1e-3)
    # 1 + 1e-3 is not representable in bf16 (spacing 2^-7 near 1); the fp32 bias keeps the exact step
    assert bias[1].item() == torch.tensor(1e-3, dtype=torch.float32).item()


def test_max_violation_by_hand():
    vio = max_violation(loads([3, 1, 0, 4], [2, 2, 2, 2], [0, 0, 0, 0], [8, 0, 0, 0]))
    # (max - mean) / mean: (4-2)/2, 0, empty layer -> 0, (8-2)/2
    assert vio.tolist() == [1.0, 0.0, 0.0, 3.0]


def test_tracker_sums_micro_batches_and_run(model):
    tracker = ExpertLoadTracker(num_layers=3, num_experts=16)
    tracker.add(loads([1, 0, 0, 3], [1, 1, 1, 1]))  # an MTP-less forward: 2 rows
    tracker.add(loads([2, 1, 0, 1], [1, 1, 1, 1], [4, 0, 0, 0]))
    step_LE, vio = tracker.step(model, gamma=0.1)
    assert torch.equal(step_LE, loads([3, 1, 0, 4], [2, 2, 2, 2], [4, 0, 0, 0]))
    assert vio.tolist() == [1.0, 0.0, 3.0]
    assert torch.equal(tracker.step_loads_LE, torch.zeros(3, 16, dtype=torch.int64))  # reset for the next step
    tracker.add(loads([0, 4, 4, 0], [2, 2, 2, 2], [0, 4, 0, 0]))
    tracker.step(model, gamma=0.1)
    # global MaxVio from the run totals [3,5,4,4] / [4,4,4,4] / [4,4,0,0]
    assert tracker.global_max_violation().tolist() == [0.25, 0.0, 1.0]
    restored = ExpertLoadTracker(3, 16)
    restored.load_state_dict(tracker.state_dict())
    assert torch.equal(restored.total_loads_LE, tracker.total_loads_LE)


def _accelerator(distributed_type, mixed_precision="bf16", fsdp_version=2):
    """The accelerator attributes keep_routers_fp32_under_fsdp2 reads (a real FSDP2 run needs several processes:
    tests/training/test_distributed.py shards the routers for real)."""
    from types import SimpleNamespace

    plugin = SimpleNamespace(fsdp_version=fsdp_version, reshard_after_forward=True, cpu_offload="offload-policy")
    return SimpleNamespace(distributed_type=distributed_type, mixed_precision=mixed_precision,
                           state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None)  # fmt: skip


def test_routers_get_fp32_units_only_under_fsdp2_mixed_precision(monkeypatch):
    from accelerate.utils import DistributedType
    from modeling_deepseek_v3.training import balancing

    calls = []
    monkeypatch.setattr(balancing, "fully_shard_routers_fp32", lambda model, **kw: calls.append((model, kw)))
    balancing.keep_routers_fp32_under_fsdp2(_accelerator(DistributedType.FSDP), "model")
    assert calls == [("model", dict(reshard_after_forward=True, offload_policy="offload-policy", mesh=None))]
    calls.clear()
    balancing.keep_routers_fp32_under_fsdp2(_accelerator(DistributedType.FSDP, mixed_precision="no"), "model")
    balancing.keep_routers_fp32_under_fsdp2(_accelerator(DistributedType.MULTI_GPU), "model")
    with pytest.warns(UserWarning, match="FSDP1 with mixed precision computes the router in bf16"):
        balancing.keep_routers_fp32_under_fsdp2(_accelerator(DistributedType.FSDP, fsdp_version=1), "model")
    assert calls == []
