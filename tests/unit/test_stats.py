"""quantgate.measure.stats: the rank test, the median's interval and the ratio interval, against
enumeration, textbook values and seeded simulation."""

import itertools
import math
import random
import statistics

import pytest

from quantgate.measure import stats
from quantgate.measure.stats import ci_halfwidth_fraction, mann_whitney, median_ci95, ratio_ci95


def _enumerated_p(first, second):
    """Two-sided p by brute force: every way to split the pooled values into the two sample sizes."""
    pooled, m = [*first, *second], len(first)

    def u(chosen):
        rest = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        return sum((a > b) + 0.5 * (a == b) for a in (pooled[i] for i in chosen) for b in rest)

    centre = m * len(second) / 2
    observed = abs(u(range(m)) - centre)
    splits = [abs(u(c) - centre) for c in itertools.combinations(range(len(pooled)), m)]
    return sum(d >= observed - 1e-9 for d in splits) / len(splits)


@pytest.mark.parametrize("first, second", [
    ([1.0, 5.0, 9.0], [2.0, 3.0, 4.0, 8.0]),
    ([0.3, 1.2, 2.5, 4.0], [0.9, 1.1, 3.3, 5.5, 6.1]),
    ([5.0, 1.0, 7.0, 2.0, 9.0], [3.0, 4.0, 6.0, 8.0, 10.0, 11.0]),
    ([2.2, 0.4], [1.0, 3.1, 0.7, 2.9, 1.8]),
    ([10.0, 11.0, 12.5, 9.0, 13.0, 8.5], [7.0, 12.0, 6.0, 9.5, 14.0, 5.0, 10.5]),
])
def test_exact_p_matches_enumerating_every_split(first, second):
    test = mann_whitney(first, second)
    assert test.method == "exact"
    assert test.p_value == pytest.approx(_enumerated_p(first, second), abs=1e-12)
    assert mann_whitney(second, first).p_value == pytest.approx(test.p_value, abs=1e-12)  # two-sided


@pytest.mark.parametrize("m, n, p", [
    (3, 3, 2 / 20),   # 0.1: three rounds each can never be significant at 0.05
    (4, 4, 2 / 70),
    (5, 5, 2 / 252),
    (2, 2, 1.0 / 3),  # 2 / C(4, 2)
    (7, 7, 2 / 3432),
])
def test_completely_separated_samples_give_the_textbook_p(m, n, p):
    low, high = [float(i) for i in range(m)], [float(100 + i) for i in range(n)]
    assert mann_whitney(low, high).p_value == pytest.approx(p, rel=1e-12)
    test = mann_whitney(high, low)
    assert test.p_value == pytest.approx(p, rel=1e-12) and test.u == m * n


def test_the_exact_counts_are_the_binomial_coefficients():
    for m, n in ((1, 1), (3, 4), (6, 6), (2, 9)):
        counts = stats._exact_u_counts(m, n)
        assert len(counts) == m * n + 1 and sum(counts) == math.comb(m + n, m)
        assert counts == counts[::-1]  # symmetric about m n / 2


def test_the_normal_approximation_is_close_to_the_exact_p_at_twenty_values(monkeypatch):
    rng = random.Random(20)
    pairs = [([rng.gauss(0, 1) for _ in range(10)], [rng.gauss(shift, 1) for _ in range(10)])
             for shift in (0.0, 0.3, 0.6, 1.0, 1.5)]
    exact = [mann_whitney(a, b) for a, b in pairs]
    assert {t.method for t in exact} == {"exact"}
    monkeypatch.setattr(stats, "_EXACT_MAX", 0)
    approx = [mann_whitney(a, b) for a, b in pairs]
    assert {t.method for t in approx} == {"normal approximation"}
    for e, a in zip(exact, approx, strict=True):
        assert a.p_value == pytest.approx(e.p_value, abs=0.015)


def test_a_over_a_is_called_different_at_about_the_rate_alpha():
    rng = random.Random(5)
    trials = 500
    rejected = sum(mann_whitney([rng.gauss(0, 1) for _ in range(15)], [rng.gauss(0, 1) for _ in range(15)]).p_value
                   < 0.05 for _ in range(trials))
    assert 0.02 <= rejected / trials <= 0.08  # 0.05 +- 3 sd of 500 trials


def test_beyond_twenty_values_the_normal_approximation_is_used():
    first, second = [float(i) for i in range(11)], [float(i) + 0.5 for i in range(10)]
    assert mann_whitney(first, second).method == "normal approximation"


def test_ties():
    same = mann_whitney([1.5] * 4, [1.5] * 5)
    assert same.p_value == 1.0 and same.u == 10.0 and same.method == "normal approximation"
    # ties switch to the tie-corrected normal approximation, still two-sided and in [0, 1]
    tied = mann_whitney([1.0, 2.0, 2.0, 3.0, 3.0, 3.0], [3.0, 4.0, 4.0, 5.0, 6.0, 6.0])
    assert tied.method == "normal approximation" and tied.u == 1.5
    assert 0.0 < tied.p_value < 0.02
    assert mann_whitney([3.0, 4.0, 4.0, 5.0, 6.0, 6.0], [1.0, 2.0, 2.0, 3.0, 3.0, 3.0]).p_value == tied.p_value
    with pytest.raises(ValueError, match="at least one value in each sample"):
        mann_whitney([], [1.0])


@pytest.mark.parametrize("n, ranks", [
    (6, (1, 6)), (7, (1, 7)), (8, (1, 8)), (9, (2, 8)), (10, (2, 9)), (11, (2, 10)), (12, (3, 10)),
    (15, (4, 12)), (20, (6, 15)), (30, (10, 21)),
])
def test_median_interval_uses_the_standard_order_statistics(n, ranks):
    values = [float(10 * i) for i in range(1, n + 1)]
    shuffled = random.Random(n).sample(values, n)
    assert median_ci95(shuffled) == (values[ranks[0] - 1], values[ranks[1] - 1])
    k = ranks[0]  # the binomial guarantee: P(X < k) <= 2.5% < P(X < k + 1)
    assert sum(math.comb(n, i) for i in range(k)) / 2**n <= 0.025 < sum(math.comb(n, i) for i in range(k + 1)) / 2**n


def test_no_median_interval_below_six_rounds():
    assert [median_ci95([1.0] * n) for n in range(6)] == [None] * 6
    assert ci_halfwidth_fraction([1.0, 2.0, 3.0, 4.0, 5.0]) is None
    assert ci_halfwidth_fraction([9.0, 10.0, 10.0, 10.0, 10.0, 12.0]) == pytest.approx(0.2)  # (12 - 10) / 10


def test_the_median_interval_covers_the_true_median_of_a_skewed_distribution():
    rng = random.Random(15)
    true_median = math.log(2)  # exponential, rate 1
    trials = 2000
    covered = 0
    for _ in range(trials):
        low, high = median_ci95([rng.expovariate(1.0) for _ in range(15)])
        covered += low <= true_median <= high
    # nominal 1 - 2 P(Binomial(15, 1/2) <= 3) = 0.9648; 2000 trials put 0.94 about 4.5 sd below it
    assert covered / trials >= 0.94


def _rounds(rng, scale, n=15, noise=0.005):
    return [scale * (1.0 + rng.gauss(0, noise)) for _ in range(n)]


def test_the_ratio_interval_is_seeded_and_contains_a_clear_ratio():
    rng = random.Random(2)
    base, slow = _rounds(rng, 1.0), _rounds(rng, 1.2)
    interval = ratio_ci95(slow, base, seed=7)
    assert interval == ratio_ci95(slow, base, seed=7)
    assert interval != ratio_ci95(slow, base, seed=8)
    low, high = interval
    assert low <= statistics.median(slow) / statistics.median(base) <= high
    assert low < 1.2 < high and high - low < 0.02


def test_the_ratio_interval_covers_the_true_ratio_in_most_trials():
    rng = random.Random(11)
    trials = 100
    covered = 0
    for seed in range(trials):
        low, high = ratio_ci95(_rounds(rng, 1.2), _rounds(rng, 1.0), resamples=400, seed=seed)
        covered += low <= 1.2 <= high
    # nominal 95%, not exact for a percentile bootstrap of medians at 15 rounds (about 97% over 600 trials)
    assert covered / trials >= 0.9


def test_no_ratio_interval_from_fewer_than_two_rounds():
    assert ratio_ci95([1.0], [1.0, 2.0]) is None
    assert ratio_ci95([1.0, 2.0], []) is None
    assert ratio_ci95([1.0, 1.0], [0.0, 0.0]) is None  # no positive denominator to divide by
