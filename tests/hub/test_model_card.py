"""The README.md model card parses back with huggingface_hub, metadata and eval results intact."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from modeling_deepseek_v3.publish import PublishError, read_eval_results

from .conftest import EVAL_JSON, METRICS


def test_card_parses_back_with_eval_results_equal_to_the_input(published):
    card = ModelCard.load(published / "README.md")
    data = card.data
    assert data.license == "apache-2.0" and data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation" and data.base_model == "deepseek-ai/DeepSeek-V3"
    assert {"dsv3", "custom_code"} <= set(data.tags) and data.model_name == "dsv3-debug"
    results: dict[str, dict[str, float]] = {}
    for r in data.eval_results:
        assert r.task_type == "text-generation" and r.dataset_name == r.dataset_type
        results.setdefault(r.dataset_type, {})[r.metric_type] = r.metric_value
    assert results == EVAL_JSON["results"]


def test_card_body_has_usage_and_training_summary(published):
    text = (published / "README.md").read_text()
    assert 'AutoModelForCausalLM.from_pretrained("dsv3-debug", trust_remote_code=True)' in text
    last = METRICS[-1]
    assert "## Training" in text and f"| step | {last['step']} |" in text and f"| tokens | {last['tokens']:,} |" in text
    assert "## Evaluation" in text and "| hellaswag | accuracy_norm | 0.26 |" in text


@pytest.mark.parametrize(
    "payload",
    ['{"model": "m"}', '{"results": {"t": {"acc": "high"}}}', '{"results": {"t": {"acc": NaN}}}', '{"results": {"t": []}}', "not json"],
)
def test_malformed_eval_json_is_refused(tmp_path, payload):
    path = tmp_path / "r.json"
    path.write_text(payload)
    with pytest.raises(PublishError, match="eval-results"):
        read_eval_results(path)
