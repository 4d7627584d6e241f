"""MTP self-speculative decoding (paper section 2.2 / 5.4.3): the D MTP modules draft, the main model verifies.

One step, per row: the main model runs [x, d_1..d_D] (x = last emitted token, not yet in the cache; d = drafts) in
ONE forward over the latent cache. Greedy keeps the longest prefix of drafts equal to the main model's argmax;
sampling accepts d_j with probability min(1, p(d_j)/q(d_j)) and on rejection samples from norm(max(0, p - q))
(Leviathan et al. 2023, Chen et al. 2023), or samples a bonus token from p when all D drafts pass, so the output
follows the target distribution exactly. Then the MTP chain runs over the accepted positions to extend its own
cache and draft the next D tokens: depth k at position i combines h^{k-1}_i with Emb(t_{i+k}) (h^0 is the main
model's final-norm hidden state), exactly the training alignment of `DSV3Model.mtp_forward`.

Batches with different acceptance per row: every row keeps its own progress. All rows share one physical cache
length; a row that accepted fewer tokens than the batch's best keeps "holes" (rejected drafts) that its 2-D
attention mask hides. RoPE is applied with each row's own position ids when a latent entry is written, so an entry
never depends on where it sits physically: holes are harmless, and a compaction (a stable per-row gather that moves
holes to the left, where they become ordinary left padding, then drops the all-hole columns) bounds the waste.
Rejected tail columns that no row kept are cropped away after each verification.

MTP caches (a second DynamicCache, indexed by the MTP layers' own layer_idx) share the main cache's layout and
mask. Depth 1's entries are exact (every input token is accepted). Depth k >= 2 at the last k-1 accepted positions
needs tokens beyond the last emitted one; it embeds the drafts of the lower depths there (as at the draft position
itself) and keeps those entries: an approximation that only affects draft quality, never the output.

Statistics (rows count only while unfinished): `drafted` = D per row per verification, `accepted` = drafts the
verifier accepted, `acceptance_rate` = accepted / drafted (with D = 1: the paper's acceptance rate of the second
token), `mean_accepted_length` = tokens emitted per row per verification = 1 + accepted / (drafted / D), `steps` =
verification forwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache
from transformers.utils import ModelOutput

from .modeling_dsv3 import DSV3ForCausalLM, build_attention_mask, resolve_generate_call


@dataclass
class SpeculativeOutput(ModelOutput):
    """What `mtp_generate` returns; `sequences` is laid out as `generate()`'s (prompt, then new tokens, rows that
    stopped early padded with pad_token_id). The statistics are defined in this module's docstring."""

    sequences: torch.LongTensor | None = None
    acceptance_rate: float | None = None
    mean_accepted_length: float | None = None
    steps: int | None = None
    drafted: int | None = None
    accepted: int | None = None


def warped_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None):  # fmt: skip
    """Sampling distribution of logits [..., V] after temperature, top-k, top-p and min-p, in that order and with
    the same tie rules as transformers' warpers (so mtp_generate and fast_decode sample what
    generate(do_sample=True) samples). Fixed-shape ops only: a CUDA graph can replay it."""
    logits = logits.float()
    if temperature is not None and temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)  # ascending: drop the low tail whose mass is <= 1 - top_p
        drop_sorted = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop_sorted[..., -1] = False  # keep at least the best token
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(-1)
    if min_p is not None:  # drop tokens below min_p x the top probability (never the top token itself)
        probs = logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf")).softmax(-1)
    return probs


def _edit_cache(cache: DynamicCache, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Apply fn to every filled layer's latent tensors [B, 1, T, d] along T. Done on the tensors directly: the
    signature of DynamicCache.crop changed across transformers 5.x (max length, then a negative count)."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys, layer.values = fn(layer.keys), fn(layer.values)


def _compact(caches: list[DynamicCache], valid_BT: torch.Tensor) -> torch.Tensor:
    """Move each row's holes to the left (a stable sort keeps the order of its valid entries, which is all causal
    attention over the past needs) and drop the columns that are holes in every row. Returns the new mask."""
    drop = valid_BT.shape[1] - int(valid_BT.sum(1).max())
    order_BT = valid_BT.int().argsort(dim=1, stable=True)[:, drop:]

    def gather(t: torch.Tensor) -> torch.Tensor:  # t [B, 1, T, d]
        return t.gather(2, order_BT[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))

    for cache in caches:
        _edit_cache(cache, gather)
    return valid_BT.gather(1, order_BT)


@torch.no_grad()
def mtp_generate(
    model: DSV3ForCausalLM,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    num_draft_tokens: int | None = None,
    compact_slack: int = 64,
) -> SpeculativeOutput:
    """Decode with the model's MTP modules as the draft model (see the module docstring).

    Greedy output equals `model.generate(do_sample=False)` token for token; sampled output follows the same
    distribution as `generate(do_sample=True)` with the same temperature/top_k/top_p. Prompts are left-padded
    (`attention_mask` 0 on the left). `num_draft_tokens` uses only the first depths (default: all D);
    `compact_slack` is how many hole columns the cache may carry before it is compacted.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    inner = model.model
    D = len(inner.mtp_layers) if num_draft_tokens is None else num_draft_tokens
    if not 1 <= D <= len(inner.mtp_layers):
        raise ValueError(f"need 1 <= num_draft_tokens <= {len(inner.mtp_layers)} (num_nextn_predict_layers), got {D}")
    B, S = input_ids.shape
    dev = input_ids.device
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    eos = torch.tensor(eos_ids, dtype=torch.long, device=dev)
    pad = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    rows = torch.arange(B, device=dev)

    def pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Next token per row of logits [B, V], and the distribution it came from (None when greedy)."""
        if not do_sample:
            return logits.argmax(-1), None
        probs = warped_probs(logits, temperature, top_k, top_p)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1), probs

    def draft(h_BAH, ext_BX, last_B, pos_BA, valid_BT) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run depths 1..D over the A newest positions (writing the MTP cache) and draft D tokens per row from
        position last_B. ext_BX[:, i] is the token after position i (X = A + D); the drafts extend it."""
        A = h_BAH.shape[1]
        mask = build_attention_mask(valid_BT, B, A, valid_BT.shape[1] - A, dev)
        position_embeddings = inner.rotary_emb(h_BAH, pos_BA)
        drafts, probs = [], []
        for k, layer in enumerate(inner.mtp_layers[:D], start=1):
            # Depth k at position i embeds t_{i+k}: ext shifted by k - 1.
            h_BAH, _, head_input = layer(
                h_BAH, inner.embed_tokens(ext_BX[:, k - 1 : k - 1 + A]), position_embeddings, mask, mtp_cache
            )
            token, prob = pick(model.lm_head(head_input[rows, last_B]))
            ext_BX.scatter_(1, (last_B + k)[:, None], token[:, None])  # what depth k + 1 embeds at last_B
            drafts.append(token)
            probs.append(prob)
        return torch.stack(drafts, 1), (torch.stack(probs, 1) if do_sample else None)

    # Prefill: the main model over the prompt (HF's position ids for left padding), first token, first drafts.
    cache, mtp_cache = DynamicCache(), DynamicCache()
    pos_BS = (valid.long().cumsum(-1) - 1).clamp(min=0)
    h_BSH = inner(input_ids, attention_mask=valid, position_ids=pos_BS, cache=cache, use_cache=True).last_hidden_state
    x, _ = pick(model.lm_head(h_BSH[:, -1]))
    tokens = torch.full((B, max_new_tokens + D + 1), pad, dtype=torch.long, device=dev)  # new tokens, per row
    tokens[:, 0] = x
    n_new = torch.ones(B, dtype=torch.long, device=dev)
    done = torch.isin(x, eos) | (max_new_tokens <= 1)
    next_pos = pos_BS[:, -1] + 1
    steps = drafted = accepted = 0
    finished = bool(done.all())
    n_valid = valid.sum(1)  # per row: cache columns that are not holes (the longest row bounds compaction)
    if not finished:
        ext = torch.cat([input_ids[:, 1:], x[:, None], x.new_full((B, D), pad)], 1)
        drafts, q = draft(h_BSH, ext, torch.full_like(x, S - 1), pos_BS, valid)

    offsets = torch.arange(D + 1, device=dev)
    while not finished:
        # Verify: one main forward over [x, d_1..d_D] at each row's own positions.
        block = torch.cat([x[:, None], drafts], 1)  # [B, D+1]
        block_pos = next_pos[:, None] + offsets
        valid = torch.cat([valid, valid.new_ones(B, D + 1)], 1)
        h_BLH = inner(
            block, attention_mask=valid, position_ids=block_pos, cache=cache, use_cache=True
        ).last_hidden_state
        logits = model.lm_head(h_BLH)  # [B, D+1, V]; position j verifies d_{j+1}, position D gives the bonus
        if do_sample:
            p = warped_probs(logits, temperature, top_k, top_p)
            p_d = p[:, :D].gather(-1, drafts[..., None]).squeeze(-1)
            q_d = q.gather(-1, drafts[..., None]).squeeze(-1)
            u = torch.rand(B, D, device=dev, generator=generator)
            ok = u * q_d < p_d  # u < p/q without dividing; q_d > 0 since d was drawn from q
            n_acc = ok.long().cumprod(1).sum(1)
            # Rejected at n_acc: sample norm(max(0, p - q)); all accepted: q is padded with zeros, so this is p_D.
            p_a = p[rows, n_acc]
            residual = (p_a - torch.cat([q, torch.zeros_like(q[:, :1])], 1)[rows, n_acc]).clamp(min=0)
            mass = residual.sum(-1, keepdim=True)
            residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_a)  # p == q: rejection had prob 0
            x = torch.multinomial(residual, 1, generator=generator).squeeze(-1)
        else:
            target = logits.argmax(-1)  # [B, D+1]
            n_acc = (drafts == target[:, :D]).long().cumprod(1).sum(1)
            x = target[rows, n_acc]
        new = torch.cat([drafts, x[:, None]], 1).scatter(1, n_acc[:, None], x[:, None])  # [B, D+1], valid <= n_acc

        # Emit, stop rows at eos or at max_new_tokens, count statistics over the rows that were still running.
        active = ~done
        tokens.scatter_(1, (n_new[:, None] + offsets).clamp(max=tokens.shape[1] - 1), new)
        kept = offsets <= n_acc[:, None]
        hit_eos = (torch.isin(new, eos) & kept & (n_new[:, None] + offsets < max_new_tokens)).any(1)
        n_new = torch.where(active, n_new + n_acc + 1, n_new)
        done = done | hit_eos | (n_new >= max_new_tokens)
        steps += 1
        A_t = ((n_acc + 1) * active).max()  # columns of this block that some running row keeps
        n_valid = n_valid + torch.minimum(n_acc + 1, A_t)
        stats = [active.sum(), (n_acc * active).sum(), A_t, n_valid.max(), done.all()]
        n_rows, n_accepted, A, top_valid, finished = torch.stack(stats).tolist()  # the one host sync per step
        drafted, accepted = drafted + D * n_rows, accepted + n_accepted
        if finished:
            break

        # Keep the A columns some running row accepted; the others' rejected drafts in them become holes.
        _edit_cache(cache, lambda t, drop=D + 1 - A: t[:, :, : t.shape[2] - drop])
        valid = torch.cat([valid[:, : valid.shape[1] - (D + 1)], offsets[None, :A] <= n_acc[:, None]], 1)
        last = n_acc.clamp(max=A - 1)  # finished rows may have accepted more; their drafts are ignored
        ext = torch.cat([new[:, :A], new.new_full((B, D), pad)], 1)
        drafts, q = draft(h_BLH[:, :A], ext, last, block_pos[:, :A], valid)
        next_pos = next_pos + n_acc + 1
        if valid.shape[1] - top_valid >= compact_slack:
            valid = _compact([cache, mtp_cache], valid)

    # Cut each row at its first eos (inclusive) and at max_new_tokens; pad to the longest row, as generate() does.
    idx = torch.arange(tokens.shape[1], device=dev)
    is_eos = torch.isin(tokens, eos) & (idx < n_new[:, None])
    length = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, n_new).clamp(max=max_new_tokens)
    width = int(length.max())
    new_tokens = tokens[:, :width].masked_fill(idx[:width] >= length[:, None], pad)
    return SpeculativeOutput(
        sequences=torch.cat([input_ids, new_tokens], 1),
        acceptance_rate=accepted / drafted if drafted else 0.0,
        mean_accepted_length=1 + accepted / (drafted / D) if drafted else 1.0,
        steps=steps,
        drafted=drafted,
        accepted=accepted,
    )


# generate() options mtp_generate honours; any other non-default GenerationConfig value is refused, not ignored.
_SUPPORTED = {
    "max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id",
    "bos_token_id", "decoder_start_token_id", "use_cache", "return_dict_in_generate", "transformers_version",
    "_from_model_config",
}  # fmt: skip


def generate_with_mtp(
    model: DSV3ForCausalLM,
    inputs: torch.LongTensor | None = None,
    generation_config: GenerationConfig | None = None,
    **kwargs,
) -> torch.LongTensor | SpeculativeOutput:
    """`model.generate(..., use_mtp=True)`: resolve generate()'s arguments and generation config, run mtp_generate.

    Returns the sequences tensor, or the SpeculativeOutput (which has `.sequences`, like generate's output
    classes) when return_dict_in_generate=True. Either way the statistics are left on
    `model.last_speculative_stats`. Extra keywords: `generator`, `num_draft_tokens`.
    """
    extra = {k: kwargs.pop(k) for k in ("generator", "num_draft_tokens") if k in kwargs}
    input_ids, attention_mask, config, max_new = resolve_generate_call(
        model, inputs, generation_config, kwargs, _SUPPORTED, "generate(use_mtp=True)"
    )
    out = mtp_generate(
        model,
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new,
        do_sample=bool(config.do_sample),
        temperature=config.temperature if config.temperature is not None else 1.0,
        top_k=config.top_k,
        top_p=config.top_p,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        **extra,
    )
    model.last_speculative_stats = out
    return out if config.return_dict_in_generate else out.sequences


@torch.no_grad()
def make_copying_mtp_(model: DSV3ForCausalLM, leak: float = 0.0) -> DSV3ForCausalLM:
    """Rewire a model in place so that its MTP modules predict what the main model will: for tests of the
    high-acceptance path and for upper-bound benchmarks (compute is unchanged, only weights are overwritten).

    The main blocks' output projections are scaled by `leak`, so the main model's final hidden state at i is
    norm(Emb(t_i)) plus leak times a context term; every MTP block becomes the identity and eh_proj keeps only its
    embedding half, so depth k at i outputs norm(Emb(t_{i+k})): the main model's state at i + k when leak = 0
    (acceptance 1), and an imperfect guess of it when leak > 0.
    """
    inner = model.model

    def scale_block(layer, factor: float) -> None:
        layer.self_attn.o_proj.weight.mul_(factor)
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            mlp.experts.down_proj.mul_(factor)
            mlp = mlp.shared_experts
        if mlp is not None:
            mlp.down_proj.weight.mul_(factor)

    for layer in inner.layers:
        scale_block(layer, leak)
    H = model.config.hidden_size
    for layer in inner.mtp_layers:
        scale_block(layer, 0.0)
        layer.eh_proj.weight.zero_()
        layer.eh_proj.weight[:, :H].copy_(torch.eye(H))  # input is [enorm(Emb(t_{i+k})); hnorm(h)]
        layer.enorm.weight.fill_(1.0)
        layer.shared_head.norm.weight.copy_(inner.norm.weight)
    return model
