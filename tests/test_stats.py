import math

import pytest

from fmnist_lightning.stats import (
    corrected_resampled_ttest,
    discordant_counts,
    holm,
    mcnemar_exact,
    mean_std,
    paired_ttest,
    summarize,
)

# Student's t with 2 degrees of freedom has closed forms, so the expected values below are
# computed by hand, not by scipy: CDF F(t) = 1/2 + t / (2 sqrt(t^2 + 2)), hence the two-sided
# p-value of |t| is 1 - |t| / sqrt(t^2 + 2), and the quantile q solves t / sqrt(t^2 + 2) = 2q - 1,
# i.e. t = a * sqrt(2 / (1 - a^2)) with a = 2q - 1.
T_975_DF2 = 0.95 * math.sqrt(2 / (1 - 0.95**2))  # 4.30265...


def test_t_quantile_by_hand_matches_the_table_value():
    assert round(T_975_DF2, 4) == 4.3027  # the printed t-table value


def test_summarize_mean_std_and_t_interval_by_hand():
    s = summarize([1.0, 2.0, 3.0])  # mean 2, sample std 1
    assert (s.n, s.mean, s.std) == (3, pytest.approx(2.0), pytest.approx(1.0))
    half = T_975_DF2 * 1.0 / math.sqrt(3)
    assert s.ci_low == pytest.approx(2 - half)
    assert s.ci_high == pytest.approx(2 + half)
    assert str(s) == "2.0000 ± 1.0000"


def test_summarize_one_value_has_no_spread():
    s = summarize([0.9])
    assert s.mean == 0.9
    assert math.isnan(s.std)
    assert math.isnan(s.ci_low)
    assert str(s) == "0.9000"
    assert mean_std(math.nan, math.nan) == "n/a"


def test_paired_ttest_by_hand():
    # differences 0.01, 0.02, 0.01: mean 1/75, sample std 0.01/sqrt(3), so t = (1/75) / (0.01/3) = 4
    a, b = [0.90, 0.91, 0.92], [0.89, 0.89, 0.91]
    r = paired_ttest(a, b)
    assert r.test == "paired t"
    assert (r.n, r.df) == (3, 2)
    assert r.mean_diff == pytest.approx(0.04 / 3)
    assert r.statistic == pytest.approx(4.0)
    assert r.p_value == pytest.approx(1 - 4 / math.sqrt(18))  # 0.0572
    half = T_975_DF2 * (0.01 / math.sqrt(3)) / math.sqrt(3)
    assert r.ci_low == pytest.approx(0.04 / 3 - half)
    assert r.ci_high == pytest.approx(0.04 / 3 + half)
    flipped = paired_ttest(b, a)
    assert flipped.statistic == pytest.approx(-4.0)
    assert flipped.p_value == pytest.approx(r.p_value)


def test_corrected_resampled_ttest_by_hand_and_wider_than_the_naive_test():
    # 3 folds: differences 0.01, 0.02, 0.03 (mean 0.02, variance 1e-4); n_test/n_train = 1/2.
    # Nadeau-Bengio: variance of the mean (1/3 + 1/2) * 1e-4, so t^2 = 4e-4 / (5/6 * 1e-4) = 4.8.
    a, b = [0.91, 0.92, 0.93], [0.90, 0.90, 0.90]
    r = corrected_resampled_ttest(a, b, test_train_ratio=1 / 2)
    assert r.test == "corrected resampled t"
    assert r.statistic == pytest.approx(math.sqrt(4.8))
    assert r.p_value == pytest.approx(1 - math.sqrt(4.8 / 6.8))  # 0.160
    se = math.sqrt((1 / 3 + 1 / 2) * 1e-4)
    assert r.ci_high - r.mean_diff == pytest.approx(T_975_DF2 * se)
    # The plain paired t-test on the same folds: t^2 = 4e-4 / (1e-4 / 3) = 12, p = 0.074: the
    # correction roughly doubles the p-value here.
    naive = paired_ttest(a, b)
    assert naive.statistic**2 == pytest.approx(12.0)
    assert naive.p_value == pytest.approx(1 - math.sqrt(12 / 14))
    assert r.p_value > 2 * naive.p_value


def test_paired_tests_without_variance():
    same = paired_ttest([0.9, 0.8], [0.9, 0.8])
    assert same.p_value == 1.0
    assert same.mean_diff == 0.0
    shifted = corrected_resampled_ttest([0.91, 0.81], [0.9, 0.8], 1.0)
    assert shifted.mean_diff == pytest.approx(0.01)
    assert math.isnan(shifted.p_value)  # constant difference: nothing to test it against
    with pytest.raises(ValueError, match="at least 2"):
        paired_ttest([0.9], [0.8])
    with pytest.raises(ValueError, match="same length"):
        paired_ttest([0.9, 0.8], [0.8])


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (0, 5, 2 / 2**5),  # 2 * P(X = 0), X ~ Bin(5, 1/2)
        (1, 9, 2 * (1 + 10) / 2**10),
        (2, 2, 1.0),
        (0, 0, 1.0),
        (4, 6, min(1.0, 2 * (1 + 10 + 45 + 120 + 210) / 2**10)),
    ],
)
def test_mcnemar_exact_by_hand(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p)
    assert mcnemar_exact(c, b) == pytest.approx(p)


def test_discordant_counts():
    a = [True, True, False, False, True]
    b = [True, False, True, False, False]
    assert discordant_counts(a, b) == (2, 1)


def test_holm_by_hand():
    # sorted: 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> kept at 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    adjusted = holm([0.01, math.nan, 0.02])  # NaN rows are not part of the family
    assert adjusted[0] == pytest.approx(0.02)
    assert adjusted[2] == pytest.approx(0.02)
    assert math.isnan(adjusted[1])
    assert holm([]) == []
