"""The upload path up to the HTTP layer: HfApi.create_repo / create_commit are replaced by recorders, so nothing
leaves the machine, and the commit's operations are checked against the folder."""

from __future__ import annotations

import pytest
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi

from modeling_deepseek_v3 import publish as publish_mod
from modeling_deepseek_v3.publish import PublishError, push_to_hub


@pytest.fixture
def recorded(monkeypatch):
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = (repo_id, kwargs)

    def create_commit(self, repo_id, operations, **kwargs):
        calls["commit"] = (repo_id, list(operations), kwargs)
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message=kwargs.get("commit_message", ""),
                          commit_description="", oid="0" * 40)  # fmt: skip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def test_commit_holds_exactly_the_folders_files(published, recorded):
    push_to_hub(published, "me/dsv3-debug", private=True, token="hf_dummy")
    assert recorded["repo"] == ("me/dsv3-debug", {"repo_type": "model", "private": True, "exist_ok": True})
    repo_id, operations, _ = recorded["commit"]
    assert repo_id == "me/dsv3-debug" and all(isinstance(op, CommitOperationAdd) for op in operations)
    files = {p.relative_to(published).as_posix(): p for p in published.rglob("*") if p.is_file()}
    assert {op.path_in_repo for op in operations} == set(files)
    assert {"config.json", "model.safetensors.index.json", "modeling_dsv3.py", "tokenizer.json", "README.md"} <= set(files)
    for op in operations:  # each operation uploads that very file, the model card as written (not regenerated)
        assert op.path_or_fileobj == str(files[op.path_in_repo])


def test_cli_publish_then_push(original, tmp_path, recorded, monkeypatch):
    out = tmp_path / "pushed"
    assert publish_mod.main([str(original[1]), str(out), "--push", "me/x", "--tags", "demo"]) == 0
    _, operations, kwargs = recorded["commit"]
    assert {op.path_in_repo for op in operations} == {p.name for p in out.iterdir()}
    assert "demo" in (out / "README.md").read_text() and kwargs["commit_message"]


def test_push_refuses_an_unpublished_folder(original, recorded):
    with pytest.raises(PublishError, match="dsv3 publish"):
        push_to_hub(original[1], "me/x")
    assert "commit" not in recorded
