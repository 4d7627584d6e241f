"""Data: the embedded corpus is real text, packing keeps document boundaries, the order is seeded and resumable,
local files load through `datasets`, and bad input names the problem."""

from __future__ import annotations

import json

import pytest
import torch
from modeling_deepseek_v3.training.data import PackedDataset, build_dataset, read_text_files, stdlib_docstrings_corpus

from modeling_deepseek_v3.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_embedded_corpus_is_real_deterministic_prose():
    docs = stdlib_docstrings_corpus()
    assert docs == stdlib_docstrings_corpus()
    text = " ".join(docs)
    assert len(docs) > 50 and len(text) > 300_000
    words = text.split()
    # English prose, not random tokens: the commonest English words are frequent.
    for word in ("the", "of", "and", "is", "to"):
        assert words.count(word) / len(words) > 0.005, word
    assert any(d.startswith("Heap queue algorithm") for d in docs)  # heapq.py's module docstring


def test_packing_marks_document_boundaries_with_eos(tokenizer):
    docs = ["The first document.", "A second, longer document about packing.", "Third."]
    data = PackedDataset(docs, tokenizer, seq_len=4, seed=0)
    stream = data.rows.flatten().tolist()
    eos = [i for i, t in enumerate(stream) if t == tokenizer.eos_token_id]
    pieces = tokenizer.decode(stream).split(tokenizer.eos_token)
    assert len(eos) >= 2 and set(pieces[: len(eos)]) <= set(docs)  # whole documents between EOS tokens
    assert data.rows.shape[1] == 4 and data.num_tokens == len(stream)


def test_order_is_seeded_and_resumable(tokenizer):
    docs = stdlib_docstrings_corpus()[:20]
    a, b = PackedDataset(docs, tokenizer, 16, seed=3), PackedDataset(docs, tokenizer, 16, seed=3)
    straight = torch.cat([a.next_rows(5) for _ in range(2 * len(a) // 5)])  # crosses an epoch boundary
    first = torch.cat([b.next_rows(5) for _ in range(len(b) // 5)])
    state = b.state_dict()
    c = PackedDataset(docs, tokenizer, 16, seed=3)
    c.load_state_dict(state)
    rest = torch.cat([c.next_rows(5) for _ in range(2 * len(a) // 5 - len(b) // 5)])
    assert torch.equal(straight, torch.cat([first, rest]))
    assert not torch.equal(PackedDataset(docs, tokenizer, 16, seed=4).next_rows(5), straight[:5])
    with pytest.raises(ValueError, match="different data"):
        PackedDataset(docs[:10], tokenizer, 16, seed=3).load_state_dict(state)


def test_local_files(tmp_path, tokenizer):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"Line {i} of a JSON lines file."}) for i in range(40)))
    (tmp_path / "b.txt").write_text("A whole text file is one document.\n\nEven with blank lines.")
    assert len(read_text_files([str(tmp_path / "a.jsonl")])) == 40
    assert read_text_files([str(tmp_path / "b.txt")]) == ["A whole text file is one document.\n\nEven with blank lines."]
    data = build_dataset(tokenizer, 8, [str(tmp_path / "*.jsonl")], vocab_size=129280)
    assert len(data) > 10
    import pandas as pd

    pd.DataFrame({"content": ["parquet text one", "parquet text two"]}).to_parquet(tmp_path / "c.parquet")
    assert read_text_files([str(tmp_path / "c.parquet")], text_column="content") == ["parquet text one", "parquet text two"]


def test_bad_input_names_the_problem(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_text_files([str(tmp_path / "missing.jsonl")])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl"):
        read_text_files([str(tmp_path / "empty.jsonl")])
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    with pytest.raises(ValueError, match="empty dataset"):
        read_text_files([str(tmp_path / "blank.jsonl")])
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "hi"}) + "\n")
    with pytest.raises(ValueError, match="no column 'text'"):
        read_text_files([str(tmp_path / "x.jsonl")])
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="could not read"):
        read_text_files([str(tmp_path / "bad.jsonl")])
    (tmp_path / "d.docx").write_text("?")
    with pytest.raises(ValueError, match="unsupported data file type"):
        read_text_files([str(tmp_path / "d.docx")])
    with pytest.raises(ValueError, match="vocab_size=1000"):
        PackedDataset(["Some text with ordinary words."], tokenizer, 2, vocab_size=1000)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        PackedDataset(["Hi."], tokenizer, 512)
