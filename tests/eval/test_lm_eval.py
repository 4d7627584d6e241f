"""lm-evaluation-harness compatibility: the real `lm_eval` CLI with `--model hf ... trust_remote_code=True` on a local
task YAML, over a folder written by `dsv3 publish` (remote code + auto_map), in a fresh process that never imports
this package. Skipped when lm-eval or the publish step is missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from .conftest import FIXTURES

pytest.importorskip("lm_eval")
publish = pytest.importorskip("modeling_deepseek_v3.publish")


def test_lm_eval_cli_runs_a_published_folder(debug_model, tokenizer, tmp_path):
    src, hub, tasks = tmp_path / "model", tmp_path / "hub", tmp_path / "tasks"
    debug_model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    assert publish.main([str(src), str(hub)]) in (0, None)
    tasks.mkdir()
    yaml = (FIXTURES / "lm_eval" / "dsv3_arc_fixture.yaml").read_text().replace("{fixtures}", str(FIXTURES))
    (tasks / "dsv3_arc_fixture.yaml").write_text(yaml)

    cmd = [
        shutil.which("lm_eval") or "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={hub},trust_remote_code=True,dtype=float32",
        "--tasks",
        "dsv3_arc_fixture",
        "--include_path",
        str(tasks),
        "--device",
        "cpu",
        "--batch_size",
        "2",
        "--output_path",
        str(tmp_path / "out"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["dsv3_arc_fixture"]
    assert 0.0 <= results["acc,none"] <= 1.0 and "acc_norm,none" in results
