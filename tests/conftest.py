"""Shared fixtures: tiny seeded configs built from hub_configs/deepseek-v3-debug, and the built-in oracle."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from modeling_deepseek_v3 import DSV3Config

REPO = Path(__file__).resolve().parents[1]
DEBUG_CONFIG_DIR = REPO / "hub_configs" / "deepseek-v3-debug"


def _tiny_config(**overrides) -> DSV3Config:
    # The debug shape with a small vocabulary keeps CPU tests fast; overrides pick the feature under test.
    values = {"vocab_size": 512, "max_position_embeddings": 2048, **overrides}
    return DSV3Config.from_pretrained(DEBUG_CONFIG_DIR, **values)


@pytest.fixture
def tiny_config():
    return _tiny_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _chi_square_threshold(df: int, alpha: float) -> float:
    """Upper alpha-quantile of chi-square(df), Wilson-Hilferty approximation (relative error < 1% for df >= 10)."""
    z = torch.special.ndtri(torch.tensor(1 - alpha, dtype=torch.float64)).item()
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _check_three_token_law(model, prompt: torch.Tensor, samples: torch.Tensor, warp) -> None:
    """Samples [N, 3] of the next three tokens after `prompt` [1, P] against their exact joint law under the model
    (small vocabulary V: V^3 cells): p(t1) p(t2 | t1) p(t3 | t1, t2), each by full recomputation of the prefix
    without a cache, `warp(logits) -> probs` giving the sampling distribution. No sample may fall outside the
    support, and Pearson's chi-square (cells with expectation < 5 pooled, the usual validity rule) must stay under
    its alpha = 1e-4 quantile: the seed is fixed, and a correct sampler fails for 1 seed in 10,000."""
    V, N = model.config.vocab_size, samples.shape[0]
    with torch.no_grad():
        def next_probs(prefixes: torch.Tensor) -> torch.Tensor:
            return warp(model(prefixes, use_cache=False).logits[:, -1])

        grid = torch.cartesian_prod(torch.arange(V), torch.arange(V))  # [V*V, 2] (t1, t2)
        p1 = next_probs(prompt)[0]  # [V]
        p2 = next_probs(torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], 1))  # [V, V]
        p3 = next_probs(torch.cat([prompt.expand(V * V, -1), grid], 1))  # [V*V, V]
    target = (p1[:, None, None] * p2[:, :, None] * p3.view(V, V, V)).flatten().double()
    counts = torch.bincount(samples[:, 0] * V * V + samples[:, 1] * V + samples[:, 2], minlength=V**3).double()
    assert counts[target == 0].sum() == 0  # nothing outside top-k/top-p/min-p is ever emitted
    expected = target * N
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum().item()
    assert stat < _chi_square_threshold(len(exp) - 1, 1e-4), (stat, len(exp))


@pytest.fixture
def check_three_token_law():
    return _check_three_token_law
