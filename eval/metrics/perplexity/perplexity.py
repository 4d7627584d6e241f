"""Token-weighted perplexity from per-document summed NLLs, so that long documents count by their tokens.

Unlike evaluate's built-in perplexity (which loads a model from the Hub), this module only aggregates: the model
runs elsewhere (eval/tasks/perplexity.py) and hands over each document's summed NLL (nats) and scored token count.
"""

import math

import datasets
import evaluate

_KWARGS = """
Args:
    nll (list[float]): summed negative log-likelihood of each document, in nats.
    num_tokens (list[int]): number of scored tokens of each document.
Returns:
    perplexity (float): exp(sum nll / sum num_tokens).
    mean_nll (float): sum nll / sum num_tokens, in nats per token.
    bits_per_token (float): mean_nll / ln 2.
    num_tokens (int): total scored tokens.
"""


class Perplexity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Token-weighted corpus perplexity.",
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"nll": datasets.Value("float64"), "num_tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll, num_tokens):
        total = sum(num_tokens)
        if total <= 0:
            raise ValueError("perplexity needs at least one scored token")
        mean_nll = math.fsum(nll) / total
        return {
            "perplexity": math.exp(mean_nll),
            "mean_nll": mean_nll,
            "bits_per_token": mean_nll / math.log(2),
            "num_tokens": total,
        }
