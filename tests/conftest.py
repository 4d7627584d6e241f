"""Shared fixtures: tiny seeded configs built from hub_configs/deepseek-v3-debug, and the built-in oracle."""

from __future__ import annotations

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
