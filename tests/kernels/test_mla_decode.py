"""Absorbed-MLA decode kernel (kernels/mla_decode.py) vs its torch reference, under Triton's interpreter; and the
model's mla_implementation="triton" decode path vs the torch absorbed path and generate()."""

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
from modeling_deepseek_v3.kernels import mla_decode, mla_decode_ref  # noqa: E402

# Relative Frobenius error ||out - ref|| / ||ref||; the reference is fp32 maths on the same (rounded) inputs.
MLA_TOL = {
    # Same fp32 operands; only the order of the fp32 sums (online softmax over tiles and splits) differs.
    torch.float32: 1e-5,
    # Two fp32->bf16 casts that the interpreter truncates (conftest: <= 2^-7 relative, RMS ~3.4e-3): the output,
    # and the unnormalised probabilities fed to the p.c_kv dot (a truncation of p biases each weight down by
    # ~2^-8 on average against an untruncated denominator: ~3.9e-3). Measured 4.9e-3 .. 5.9e-3.
    torch.bfloat16: 8e-3,
}

# (B, H, T, R, r): T odd or tile-ragged; R = 512, r = 64 is the 671B head shape; r = 8 pads the rope dot to 16.
SHAPES = [
    (1, 4, 1, 32, 8),
    (2, 4, 7, 32, 8),
    (3, 16, 130, 64, 64),
    (2, 16, 1000, 64, 8),
    (1, 4, 1000, 512, 64),
    (2, 16, 130, 512, 64),
]


def _inputs(B, H, T, R, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, R, generator=g).to(dtype)
    q_pe = torch.randn(B, H, r, generator=g).to(dtype)
    c_kv = torch.randn(B, T, R, generator=g).to(dtype)
    k_pe = torch.randn(B, T, r, generator=g).to(dtype)
    return q, q_pe, c_kv, k_pe


def _left_padding(B, T):
    """Row b has a hole of b * T // 3 padding positions at the start (row 0 none)."""
    mask = torch.ones(B, T, dtype=torch.bool)
    for b in range(B):
        mask[b, : b * T // 3] = False
    return mask


@pytest.mark.parametrize("B,H,T,R,r", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_matches_reference(B, H, T, R, r, dtype, num_splits, rel):
    q, q_pe, c_kv, k_pe = _inputs(B, H, T, R, r, dtype, seed=T)
    scale = (R // 4) ** -0.5
    mask = _left_padding(B, T)
    out = mla_decode(q, q_pe, c_kv, k_pe, scale, mask=mask, num_splits=num_splits)
    ref = mla_decode_ref(q, q_pe, c_kv, k_pe, scale, mask=mask)
    assert out.dtype == dtype and out.shape == (B, H, R) and not out.isnan().any()
    assert rel(out, ref) < MLA_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lengths_holes_and_splits(dtype, rel):
    """Per-row lengths (a static cache's unwritten tail) with holes inside; splits that are entirely padding or
    entirely past a row's length; small tiles so that every split spans several tiles."""
    B, H, T, R, r = 3, 16, 300, 64, 16
    q, q_pe, c_kv, k_pe = _inputs(B, H, T, R, r, dtype, seed=1)
    mask = _left_padding(B, T)
    mask[0, 50:70] = False  # a hole in the middle
    mask[1, :] = True
    lengths = torch.tensor([300, 41, 250])  # row 1 stops in split 0; row 2's first 200 positions are padding
    out = mla_decode(q, q_pe, c_kv, k_pe, 0.1, lengths=lengths, mask=mask, num_splits=5, block_t=16)
    ref = mla_decode_ref(q, q_pe, c_kv, k_pe, 0.1, lengths=lengths, mask=mask)
    assert rel(out, ref) < MLA_TOL[dtype]
    # A mask alone bounds the loop at its last True: the same as lengths = last True + 1.
    tail = mask.clone()
    tail[:, 200:] = False
    out = mla_decode(q, q_pe, c_kv, k_pe, 0.1, mask=tail, num_splits=4)
    assert rel(out, mla_decode_ref(q, q_pe, c_kv, k_pe, 0.1, mask=tail)) < MLA_TOL[dtype]


@pytest.mark.parametrize("split_scores", [False, True])
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_code_paths(split_scores, tma, dtype, rel):
    """Each of the kernel's code paths (scores split across warpgroups or not; TMA descriptors, which zero-fill
    past a row's end, or masked pointer loads) on fresh inputs: lengths that end inside a tile, holes, a row with
    nothing valid, one and several splits, R not a power of two (padded to BLOCK_R). The L2 prefetch (inline PTX)
    runs on GPUs only; the interpreter skips it, and it changes no result."""
    B, H, T, R, r = 4, 20, 203, 48, 16
    q, q_pe, c_kv, k_pe = _inputs(B, H, T, R, r, dtype, seed=7)
    mask = _left_padding(B, T)
    mask[0, 90:101] = False
    mask[3] = False
    lengths = torch.tensor([203, 77, 160, 203])
    for ns, bt in ((1, 32), (3, 16)):
        out = mla_decode(q, q_pe, c_kv, k_pe, 0.15, lengths=lengths, mask=mask, num_splits=ns, block_t=bt,
                         split_scores=split_scores, tma=tma)  # fmt: skip
        ref = mla_decode_ref(q, q_pe, c_kv, k_pe, 0.15, lengths=lengths, mask=mask)
        assert not out.isnan().any() and torch.equal(out[3], torch.zeros_like(out[3]))
        assert rel(out[:3], ref[:3]) < MLA_TOL[dtype]


def test_tma_falls_back_on_misaligned_views(rel):
    """A cache view whose rows are not 16-byte aligned cannot be a TMA descriptor: the pointer path runs instead,
    with the same result."""
    B, H, T, R, r = 2, 16, 50, 36, 8  # 36 x 4 B = 144 B rows: aligned; offset the view by one element
    buf = torch.randn(B, T * (R + 1) + 1)
    c_kv = buf[:, 1 : 1 + T * (R + 1)].view(B, T, R + 1)[..., :R]  # row stride 37 x 4 B: not a 16-byte multiple
    q, q_pe, _, k_pe = _inputs(B, H, T, R, r, torch.float32, seed=3)
    out = mla_decode(q, q_pe, c_kv, k_pe, 0.2, tma=True, split_scores=True, num_splits=2)
    assert rel(out, mla_decode_ref(q, q_pe, c_kv, k_pe, 0.2)) < MLA_TOL[torch.float32]


def test_no_mask_strided_inputs_and_empty_rows(rel):
    """Views as the model passes them (q [B, S=1, H, R][:, 0], cache [B, 1, T, R].squeeze(1) of a larger
    buffer); a row with no valid position gives zeros (not NaN)."""
    B, H, T, R, r = 2, 4, 37, 32, 8
    q4 = torch.randn(B, 1, H, R + 5)[..., :R]
    qp4 = torch.randn(B, 1, H, r)
    cache = torch.randn(B, 1, T + 11, R)[:, :, :T]
    kpe = torch.randn(B, 1, T + 11, r)[:, :, :T]
    args = (q4[:, 0], qp4[:, 0], cache.squeeze(1), kpe.squeeze(1), 0.2)
    assert rel(mla_decode(*args, num_splits=2), mla_decode_ref(*args)) < MLA_TOL[torch.float32]
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1] = False
    out = mla_decode(*args, mask=mask, num_splits=2)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert rel(out[0], mla_decode_ref(*args)[0]) < MLA_TOL[torch.float32]


# ------------------------------------------------------------------------------------------- model integration
def _model(tiny_config, **overrides):
    from modeling_deepseek_v3 import DSV3ForCausalLM

    torch.manual_seed(0)
    return DSV3ForCausalLM(tiny_config(**overrides)).eval()


def test_model_triton_decode_matches_absorbed(tiny_config):
    """One decode forward with left padding: mla_implementation='triton' (kernel) vs 'auto' (torch absorbed)."""
    from transformers.cache_utils import DynamicCache

    model = _model(tiny_config)
    ids = torch.randint(2, 512, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    logits = {}
    for impl in ("auto", "triton"):
        model.config.mla_implementation = impl
        cache = DynamicCache()
        with torch.no_grad():
            out = model(ids, attention_mask=mask, past_key_values=cache)
            step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            logits[impl] = model(out.logits[:, -1:].argmax(-1), attention_mask=step_mask, past_key_values=cache).logits
    torch.testing.assert_close(logits["triton"], logits["auto"], rtol=1e-5, atol=1e-5)


def test_fast_greedy_with_kernel_equals_generate(tiny_config):
    from modeling_deepseek_v3.fast_decode import fast_greedy_generate

    model = _model(tiny_config)
    ids = torch.randint(2, 512, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    out = fast_greedy_generate(model, ids, mask, max_new_tokens=6, mla_implementation="triton")
    assert torch.equal(out, ref)
    assert model.config.mla_implementation == "auto"  # restored
