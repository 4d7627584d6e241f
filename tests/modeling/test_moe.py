import pytest
import torch

from modeling_deepseek_v3 import DSV3Config, DSV3ForCausalLM
from modeling_deepseek_v3.modeling_dsv3 import DSV3MoE, _grouped_mm, sequence_balance_loss

# fp32: the paths differ only in summation order (grouped vs per-expert GEMMs, the top-k sum by index_add or by slot).
FP32_ATOL = 1e-5


@pytest.mark.parametrize("impl", ["grouped_mm", "sorted"])
def test_expert_paths_match_the_eager_reference_forward_and_backward(tiny_config, impl):
    if impl == "grouped_mm" and _grouped_mm is None:
        pytest.skip("this torch has no grouped_mm")
    cfg = tiny_config(moe_implementation="eager")
    ref = DSV3MoE(cfg)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        ref.gate.e_score_correction_bias.zero_()[:4] = -10.0  # experts 0-3 are never chosen: zero-token experts
    test = DSV3MoE(tiny_config(moe_implementation=impl))
    test.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, cfg.hidden_size)
    x_ref, x_test = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, stats = ref(x_ref)
    y_test, _ = test(x_test)
    assert (stats.expert_load == 0).any(), "the case of experts with zero tokens must be covered"
    assert (y_ref - y_test).abs().max() <= FP32_ATOL
    g = torch.randn_like(y_ref)
    (y_ref * g).sum().backward()
    (y_test * g).sum().backward()
    assert (x_ref.grad - x_test.grad).abs().max() <= FP32_ATOL
    for (name, a), b in zip(ref.named_parameters(), test.parameters(), strict=True):
        assert (a.grad - b.grad).abs().max() <= FP32_ATOL, name


def test_auto_takes_grouped_mm_under_bf16_autocast_with_fp32_weights(tiny_config, monkeypatch):
    """accelerate's bf16 mixed precision: fp32 weights and activations, autocast around the forward. "auto" must
    still run grouped_mm (it once fell back to the sorted loop, whose host sync per expert and data-dependent
    shapes made `dsv3 train --compile` recompile on every step), match the sorted path, and trace in one graph."""
    if _grouped_mm is None:
        pytest.skip("this torch has no grouped_mm")
    from modeling_deepseek_v3 import modeling_dsv3 as M

    ref = DSV3MoE(tiny_config(moe_implementation="sorted"))
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.1)
    test = DSV3MoE(tiny_config(moe_implementation="auto"))
    test.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, ref.config.hidden_size)
    x_ref, x_test = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, _ = ref(x_ref)
        monkeypatch.setitem(M.EXPERTS_FUNCTIONS, "sorted", None)  # "auto" must not reach it now
        y_test, _ = test(x_test)
        compiled = torch.compile(test, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
        y_compiled, _ = compiled(x.clone())
    assert y_test.dtype == x.dtype == torch.float32  # the residual stream keeps its dtype
    # Both paths: bf16 GEMMs with fp32 accumulation, intermediate activations rounded to bf16 (2^-8 relative)
    # in a different order; 2e-2 of the output's norm is a few such roundings, far below a wrong expert's O(1).
    assert (y_test - y_ref).norm() <= 2e-2 * y_ref.norm()
    torch.testing.assert_close(y_compiled, y_test, rtol=0, atol=0)
    g = torch.randn_like(y_ref)
    (y_ref * g).sum().backward()
    (y_test * g).sum().backward()
    assert (x_test.grad - x_ref.grad).norm() <= 2e-2 * x_ref.grad.norm()
    for (name, a), b in zip(ref.named_parameters(), test.parameters(), strict=True):
        if a.grad is None:  # the router bias: no gradient on either side
            assert b.grad is None, name
            continue
        assert b.grad.dtype == torch.float32, name
        assert (b.grad - a.grad).norm() <= 2e-2 * a.grad.norm(), name


def test_bias_only_chooses_and_weights_are_normalised_scaled_scores(tiny_config):
    cfg = tiny_config()
    moe = DSV3MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.1)
    x = torch.randn(50, cfg.hidden_size)
    with torch.no_grad():
        moe.gate.e_score_correction_bias[5] = 10.0  # expert 5 wins every choice...
        logits, weights, idx = moe.gate(x)
    assert (idx == 5).any(-1).all()
    scores = logits.sigmoid()
    expected = scores.gather(1, idx)
    expected = expected / expected.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    assert torch.allclose(weights, expected)  # ...but its weight is its plain score, never the bias
    assert moe.gate.e_score_correction_bias.dtype == torch.float32


def test_router_stays_fp32_when_the_model_is_cast(tiny_config):
    model = DSV3ForCausalLM(tiny_config()).to(torch.bfloat16)
    gate = model.moe_layers()[0].gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16


def test_router_matches_the_builtin_at_v3_routing_shape_and_stays_fp32_under_autocast():
    """DeepSeek-V3's routing (256 experts, 8 groups, 4 kept, top-8) against transformers' built-in router: the same
    experts for every token and the same weights (ours selects by topk, as the built-in, in eager, by a sort under
    torch.compile: test_top_k_by_sort_under_compile_equals_topk). Under bf16 autocast (accelerate's
    mixed precision) our logits stay the fp32 ones bit for bit: autocast would otherwise run the router GEMM in bf16,
    whose 2^-8 rounding of the scores exceeds a bias step of gamma = 1e-3."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    from modeling_deepseek_v3.modeling_dsv3 import DSV3TopkRouter

    shape = dict(hidden_size=64, n_routed_experts=256, n_group=8, topk_group=4, num_experts_per_tok=8,
                 norm_topk_prob=True, routed_scaling_factor=2.5)  # fmt: skip
    ours = DSV3TopkRouter(DSV3Config(**shape, moe_intermediate_size=32))
    builtin = DeepseekV3TopkRouter(DeepseekV3Config(**shape))
    torch.nn.init.normal_(ours.weight, std=0.2)
    torch.nn.init.normal_(ours.e_score_correction_bias, std=0.05)
    builtin.load_state_dict(ours.state_dict())
    x = torch.randn(333, 64)
    logits, weights, idx = ours(x)
    logits_b, weights_b, idx_b = builtin(x)
    torch.testing.assert_close(logits, logits_b, rtol=0, atol=0)
    idx_sorted, order = idx.sort(dim=-1)
    idx_b_sorted, order_b = idx_b.sort(dim=-1)
    assert torch.equal(idx_sorted, idx_b_sorted)
    # weights: the same 8 scores, normalised by sums taken in another order (fp32 rounding)
    torch.testing.assert_close(weights.gather(1, order), weights_b.gather(1, order_b), rtol=1e-6, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_autocast, _, idx_autocast = ours(x)
    assert logits_autocast.dtype == torch.float32 and torch.equal(logits_autocast, logits)
    assert torch.equal(idx_autocast, idx)


@pytest.mark.parametrize("shape,k", [((333, 8, 8), 2), ((333, 8), 4), ((333, 64), 6), ((5, 256), 8)])
def test_top_k_by_sort_under_compile_equals_topk(shape, k):
    """The router's _top_k takes a stable sort while torch.compile traces it (one Triton kernel under inductor) and
    topk in eager: the same values and indices, largest first, on random scores (no ties), odd row counts."""
    from modeling_deepseek_v3.modeling_dsv3 import _top_k

    traced = []

    def record(gm, example_inputs):  # a torch.compile backend that notes the ops it is given and runs them
        traced.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_method")
        return gm.forward

    x = torch.rand(*shape, generator=torch.Generator().manual_seed(shape[-1]))
    values, indices = _top_k(x, k)
    values_sort, indices_sort = torch.compile(_top_k, backend=record, fullgraph=True)(x, k)
    assert "sort" in traced and "topk" not in traced
    ref_values, ref_indices = x.topk(k, dim=-1)
    assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices)
    assert torch.equal(values_sort, ref_values) and torch.equal(indices_sort, ref_indices)


def test_sequence_balance_loss_by_hand():
    # B=1, S=2 tokens, E=2 experts, K=1. Token 0 -> expert 0, token 1 -> expert 0.
    logits = torch.tensor([[[0.0, 0.0], [torch.logit(torch.tensor(0.75)), torch.logit(torch.tensor(0.25))]]])
    idx = torch.tensor([[[0], [0]]])
    # f = E/(K S) * counts = [2, 0]; P_0 = mean(0.5/1, 0.75/1) = 0.625 -> L = 2 * 0.625
    assert torch.isclose(sequence_balance_loss(logits, idx), torch.tensor(1.25))


def test_batch_scope_is_the_classic_auxiliary_loss(tiny_config):
    """aux_loss_scope="batch": f and P over every real token of the micro-batch at once (the classic auxiliary loss),
    computed here by hand from the router's own logits and choices; "sequence" averages per-sequence losses."""
    torch.manual_seed(0)
    cfg = tiny_config(num_nextn_predict_layers=0, seq_aux_loss_alpha=0.01, aux_loss_scope="batch")
    moe = next(m for m in DSV3ForCausalLM(cfg).modules() if isinstance(m, DSV3MoE))
    x = torch.randn(3, 7, cfg.hidden_size)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, :4] = False  # left padding: out of f and P
    _, stats = moe(x, mask)
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    with torch.no_grad():
        _, _, idx_TK = moe.gate(x.reshape(21, -1))
    real = mask.reshape(21)
    scores = stats.logits.float().sigmoid()
    P = (scores / scores.sum(-1, keepdim=True))[real].mean(0)
    f = torch.bincount(idx_TK[real].reshape(-1), minlength=E).float() * E / (K * real.sum())
    assert torch.allclose(stats.seq_aux_loss, 0.01 * (f * P).sum(), rtol=1e-6)
    cfg.aux_loss_scope = "sequence"
    _, per_sequence = moe(x, mask)
    assert not torch.allclose(per_sequence.seq_aux_loss, stats.seq_aux_loss)  # the two scopes differ on 3 rows
    _, one_row_seq = moe(x[:1], mask[:1])
    cfg.aux_loss_scope = "batch"
    _, one_row_batch = moe(x[:1], mask[:1])
    assert torch.equal(one_row_seq.seq_aux_loss, one_row_batch.seq_aux_loss)  # and agree on one


def test_expert_load_and_router_logits_are_reported(tiny_config):
    cfg = tiny_config()
    model = DSV3ForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    out = model(ids, labels=ids, output_router_logits=True)
    n_main = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    n_mtp = cfg.num_nextn_predict_layers
    assert out.expert_load.shape == (n_main + n_mtp, cfg.n_routed_experts)
    assert (out.expert_load[:n_main].sum(-1) == 2 * 9 * cfg.num_experts_per_tok).all()
    # The depth-1 MTP layer's last position embeds padding (there is no t_{i+1}): it is not counted.
    assert (out.expert_load[n_main:].sum(-1) == 2 * 8 * cfg.num_experts_per_tok).all()
    assert len(out.router_logits) == n_main and out.router_logits[0].shape == (18, cfg.n_routed_experts)
    assert out.aux_loss > 0 and out.aux_loss.requires_grad


def test_no_aux_loss_when_alpha_is_zero(tiny_config):
    model = DSV3ForCausalLM(tiny_config(seq_aux_loss_alpha=0.0))
    ids = torch.randint(0, 512, (1, 6))
    out = model(ids, labels=ids)
    assert out.aux_loss is None and torch.isclose(out.loss, out.lm_loss + out.mtp_loss)


def test_padding_does_not_count_in_loads_or_balance_loss(tiny_config):
    """Left padding changes neither the expert loads nor the balance loss of the real tokens."""
    model = DSV3ForCausalLM(tiny_config(num_nextn_predict_layers=1)).train()
    a = torch.randint(2, 512, (1, 9))
    b = torch.randint(2, 512, (1, 6))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    labels = batch.masked_fill(mask == 0, -100)
    out = model(batch, attention_mask=mask, labels=labels)
    alone = [model(x, labels=x) for x in (a, b)]
    assert torch.equal(out.expert_load, alone[0].expert_load + alone[1].expert_load)
    # The balance loss is a per-sequence mean over real tokens: the batch value is the mean of the two.
    assert torch.isclose(out.aux_loss, (alone[0].aux_loss + alone[1].aux_loss) / 2, rtol=1e-5)


def test_trainer_normalisation_scales_mtp_and_balance_losses(tiny_config):
    """With num_items_in_batch (Trainer's gradient-accumulation normalisation) every part of the loss is a sum over
    this micro-batch divided by the step's label count: doubling num_items halves each part."""
    model = DSV3ForCausalLM(tiny_config(num_nextn_predict_layers=1))
    ids = torch.randint(0, 512, (2, 10))
    n = (ids[:, 1:] != -100).sum()
    one = model(ids, labels=ids, num_items_in_batch=n)
    two = model(ids, labels=ids, num_items_in_batch=2 * n)
    for part in ("lm_loss", "mtp_loss", "aux_loss"):
        assert torch.isclose(getattr(two, part), getattr(one, part) / 2, rtol=1e-5), part


@pytest.mark.parametrize("weighted", [False, True])
def test_top_k_sum_gathers_by_slot_under_compile_and_index_adds_in_eager(monkeypatch, weighted):
    """_sum_slots (the top-k combine and the gather's gradient) takes each slot's row under torch.compile (one fused
    kernel, no atomics) and one index_add in eager mode: both branches agree (fp32, to summation order), gradients
    through _Combine and _Gather included."""
    from modeling_deepseek_v3 import modeling_dsv3 as M

    T, K, E, D = 37, 3, 8, 24
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    x = torch.randn(T, D)
    w = torch.rand(T, K) if weighted else None
    results = []
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda c=compiling: c)
        x_ = x.clone().requires_grad_()
        w_ = None if w is None else w.clone().requires_grad_()
        x_RD, routing, _ = M._sort_by_expert(x_, idx, E)
        y_RD = x_RD * torch.arange(1, x_RD.shape[0] + 1)[:, None]  # rows told apart
        out = M._sum_slots(y_RD, routing, w_) if w_ is None else M._combine(y_RD, routing, w_)
        out.backward(torch.randn(T, D, generator=torch.Generator().manual_seed(1)))
        results.append([out, x_.grad] + ([] if w_ is None else [w_.grad]))
    for a, b in zip(*results, strict=True):
        assert a.abs().sum() > 0 and (a - b).abs().max() <= 1e-5 * a.abs().max()


@pytest.mark.parametrize("T, D, E", [(257, 300, 24), (1000, 2048, 64)])
def test_router_logits_from_bf16_gemms(T, D, E):
    """The router's fp32 logits from bf16 GEMMs (_RouterLogits: the weight and the gradient split into bf16 pieces,
    every piece product exact), which eager CUDA training runs for a bf16 model, here on the CPU's fp32 stand-in for
    those GEMMs (exact accumulation of the same products; the H200's tensor-core sums are in _RouterLogits'
    docstring), against fp64. Forward and dW: no worse than fp32 F.linear within a factor 2 for summation order (a
    two-piece split of the weight or of the gradient is 10x worse). dx, rounded to bf16: at least 99.9% equal to the
    exact product rounded to bf16 (the largest piece product alone gets 50%). On the CPU router_logits stays fp32
    F.linear."""
    from modeling_deepseek_v3.modeling_dsv3 import _RouterLogits, router_logits

    x = (torch.randn(T, D) * torch.logspace(-2, 1, D)).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(E, D) * 0.02).requires_grad_()
    g = torch.randn(T, E)
    y = _RouterLogits.apply(x, w)
    y.backward(g)
    x32, w32 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y32 = router_logits(x32, w32)
    assert torch.equal(y32, torch.nn.functional.linear(x32.float(), w32))
    y32.backward(g)
    x64, w64, g64 = x.detach().double(), w.detach().double(), g.double()

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert y.dtype == torch.float32 and rel(y, x64 @ w64.T) < 2 * rel(y32, x64 @ w64.T)
    assert w.grad.dtype == torch.float32 and rel(w.grad, g64.T @ x64) < 2 * rel(w32.grad, g64.T @ x64)
    exact_dx = (g64 @ w64).to(torch.bfloat16)
    assert x.grad.dtype == torch.bfloat16 and (x.grad == exact_dx).float().mean() >= 0.999
