"""Statistics of timed rounds: the median's confidence interval, speedup intervals, rank tests.

Distribution-free throughout, because round times are skewed (a launch hiccup, a clock step):

- ``median_ci95``: the order-statistic interval of the median (binomial, exact coverage of at
  least 95%); it exists from 6 rounds on.
- ``ratio_ci95``: a seeded percentile bootstrap of the ratio of two medians (a speedup), each
  sample resampled on its own (the two cases' rounds are not paired).
- ``mann_whitney``: the two-sided Mann-Whitney U test, as asv uses for its regressions: exact
  null distribution for small samples without ties, normal approximation with tie correction
  otherwise.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95


def _binomial_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


def median_ci95(samples: Sequence[float]) -> tuple[float, float] | None:
    """The distribution-free 95% confidence interval of the median, or None below 6 samples.

    [x_(k), x_(n-k+1)] of the sorted samples, k the largest rank with P(Binomial(n, 1/2) < k)
    <= 2.5%: the interval covers the true median with probability >= 95% whatever the
    distribution of the rounds.
    """
    data = sorted(samples)
    n = len(data)
    alpha = (1 - CONFIDENCE) / 2
    k = 0
    while k + 1 <= n and _binomial_cdf(k, n) <= alpha:  # P(X <= k) = P(X < k + 1)
        k += 1
    if k == 0:
        return None
    return data[k - 1], data[n - k]


def ci_halfwidth_fraction(samples: Sequence[float]) -> float | None:
    """The larger distance from the median to an end of ``median_ci95``, relative to the median."""
    interval = median_ci95(samples)
    if interval is None:
        return None
    median = statistics.median(samples)
    if median <= 0:
        return None
    return max(median - interval[0], interval[1] - median) / median


def ratio_ci95(numerator: Sequence[float], denominator: Sequence[float], *, resamples: int = 2000,
               seed: int = 0) -> tuple[float, float] | None:
    """95% percentile-bootstrap interval of median(numerator) / median(denominator).

    A speedup is baseline median over case median: ``numerator`` the baseline's rounds. Each
    sample is resampled with replacement on its own; the seed makes the interval reproducible.
    None when either sample has fewer than 2 rounds (no spread to resample).
    """
    if len(numerator) < 2 or len(denominator) < 2:
        return None
    rng = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        top = statistics.median(rng.choices(numerator, k=len(numerator)))
        bottom = statistics.median(rng.choices(denominator, k=len(denominator)))
        if bottom > 0:
            ratios.append(top / bottom)
    if not ratios:
        return None
    ratios.sort()
    low = ratios[int(math.floor((1 - CONFIDENCE) / 2 * (len(ratios) - 1)))]
    high = ratios[int(math.ceil((1 + CONFIDENCE) / 2 * (len(ratios) - 1)))]
    return low, high


@dataclass(frozen=True)
class RankTest:
    """A two-sided Mann-Whitney U test of two samples."""

    u: float  # U of the first sample
    p_value: float
    method: str  # "exact" or "normal approximation"


# Exact distribution up to this many arrangements' worth of samples; beyond it, the normal
# approximation is within a fraction of a percent of it.
_EXACT_MAX = 20


def _exact_u_counts(m: int, n: int) -> list[int]:
    """Counts of each U value 0..m*n over all C(m+n, m) arrangements (no ties)."""
    # counts[i][j][u]: arrangements of i first-sample and j second-sample values with U = u
    table = {(0, j): [1] for j in range(n + 1)}
    for i in range(1, m + 1):
        table[(i, 0)] = [1]
        for j in range(1, n + 1):
            # the largest value is from the first sample (adds j to U) or from the second
            a = [0] * j + table[(i - 1, j)]
            b = table[(i, j - 1)]
            size = max(len(a), len(b))
            table[(i, j)] = [(a[u] if u < len(a) else 0) + (b[u] if u < len(b) else 0) for u in range(size)]
    return table[(m, n)]


def mann_whitney(first: Sequence[float], second: Sequence[float]) -> RankTest:
    """Two-sided Mann-Whitney U test: do ``first`` and ``second`` come from one distribution?"""
    m, n = len(first), len(second)
    if m == 0 or n == 0:
        raise ValueError("the Mann-Whitney test needs at least one value in each sample")
    pooled = sorted([(v, 0) for v in first] + [(v, 1) for v in second])
    ranks: list[float] = [0.0] * len(pooled)
    ties: list[int] = []
    i = 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        if j > i:
            ties.append(j - i + 1)
        i = j + 1
    rank_sum = sum(r for r, (_, which) in zip(ranks, pooled, strict=True) if which == 0)
    u = rank_sum - m * (m + 1) / 2
    if not ties and m + n <= _EXACT_MAX:
        counts = _exact_u_counts(m, n)
        total = sum(counts)
        low = sum(counts[: int(min(u, m * n - u)) + 1])
        return RankTest(u, min(1.0, 2 * low / total), "exact")
    mean = m * n / 2
    n_all = m + n
    tie_term = sum(t**3 - t for t in ties) / (n_all * (n_all - 1))
    variance = m * n / 12 * (n_all + 1 - tie_term)
    if variance <= 0:
        return RankTest(u, 1.0, "normal approximation")
    z = (abs(u - mean) - 0.5) / math.sqrt(variance)  # continuity correction
    p = math.erfc(max(z, 0.0) / math.sqrt(2))
    return RankTest(u, min(1.0, p), "normal approximation")
