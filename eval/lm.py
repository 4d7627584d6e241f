"""The model side of evaluation: batched log-likelihoods and generation over token ids, with left padding.

Tasks tokenize; this class only sees ids, so tests can drive it with a small-vocabulary model and no tokenizer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList


@dataclass
class Timing:
    """Counters one task reads before and after it runs, for tokens/s in the results."""

    forward_tokens: int = 0
    new_tokens: int = 0
    generate_s: float = 0.0


@dataclass
class LM:
    """A causal LM and its tokenizer, evaluated in batches of `batch_size` rows, left-padded.

    Rows are sorted by length (longest first) before batching, so padding stays small and an out-of-memory error
    shows up in the first batch; results come back in the caller's order.
    """

    model: torch.nn.Module
    tokenizer: object | None = None
    batch_size: int = 8
    progress: bool = True
    pad_id: int = 0
    timing: Timing = field(default_factory=Timing)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    def loglikelihood(
        self, requests: Sequence[tuple[list[int], list[int]]], desc: str = "loglikelihood"
    ) -> list[tuple[float, bool]]:
        """For each (context ids, continuation ids): the summed log-probability of the continuation given the
        context, and whether greedy decoding would have produced it. The context must not be empty."""
        for ctx, cont in requests:
            if not ctx or not cont:
                raise ValueError("loglikelihood needs a non-empty context (start it with BOS) and continuation")
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc=desc, disable=not self.progress, leave=False):
            # The model sees ctx + cont[:-1]; the last position's prediction isn't needed.
            rows = [(requests[i][0] + requests[i][1])[:-1] for i in batch]
            conts = [requests[i][1] for i in batch]
            n_max = max(len(c) for c in conts)
            ids, mask = self._left_pad(rows)
            with torch.inference_mode():
                # Only the last n_max positions predict continuation tokens: skipping the rest of the LM head saves
                # B x T x 129,280 floats.
                logits = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=_positions(mask),
                    use_cache=False,
                    logits_to_keep=n_max,
                ).logits
            self.timing.forward_tokens += int(mask.sum())
            logprobs = F.log_softmax(logits.float(), dim=-1)  # B x n_max x V, fp32 so sums over long texts don't drift
            for row, (i, cont) in enumerate(zip(batch, conts, strict=True)):
                lp = logprobs[row, n_max - len(cont) :]  # n x V, aligned right like the padding
                target = torch.tensor(cont, device=lp.device)
                score = lp.gather(-1, target[:, None]).sum().item()
                out[i] = (score, bool((lp.argmax(-1) == target).all()))
        return out

    def generate(
        self,
        prompts: Sequence[list[int]],
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        num_return_sequences: int = 1,
        stop: Sequence[str] = (),
        desc: str = "generate",
    ) -> list[list[str]]:
        """Completions of each prompt (ids, BOS included), decoded and cut at the first stop string.

        Decoding goes through `model.generate`, i.e. naive-MLA prefill then absorbed decoding from the latent cache.
        Returns `num_return_sequences` strings per prompt.
        """
        if self.tokenizer is None:
            raise ValueError("generation needs a tokenizer")
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out: list[list[str]] = [[] for _ in prompts]
        # Rows per batch count generated sequences, so n samples per prompt shrink the prompt batch.
        per_batch = max(1, self.batch_size // num_return_sequences)
        batches = [order[i : i + per_batch] for i in range(0, len(order), per_batch)]
        kwargs = {
            "do_sample": do_sample,
            "max_new_tokens": max_new_tokens,
            "num_return_sequences": num_return_sequences,
        }
        if do_sample:
            kwargs |= {"temperature": temperature, "top_p": top_p}
        else:  # a checkpoint's generation_config may ask for sampling parameters; greedy must ignore them
            kwargs |= {"temperature": None, "top_p": None, "top_k": None}
        eos = self.model.config.eos_token_id
        for batch in tqdm(batches, desc=desc, disable=not self.progress, leave=False):
            ids, mask = self._left_pad([prompts[i] for i in batch])
            start = time.perf_counter()
            criteria = StoppingCriteriaList([StopOnText(self.tokenizer, stop, ids.shape[1])] if stop else [])
            with torch.inference_mode():
                seqs = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    pad_token_id=self.pad_id,
                    eos_token_id=eos,
                    stopping_criteria=criteria,
                    **kwargs,
                )
            self.timing.generate_s += time.perf_counter() - start
            new = seqs[:, ids.shape[1] :]  # (B * n) x new
            for j, row in enumerate(new.tolist()):
                row = _strip_after_eos(row, eos, self.pad_id)
                self.timing.new_tokens += len(row)
                text = self.tokenizer.decode(row, skip_special_tokens=True)
                out[batch[j // num_return_sequences]].append(cut_at_stop(text, stop))
        return out

    def _left_pad(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        return ids.to(self.device), mask.to(self.device)


class StopOnText(StoppingCriteria):
    """Finishes a row once its new text contains a stop string.

    transformers' own `stop_strings` precomputes tables over the whole vocabulary (~1 s per generate call with
    DeepSeek's 129K tokens, a third of a small model's CPU decode); decoding each row's last few tokens is cheaper.
    """

    def __init__(self, tokenizer, stop: Sequence[str], prompt_length: int, window: int = 16):
        self.tokenizer, self.stop, self.start, self.window = tokenizer, tuple(stop), prompt_length, window

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        tails = input_ids[:, max(self.start, input_ids.shape[1] - self.window) :].tolist()
        done = [any(s in text for s in self.stop) for text in self.tokenizer.batch_decode(tails)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # Left padding: real tokens count from 0, as they would unpadded (generate() does the same for its prefill).
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _strip_after_eos(row: list[int], eos: int | list[int] | None, pad: int) -> list[int]:
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    for k, t in enumerate(row):
        if t in eos_ids:
            return row[:k]
    # Rows that finished early are padded to the batch's length with pad_id.
    while row and row[-1] == pad:
        row = row[:-1]
    return row
