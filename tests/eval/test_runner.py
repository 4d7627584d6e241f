"""`dsv3 eval` end to end on the debug model, and the bad-input errors."""

from __future__ import annotations

import json

import pytest
from modeling_deepseek_v3.eval import runner
from modeling_deepseek_v3.eval.tasks import TaskError, TaskFileError, parse_spec

from .conftest import FIXTURES


def test_end_to_end_writes_json_and_keeps_results_when_a_task_crashes(model_dir_without_tokenizer, tmp_path, capsys):
    out = tmp_path / "results.json"
    rc = runner.main(
        [
            "--model",
            str(model_dir_without_tokenizer),
            "--tokenizer",
            "default",
            "--output",
            str(out),
            "--no-progress",
            "--tasks",
            f"perplexity={FIXTURES / 'wiki.txt'},max_length=64",
            f"arc={FIXTURES / 'arc_challenge.jsonl'},num_fewshot=1",
            f"gsm8k={FIXTURES / 'gsm8k.jsonl'},num_fewshot=1,max_new_tokens=4,limit=2",
            "humaneval,limit=2,max_new_tokens=4",
            # Valid spec, but the window arithmetic fails at run time: the others' results must survive it.
            f"perplexity={FIXTURES / 'docs.jsonl'},max_length=8,stride=8",
        ]
    )
    assert rc == 1
    data = json.loads(out.read_text())
    assert set(data) == {"model", "results", "config", "errors"}
    assert set(data["results"]) == {"perplexity", "arc", "gsm8k", "humaneval"}
    assert data["results"]["perplexity"]["perplexity"] > 1
    assert 0 <= data["results"]["arc"]["accuracy"] <= 1 and "accuracy_norm" in data["results"]["arc"]
    assert set(data["results"]["gsm8k"]) == {"exact_match", "exact_match_flexible"}
    assert data["results"]["humaneval"] == {"pass@1": 0.0}  # random weights
    assert "stride" in data["errors"]["perplexity:docs"]
    assert data["config"]["tasks"]["humaneval"]["sandbox"]["mode"] in ("namespace", "weak")
    assert data["config"]["tasks"]["gsm8k"]["timing"]["new_tokens"] > 0
    table = out.with_suffix(".md").read_text()
    assert "| arc | accuracy |" in table and "| perplexity:docs | error |" in table


def _run_bad(args: list[str], capsys) -> str:
    assert runner.main(args) == 2
    return capsys.readouterr().err


def test_model_folder_without_tokenizer_is_an_error(model_dir_without_tokenizer, tmp_path, capsys):
    err = _run_bad(
        ["--model", str(model_dir_without_tokenizer), "--tasks", "humaneval", "--output", str(tmp_path / "r.json")],
        capsys,
    )
    assert "has no tokenizer" in err and "--tokenizer default" in err
    assert not (tmp_path / "r.json").exists()


def test_unknown_task_is_an_error(model_dir_without_tokenizer, tmp_path, capsys):
    err = _run_bad(
        [
            "--model",
            str(model_dir_without_tokenizer),
            "--tokenizer",
            "default",
            "--tasks",
            "hellaswag=x.jsonl",
            "--output",
            str(tmp_path / "r.json"),
        ],
        capsys,
    )
    assert "unknown task 'hellaswag'" in err and "gsm8k" in err
    with pytest.raises(TaskError, match="unknown option 'shots'"):
        parse_spec(f"gsm8k={FIXTURES / 'gsm8k.jsonl'},shots=3")
    with pytest.raises(TaskError, match="not a valid int"):
        parse_spec(f"gsm8k={FIXTURES / 'gsm8k.jsonl'},num_fewshot=five")


@pytest.mark.parametrize(
    ("spec", "line", "problem"),
    [
        ("gsm8k=bad/gsm8k_bad_json.jsonl", 3, "invalid JSON"),
        ("gsm8k=bad/gsm8k_no_answer.jsonl", 2, 'no final "#### N"'),
        ("mmlu=bad/mmlu_columns.csv", 2, "expected 6 columns"),
        ("mmlu=bad/mmlu_answer.csv", 2, "answer must be one of A, B, C, D"),
        ("arc=bad/arc_key.jsonl", 1, "answerKey 'C' is not one of the labels"),
        ("perplexity=bad/missing.txt", None, "no such file"),
    ],
)
def test_malformed_task_files_name_the_line_and_problem(
    spec, line, problem, model_dir_without_tokenizer, tmp_path, capsys
):
    name, path = spec.split("=")
    task = parse_spec(f"{name}={FIXTURES / path}")
    with pytest.raises(TaskFileError) as info:
        task.load()
    assert info.value.line == line and problem in str(info.value)
    if line is not None:
        assert f"line {line}:" in str(info.value)
    # The runner reports it before loading the model.
    err = _run_bad(
        [
            "--model",
            str(model_dir_without_tokenizer),
            "--tokenizer",
            "default",
            "--tasks",
            f"{name}={FIXTURES / path}",
            "--output",
            str(tmp_path / "r.json"),
        ],
        capsys,
    )
    assert problem in err


def test_fp8_where_it_cannot_run_says_why(model_dir_without_tokenizer, tmp_path):
    """--fp8 on a machine without a capable GPU (and without TRITON_INTERPRET) stops with the reason."""
    import os
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine can run FP8")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    text = tmp_path / "t.txt"
    text.write_text("Some text to score.\n")
    cmd = [sys.executable, "-m", "modeling_deepseek_v3.cli", "eval", "--model", str(model_dir_without_tokenizer),
           "--tokenizer", "default", "--tasks", f"perplexity={text}", "--fp8", "--output", str(tmp_path / "r.json")]  # fmt: skip
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0 and "FP8" in result.stderr and "CUDA" in result.stderr, result.stderr[-2000:]
