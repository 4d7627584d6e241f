"""Fast decoding: a preallocated latent cache and a decode step replayed as one CUDA graph, greedy or sampled.

`model.generate(..., cache_implementation="static")` (or a generation config that says so, as TRL's
`cache_implementation="static"` does) runs `generate_static`; `fast_greedy_generate` is the greedy entry point;
`dsv3 bench-generate` (bench_generate.py) times it.

Decoding a small model at batch 1 is launch-bound: a step is a few hundred small kernels, and Python plus the
launches cost more than the GPU work. So the step is captured once in a torch.cuda.CUDAGraph and replayed. A graph
replays fixed addresses and shapes, so everything a step touches is preallocated and updated in place on the
device: the latent cache (`StaticLatentCache`, [B, max_length, R] and [B, max_length, r] per layer, written with
index_copy_ at a device-side position), the input token, the per-row RoPE positions, the validity mask over the
cache's columns, and the output buffer. The step never syncs with the host (the MoE counts experts with a
scatter_add, not bincount); the loop only reads back "are all rows finished?" every few steps.

Prefill runs the ordinary forward (naive MLA with the fused attention of `_attn_implementation`, DynamicCache),
exactly as generate() does, and its latent entries are copied into the static cache. Decode attention reads the
whole static cache under a mask whose columns turn valid as they are written; `mla_implementation="triton"` (the
kernels/mla_decode.py kernel, the default on CUDA) bounds its loop by the last valid column, so the unwritten tail
costs nothing. The output equals `model.generate(do_sample=False)`: same prefill, same positions (cumsum of the
mask), same absorbed-attention maths, same EOS/padding rule and stopping length.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import contextmanager

import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .modeling_dsv3 import DSV3ForCausalLM, resolve_generate_call
from .speculative import warped_probs


class StaticLatentCache:
    """Preallocated MLA latent cache, enough of transformers' Cache interface for DSV3Model's forward.

    Layer l holds c_kv [B, max_length, kv_lora_rank] and k_pe [B, max_length, qk_rope_head_dim]; `update` returns
    them as the [B, 1, max_length, d] views the model reads (keys = c_kv, values = k_pe, as with DynamicCache).
    Columns are physical positions shared by all rows; a row's padding holes are hidden by the attention mask, which
    must therefore be 4-D and cover all max_length columns (see `attention_mask`). Entries are written at
    `write_position` (a device LongTensor [S], settable in place for CUDA graphs) or, when that is None, right after
    the `get_seq_length(layer)` entries already written.
    """

    is_compileable = True

    def __init__(self, num_layers: int, batch_size: int, max_length: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype, device: torch.device | str):  # fmt: skip
        self.max_length = max_length
        self.c_kv = [
            torch.zeros(batch_size, max_length, kv_lora_rank, dtype=dtype, device=device) for _ in range(num_layers)
        ]
        self.k_pe = [
            torch.zeros(batch_size, max_length, rope_dim, dtype=dtype, device=device) for _ in range(num_layers)
        ]
        self.lengths = [0] * num_layers  # host-side, per layer: what get_seq_length reports
        self.write_position: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model: DSV3ForCausalLM, batch_size: int, max_length: int) -> StaticLatentCache:
        c = model.config
        p = model.lm_head.weight
        return cls(c.num_hidden_layers, batch_size, max_length, c.kv_lora_rank, c.qk_rope_head_dim, p.dtype, p.device)

    def __len__(self) -> int:
        return len(self.c_kv)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, cache_kwargs=None):
        """Write c_kv [B, 1, S, R] and k_pe [B, 1, S, r] at the write position; return the whole layer."""
        S = key_states.shape[2]
        pos = self.write_position
        if pos is None:
            start = self.lengths[layer_idx]
            pos = torch.arange(start, start + S, device=key_states.device)
        self.c_kv[layer_idx].index_copy_(1, pos, key_states[:, 0])
        self.k_pe[layer_idx].index_copy_(1, pos, value_states[:, 0])
        self.lengths[layer_idx] += S
        return self.c_kv[layer_idx][:, None], self.k_pe[layer_idx][:, None]

    def load_dynamic(self, cache: DynamicCache) -> None:
        """Copy a DynamicCache's latent entries (keys c_kv [B, 1, T, R], values k_pe [B, 1, T, r]) to columns [0, T)."""
        for i in range(len(self)):
            keys, values = cache.layers[i].keys, cache.layers[i].values
            T = keys.shape[2]
            self.c_kv[i][:, :T].copy_(keys[:, 0])
            self.k_pe[i][:, :T].copy_(values[:, 0])
            self.lengths[i] = T

    def attention_mask(self, padding_mask: torch.Tensor, query_length: int) -> torch.Tensor:
        """Boolean [B, 1, S, max_length] mask for the next `query_length` tokens, written after get_seq_length():
        causal, and False on padding (padding_mask [B, >= past + S], 1 = real token) and unwritten columns."""
        past = self.lengths[0]
        total = past + query_length
        cols = torch.arange(self.max_length, device=padding_mask.device)
        q_pos = torch.arange(past, total, device=padding_mask.device)
        mask = cols[None, :] <= q_pos[:, None]  # [S, max_length]; also hides every column >= total
        pad = torch.zeros(padding_mask.shape[0], self.max_length, dtype=torch.bool, device=padding_mask.device)
        pad[:, :total] = padding_mask[:, :total].bool()
        return (mask[None] & pad[:, None, :])[:, None]


@contextmanager
def _mla_implementation(model: DSV3ForCausalLM, name: str | None):
    """Run with config.mla_implementation = name (None: unchanged), restored afterwards."""
    old = model.config.mla_implementation
    if name is not None:
        model.config.mla_implementation = name
    try:
        yield
    finally:
        model.config.mla_implementation = old


def _eos_pad(model: DSV3ForCausalLM, eos_token_id, pad_token_id) -> tuple[list[int], int | None]:
    """EOS ids and the padding id for finished rows, resolved as generate() does (pad falls back to the first EOS)."""
    gc = model.generation_config
    eos = gc.eos_token_id if eos_token_id is None else eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = gc.pad_token_id if pad_token_id is None else pad_token_id
    if pad is None and eos:
        pad = eos[0]
    return eos, pad


def default_mla_implementation(device: torch.device) -> str | None:
    """The Triton latent-cache kernel ("triton") on CUDA with Triton, else None (keep the config's choice).
    A Hub folder's remote code has no kernels package: it keeps the torch absorbed path."""
    try:  # by name, like modeling_dsv3.optional_kernels: the Hub folder's loader must not look for kernels/
        capabilities = importlib.import_module("modeling_deepseek_v3.kernels._triton").capabilities
    except ImportError:
        return None
    return "triton" if device.type == "cuda" and capabilities().triton else None


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().argmax(-1)


def sampler(config: GenerationConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """Next-token choice from logits [B, V] -> [B], as generate() makes it: argmax without do_sample; with it, the
    distribution of transformers' warpers (temperature, top-k, top-p, min-p: `speculative.warped_probs`) and one
    categorical draw. The draw is an exponential race, argmax(p / E) with E ~ Exp(1) per entry, which picks i with
    probability p_i (the law of torch.multinomial(p, 1)) using only fixed-shape ops that a CUDA graph replays."""
    if not config.do_sample:
        return greedy

    def sample(logits: torch.Tensor) -> torch.Tensor:
        probs = warped_probs(logits, config.temperature, config.top_k, config.top_p, config.min_p)
        race = torch.empty_like(probs).exponential_().clamp_min_(torch.finfo(probs.dtype).tiny)  # no 0/0
        return (probs / race).argmax(-1)

    return sample


# generate() options generate_static honours; any other non-default GenerationConfig value is refused.
STATIC_SUPPORTED = {
    "max_new_tokens", "max_length", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p",
    "eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id", "use_cache", "cache_implementation",
    "disable_compile", "return_dict_in_generate", "transformers_version", "_from_model_config",
}  # fmt: skip


def generate_static(model: DSV3ForCausalLM, inputs=None, generation_config: GenerationConfig | None = None, **kwargs):
    """`model.generate(..., cache_implementation="static")`: generate()'s arguments and generation config, decoded
    by `fast_generate`. Returns the sequences (or GenerateDecoderOnlyOutput(sequences=...) with
    return_dict_in_generate). Extra keyword: `use_cuda_graph` (default True; ignored off CUDA)."""
    use_cuda_graph = kwargs.pop("use_cuda_graph", True)
    input_ids, attention_mask, config, max_new = resolve_generate_call(
        model, inputs, generation_config, kwargs, STATIC_SUPPORTED, 'generate(cache_implementation="static")'
    )
    was_training = model.training
    model.eval()  # no dropout in this model: eval changes nothing but keeps training-only bookkeeping off the graph
    try:
        sequences = fast_generate(
            model, input_ids, attention_mask, max_new, choose=sampler(config), min_new_tokens=config.min_new_tokens or 0,
            use_cuda_graph=use_cuda_graph, pad_token_id=config.pad_token_id,
            eos_token_id=config.eos_token_id if config.eos_token_id is not None else [],  # None here means none
        )  # fmt: skip
    finally:
        model.train(was_training)
    return GenerateDecoderOnlyOutput(sequences=sequences) if config.return_dict_in_generate else sequences


def fast_greedy_generate(model: DSV3ForCausalLM, input_ids: torch.LongTensor, attention_mask=None,
                         max_new_tokens: int = 32, **kwargs) -> torch.LongTensor:  # fmt: skip
    """Greedy `fast_generate`: equals `model.generate(..., do_sample=False)`."""
    return fast_generate(model, input_ids, attention_mask, max_new_tokens, **kwargs)


@torch.no_grad()
def fast_generate(
    model: DSV3ForCausalLM,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    choose: Callable[[torch.Tensor], torch.Tensor] = greedy,
    min_new_tokens: int = 0,
    use_cuda_graph: bool = True,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    mla_implementation: str | None = "default",
    stop_check_every: int = 16,
) -> torch.LongTensor:
    """Decoding with a static latent cache and (on CUDA) a CUDA-graph-replayed decode step.

    `choose` maps the next-token logits [B, V] to tokens [B] (`greedy`, or `sampler(config)` for generate()'s
    sampling); it runs inside the graph, so it must use fixed-shape device ops only. EOS cannot be chosen before
    `min_new_tokens` new tokens (generate()'s MinNewTokensLengthLogitsProcessor). Returns [B, prompt + new] token
    ids laid out as `model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=...)` returns them
    (left padding supported; rows that finished are padded and the output stops when every row has finished).
    `mla_implementation` overrides the config's for the call ("default": "triton" on CUDA, the config's
    elsewhere). `use_cuda_graph` is ignored off CUDA."""
    if mla_implementation == "default":
        mla_implementation = default_mla_implementation(input_ids.device)
    B, P = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if max_new_tokens <= 0:
        return input_ids
    eos, pad = _eos_pad(model, eos_token_id, pad_token_id)
    eos_t = torch.tensor(eos or [-1], device=device)
    if pad is None:
        pad = 0  # only used for finished rows, and with no EOS no row finishes
    use_cuda_graph = use_cuda_graph and device.type == "cuda"

    with _mla_implementation(model, mla_implementation):
        # Prefill: generate()'s own first forward (positions = cumsum of the mask - 1, padding at 0).
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        dynamic = DynamicCache()
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                       past_key_values=dynamic, use_cache=True, logits_to_keep=1).logits  # fmt: skip
        cache = StaticLatentCache.for_model(model, B, P + max_new_tokens)
        cache.load_dynamic(dynamic)
        del dynamic

        # The step's state, all on the device and updated in place (a CUDA graph replays fixed addresses).
        unfinished = torch.ones(B, dtype=torch.bool, device=device)
        out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
        alive = torch.zeros(max_new_tokens, dtype=torch.bool, device=device)  # any row unfinished after token i
        token = torch.zeros(B, 1, dtype=torch.long, device=device)
        position_ids = attention_mask.long().sum(-1, keepdim=True)  # [B, 1]: RoPE position of the next input token
        write_position = torch.full((1,), P, dtype=torch.long, device=device)  # its cache column
        step_index = torch.zeros(1, dtype=torch.long, device=device)
        valid = torch.zeros(B, cache.max_length, dtype=torch.bool, device=device)
        valid[:, :P] = attention_mask.bool()
        cache.write_position = write_position

        eos_column = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=device)
        eos_column[[e for e in eos if 0 <= e < model.config.vocab_size]] = True  # ids the head can emit

        def emit(next_logits: torch.Tensor) -> None:
            if min_new_tokens:  # EOS is not a candidate before min_new_tokens
                next_logits = next_logits.masked_fill(eos_column & (step_index < min_new_tokens), float("-inf"))
            nxt = choose(next_logits)
            nxt = torch.where(unfinished, nxt, pad)
            unfinished.logical_and_(~(nxt[:, None] == eos_t[None, :]).any(-1))
            out.index_copy_(1, step_index, nxt[:, None])
            alive.index_copy_(0, step_index, unfinished.any()[None])
            token.copy_(nxt[:, None])
            step_index.add_(1)

        def step() -> None:
            valid.index_fill_(1, write_position, True)
            step_logits = model(input_ids=token, attention_mask=valid[:, None, None, :], position_ids=position_ids,
                                past_key_values=cache, use_cache=True, logits_to_keep=1).logits  # fmt: skip
            position_ids.add_(1)
            write_position.add_(1)
            emit(step_logits[:, -1])

        emit(logits[:, -1])
        steps_left = max_new_tokens - 1
        graph = None
        done = 0
        while done < steps_left:
            if use_cuda_graph and graph is None and done >= 2:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):  # records the step; runs nothing
                    step()
            if graph is not None:
                graph.replay()
            elif use_cuda_graph and done < 2:  # warm-up steps (kernel compilation, cuBLAS workspaces) on a side stream
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    step()
                torch.cuda.current_stream().wait_stream(side)
            else:
                step()
            done += 1
            if (done % (stop_check_every if graph is not None else 1) == 0) and not bool(unfinished.any()):
                break
        cache.write_position = None

    # generate() stops right after the first token at which no row is left unfinished.
    finished_at = torch.nonzero(~alive[: done + 1])
    length = int(finished_at[0, 0]) + 1 if finished_at.numel() else done + 1
    return torch.cat([input_ids, out[:, :length]], dim=1)
