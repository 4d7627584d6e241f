"""Debug-size models saved once per session: one with the real tokenizer's vocabulary and no tokenizer files (the
runner then needs --tokenizer default), one with a small vocabulary for id-level tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modeling_deepseek_v3 import DSV3Config, DSV3ForCausalLM

REPO = Path(__file__).resolve().parents[2]
DEBUG_CONFIG_DIR = REPO / "hub_configs" / "deepseek-v3-debug"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def debug_model() -> DSV3ForCausalLM:
    """The debug config with its full 129,280 vocabulary, so the real tokenizer fits; seeded random weights."""
    torch.manual_seed(1234)
    return DSV3ForCausalLM(DSV3Config.from_pretrained(DEBUG_CONFIG_DIR)).eval()


@pytest.fixture(scope="session")
def small_vocab_model() -> DSV3ForCausalLM:
    torch.manual_seed(1234)
    return DSV3ForCausalLM(DSV3Config.from_pretrained(DEBUG_CONFIG_DIR, vocab_size=512)).eval()


@pytest.fixture(scope="session")
def tokenizer():
    from modeling_deepseek_v3.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def model_dir_without_tokenizer(debug_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dsv3-debug-no-tokenizer")
    debug_model.save_pretrained(path)
    return path
