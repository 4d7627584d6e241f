"""`dsv3 generate` in-process, and the offline DeepSeek-V3 tokenizer it uses."""

from __future__ import annotations

import re
import socket

import pytest
import torch

from modeling_deepseek_v3 import DSV3ForCausalLM
from modeling_deepseek_v3.cli import main as cli_main
from modeling_deepseek_v3.info import load_config
from modeling_deepseek_v3.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # The debug shape with its real vocabulary (129,280 >= the tokenizer's 128,815 ids): ~17M parameters.
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("debug_model")
    DSV3ForCausalLM(load_config("deepseek-v3-debug")).save_pretrained(folder)
    return folder


@pytest.fixture
def no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def run(capsys, *argv: str) -> str:
    assert cli_main(["generate", *argv]) == 0
    return capsys.readouterr().out


def new_tokens(out: str) -> int:
    return int(re.search(r"(\d+) new tokens in [\d.]+ s: [\d.]+ new tokens/s", out).group(1))


def test_tokenizer_is_deepseek_v3_and_offline(no_network):
    tok = load_tokenizer()
    assert len(tok) == 128_815 and tok.model_max_length == 131_072
    assert tok.convert_ids_to_tokens([0, 1]) == ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"]
    text = "DeepSeek-V3 用 MLA.\n    return x**2"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_tokenizer_from_model_folder(tmp_path, no_network):
    load_tokenizer().save_pretrained(tmp_path)
    assert len(load_tokenizer(tmp_path)) == 128_815


def test_greedy_from_saved_model(model_dir, capsys, no_network):
    out = run(capsys, str(model_dir), "--prompt", "The capital of France is", "--max-new-tokens", "5")
    assert "The capital of France is" in out and str(model_dir) in out
    assert new_tokens(out) == 5  # seed 0's random model does not hit EOS (1 id in 129,280) within 5 greedy steps


def test_sampling_is_seeded(model_dir, capsys):
    def text(seed: str) -> str:
        argv = ("--prompt", "Hello", "--max-new-tokens", "6", "--do-sample", "--top-p", "0.9", "--seed", seed)
        return run(capsys, str(model_dir), *argv).split("\n[dsv3 generate]")[0]  # not the timing line

    first = text("1")
    assert first == text("1") and first != text("2")


def test_chat_template_and_dtype(model_dir, capsys):
    out = run(capsys, str(model_dir), "--prompt", "Hi", "--chat", "--max-new-tokens", "3", "--dtype", "bfloat16")
    assert "torch.bfloat16" in out and new_tokens(out) == 3


def test_random_init_from_config_says_so(capsys):
    out = run(capsys, "--config", "deepseek-v3-debug", "--prompt", "Hello", "--max-new-tokens", "3")
    assert "RANDOM weights" in out and new_tokens(out) == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{tmp}", "--prompt", "x"], "without config.json"),
        (["--config", "deepseek-v3-671b", "--prompt", "x"], "too big to initialise randomly"),
        (["--prompt", "x"], "exactly one of MODEL_DIR or --config"),
        (["--config", "no-such-config", "--prompt", "x"], "hub configs"),
    ],
)
def test_bad_input_gives_a_clear_error(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["generate", *(a.format(tmp=tmp_path) for a in argv)])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["--use-mtp", "--fast"])
def test_speculative_and_fast_decoding_print_the_greedy_text(model_dir, capsys, mode):
    """Both decoders produce plain greedy's text (fp32 on the CPU: exact)."""
    prompt = ("--prompt", "def add(a, b):", "--max-new-tokens", "6")
    plain = run(capsys, str(model_dir), *prompt)
    other = run(capsys, str(model_dir), *prompt, mode)

    def text(out: str) -> str:
        return out.split("\n[dsv3 generate]")[0].rstrip("\n")  # the streamer ends with a newline

    assert text(other) == text(plain) and new_tokens(other) == new_tokens(plain)
    if mode == "--use-mtp":
        assert "MTP acceptance" in other
