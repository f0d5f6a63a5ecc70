"""Statistics for comparing training runs: summaries, paired tests, exact McNemar and Holm's correction.

Which test fits which design (what :mod:`fmnist_lightning.studies` uses for an ablation):

- the same validation split, several training seeds: :func:`paired_ttest` over the seeds (each
  seed trains the reference and the variant, so the differences are paired);
- k-fold cross-validation: :func:`corrected_resampled_ttest`, the corrected resampled t-test of
  Nadeau and Bengio (2003, "Inference for the generalization error", Machine Learning 52). The
  training sets of the folds overlap, so fold scores are correlated and the plain t-test's variance
  is far too small; the correction inflates it by ``1/J + n_test/n_train``;
- one model each, tested on the same test images: :func:`mcnemar_exact` on the discordant pairs;
- several variants against one reference: :func:`holm` adjusts their p-values together
  (Holm 1979, step-down), so that the chance of any false "significant" row stays at 5%.

The distributions are scipy's (``scipy.stats.t``, ``scipy.stats.binomtest``); only the arithmetic
around them is written here.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and a t confidence interval of the mean.

    Attributes:
        n: Number of values.
        mean: Their mean.
        std: Sample standard deviation (``ddof=1``); NaN for one value.
        ci_low: Lower end of the confidence interval of the mean; NaN for one value.
        ci_high: Upper end; NaN for one value.
    """

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float

    def __str__(self) -> str:
        return mean_std(self.mean, self.std)


def mean_std(mean: float, std: float, digits: int = 4) -> str:
    """``0.9112 ± 0.0021``; the mean alone when the std is undefined (one value)."""
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def t_quantile(confidence: float, df: int) -> float:
    """Two-sided critical value of Student's t: ``P(|T| <= q) = confidence`` for ``df`` degrees of freedom."""
    return float(stats.t.ppf((1 + confidence) / 2, df))


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """Mean ± sample std of ``values`` and the t interval of their mean.

    Args:
        values: At least one number.
        confidence: Coverage of the interval.

    Returns:
        The summary; ``std`` and the interval are NaN for a single value.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("summarize needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = t_quantile(confidence, x.size - 1) * std / math.sqrt(x.size)
    return Summary(int(x.size), mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class PairedComparison:
    """The difference ``a - b`` of paired scores and a test of ``mean(a - b) = 0``.

    Attributes:
        test: Which test: ``paired t`` or ``corrected resampled t``.
        n: Number of pairs.
        mean_diff: Mean of ``a - b``.
        std_diff: Sample standard deviation of ``a - b`` (not corrected).
        ci_low: Lower end of the confidence interval of the mean difference (the test's own).
        ci_high: Upper end.
        statistic: The t statistic.
        df: Its degrees of freedom.
        p_value: Two-sided p-value; 1 when every difference is exactly 0, NaN when the differences
            are all equal but not 0 (no variance to test against).
    """

    test: str
    n: int
    mean_diff: float
    std_diff: float
    ci_low: float
    ci_high: float
    statistic: float
    df: int
    p_value: float


def _paired(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired scores need two sequences of the same length, got {x.shape} and {y.shape}")
    if x.size < 2:
        raise ValueError(f"a paired test needs at least 2 pairs, got {x.size}")
    return x - y


def _degenerate(test: str, d: np.ndarray) -> PairedComparison | None:
    """The result when all differences are equal (zero variance), where t is undefined."""
    if np.ptp(d) > 0:
        return None
    mean = float(d.mean())
    p = 1.0 if mean == 0 else math.nan
    return PairedComparison(test, int(d.size), mean, 0.0, mean, mean, math.nan, int(d.size) - 1, p)


def paired_ttest(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedComparison:
    """Paired t-test of ``a`` against ``b`` (e.g. a variant and the reference, matched by seed).

    The p-value is ``scipy.stats.ttest_rel``'s; the interval is ``mean ± t * std / sqrt(n)``.

    Args:
        a: Scores of the first arm, one per pair.
        b: Scores of the second arm, in the same order.
        confidence: Coverage of the interval of the mean difference.
    """
    d = _paired(a, b)
    if (same := _degenerate("paired t", d)) is not None:
        return same
    result = stats.ttest_rel(a, b)
    mean, std, n = float(d.mean()), float(d.std(ddof=1)), int(d.size)
    half = t_quantile(confidence, n - 1) * std / math.sqrt(n)
    return PairedComparison(
        "paired t", n, mean, std, mean - half, mean + half, float(result.statistic), n - 1, float(result.pvalue)
    )


def corrected_resampled_ttest(
    a: Sequence[float], b: Sequence[float], test_train_ratio: float, confidence: float = 0.95
) -> PairedComparison:
    """Nadeau and Bengio's corrected resampled t-test for scores from overlapping training sets.

    With ``J`` paired differences ``d`` (one per fold), the variance of their mean is taken as
    ``(1/J + n_test/n_train) * var(d)`` instead of ``var(d) / J``, and
    ``t = mean(d) / sqrt(that)`` has ``J - 1`` degrees of freedom. For k-fold cross-validation
    ``n_test/n_train = 1/(k - 1)``.

    Args:
        a: Scores of the first arm, one per fold.
        b: Scores of the second arm on the same folds, in the same order.
        test_train_ratio: Validation images over training images of one fold.
        confidence: Coverage of the interval of the mean difference.
    """
    if test_train_ratio <= 0:
        raise ValueError(f"test_train_ratio must be positive, got {test_train_ratio}")
    d = _paired(a, b)
    if (same := _degenerate("corrected resampled t", d)) is not None:
        return same
    n = int(d.size)
    mean, std = float(d.mean()), float(d.std(ddof=1))
    se = math.sqrt((1 / n + test_train_ratio) * std**2)
    t = mean / se
    p = float(2 * stats.t.sf(abs(t), n - 1))
    half = t_quantile(confidence, n - 1) * se
    return PairedComparison("corrected resampled t", n, mean, std, mean - half, mean + half, t, n - 1, p)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar test: the p-value of ``b`` vs ``c`` discordant pairs under H0 (p = 1/2).

    Args:
        b: Test images the first model gets right and the second wrong.
        c: Test images the first model gets wrong and the second right.

    Returns:
        ``scipy.stats.binomtest(b, b + c, 1/2)``'s two-sided p-value, which for p = 1/2 is
        ``min(1, 2 * P(X <= min(b, c)))`` with ``X ~ Binomial(b + c, 1/2)``; 1 when ``b + c = 0``.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b} and {c}")
    if b + c == 0:
        return 1.0
    return float(stats.binomtest(b, b + c, 0.5).pvalue)


def discordant_counts(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> tuple[int, int]:
    """``(b, c)``: images only the first model gets right, and images only the second gets right."""
    if len(correct_a) != len(correct_b):
        raise ValueError(f"predictions on different numbers of images: {len(correct_a)} and {len(correct_b)}")
    b = sum(1 for x, y in zip(correct_a, correct_b, strict=True) if x and not y)
    c = sum(1 for x, y in zip(correct_a, correct_b, strict=True) if y and not x)
    return b, c


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given; NaN entries stay NaN and do not count.

    With the ``m`` p-values sorted ascending, the ``i``-th (from 0) is multiplied by ``m - i``,
    then made non-decreasing and capped at 1. Reject where the adjusted value is below alpha.
    """
    valid = [(p, i) for i, p in enumerate(p_values) if not math.isnan(p)]
    adjusted = [math.nan] * len(p_values)
    m, running = len(valid), 0.0
    for rank, (p, i) in enumerate(sorted(valid)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted
