"""Shared folders for the Hub publishing tests, built once per session: the debug model (full DeepSeek-V3
vocabulary, so the real tokenizer fits) saved with its tokenizer and a training log, and its published folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from modeling_deepseek_v3 import DSV3Config, DSV3ForCausalLM
from modeling_deepseek_v3.publish import PublishArgs, publish
from modeling_deepseek_v3.tokenizer import load_tokenizer

DEBUG_CONFIG_DIR = Path(__file__).resolve().parents[2] / "hub_configs" / "deepseek-v3-debug"
# As `dsv3 eval` writes it; only "results" goes on the card ("config" and "errors" are the runner's own records).
EVAL_JSON = {
    "model": "run/final",
    "results": {
        "wikitext": {"perplexity": 1234.5, "mean_nll": 7.12, "bits_per_token": 10.27, "num_tokens": 2048},
        "hellaswag": {"accuracy": 0.25, "accuracy_norm": 0.26},
        "humaneval": {"pass@1": 0.0},
    },
    "config": {"dtype": "float32", "seed": 0},
    "errors": {},
}
# dsv3 train's metrics.jsonl: one record per optimizer step (a subset of its keys).
METRICS = [{"step": s, "tokens": 512 * s, "loss": 11.0 - s, "lm_loss": 10.0 - s, "mtp_loss": 1.0, "tokens_per_s": 100.0 * s} for s in (1, 2)]
SHARD = "20MB"  # below the 33 MB embedding: forces several shards and an index


@pytest.fixture(scope="session")
def original(tmp_path_factory):
    """(model, folder): a seeded debug model saved like `dsv3 train` does (OUTPUT/final plus OUTPUT/metrics.jsonl)."""
    run = tmp_path_factory.mktemp("run")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in METRICS))
    torch.manual_seed(0)
    model = DSV3ForCausalLM(DSV3Config.from_pretrained(DEBUG_CONFIG_DIR)).eval()
    with torch.no_grad():  # a nonzero router bias, so that publishing it is tested too
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0.0, 0.01)
    model.save_pretrained(run / "final")
    load_tokenizer().save_pretrained(run / "final")
    return model, run / "final"


@pytest.fixture(scope="session")
def eval_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "results.json"
    path.write_text(json.dumps(EVAL_JSON))
    return path


@pytest.fixture(scope="session")
def published(original, eval_json, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hub") / "dsv3-debug"
    return publish(PublishArgs(str(original[1]), str(out), eval_results=str(eval_json), max_shard_size=SHARD, base_model="deepseek-ai/DeepSeek-V3"))


@pytest.fixture(scope="session")
def published_fp8(original, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hub") / "dsv3-debug-fp8"
    return publish(PublishArgs(str(original[1]), str(out), fp8=True, max_shard_size=SHARD))


@pytest.fixture
def model_copy(original, tmp_path) -> Path:
    """A writable copy of the original folder, for the bad-input cases to damage."""
    return Path(shutil.copytree(original[1], tmp_path / "model"))
