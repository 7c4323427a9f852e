"""The statistics behind every number of a study's report: the mean and
95% confidence interval over seeds, the interval of a difference between
two rows (Welch), and forgetting at matched learning read off the curves a
run records along training.

    aggregate_values([0.9, 1.0, 0.95])                  # Stat(mean, std, n, ci95)
    difference([0.9, 1.0, 0.95], [0.5, 0.6, 0.4])       # Difference(..., resolved=True)
    matched_forgetting(points, level=0.5, general_base=0.9)
"""

from __future__ import annotations

import math
from typing import NamedTuple

# Two-sided 95% quantiles of Student's t by degrees of freedom, rounded up
# at the 4th decimal; between entries the next smaller df's (a slightly wider,
# conservative interval); beyond the table the last entry.
T95 = {1: 12.7063, 2: 4.3027, 3: 3.1825, 4: 2.7765, 5: 2.5706, 6: 2.4470, 7: 2.3647,
       8: 2.3061, 9: 2.2622, 10: 2.2282, 11: 2.2010, 12: 2.1789, 13: 2.1604, 14: 2.1448,
       15: 2.1315, 16: 2.1200, 17: 2.1099, 18: 2.1010, 19: 2.0931, 20: 2.0860, 21: 2.0797,
       22: 2.0739, 23: 2.0687, 24: 2.0639, 25: 2.0596, 26: 2.0556, 27: 2.0519, 28: 2.0485,
       29: 2.0453, 30: 2.0423, 40: 2.0211, 60: 2.0003, 120: 1.9800}  # fmt: skip
Z95 = 1.9600


def t95(df: float) -> float:
    """The two-sided 95% quantile of Student's t with `df` degrees of freedom
    (fractional df, as Welch's, round down: conservative)."""
    if df < 1:
        raise ValueError(f"df={df}; expected >= 1")
    if df > max(T95):
        return Z95 if math.isinf(df) else T95[max(T95)]
    return T95[max(k for k in T95 if k <= df)]


class Stat(NamedTuple):
    """A value aggregated over a group's runs (seeds)."""

    mean: float | None
    std: float | None  # sample standard deviation (n - 1); 0.0 for one value
    n: int
    ci95: float | None  # half-width of the 95% t-interval of the mean; None below 2 values

    def scaled(self, factor: float) -> Stat:
        if self.mean is None:
            return self
        ci = None if self.ci95 is None else self.ci95 * factor
        return Stat(self.mean * factor, self.std * factor, self.n, ci)


def numbers(values) -> list[float]:
    """The values that are numbers (None, NaN and booleans left out)."""
    return [
        float(v)
        for v in values
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
    ]


def aggregate_values(values) -> Stat:
    """Mean, sample std, count and 95% confidence half-width of the values
    that are numbers (None and NaN are left out): the one aggregation behind
    every number of the report.

    >>> aggregate_values([1.0, 3.0, None, float("nan")])  # doctest: +ELLIPSIS
    Stat(mean=2.0, std=1.4142135623730951, n=2, ci95=12.706...)
    """
    xs = numbers(values)
    if not xs:
        return Stat(None, None, 0, None)
    n = len(xs)
    mean = math.fsum(xs) / n
    if n == 1:
        return Stat(mean, 0.0, 1, None)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    return Stat(mean, std, n, t95(n - 1) * std / math.sqrt(n))


class Difference(NamedTuple):
    """mean(a) - mean(b) with its Welch 95% interval; `resolved` when the
    interval excludes 0 (None when either side has fewer than 2 values)."""

    diff: float | None
    ci95: float | None
    df: float | None
    resolved: bool | None


def difference(a, b) -> Difference:
    """The difference of two rows' means over seeds, with Welch's 95%
    interval (unequal variances; Welch–Satterthwaite degrees of freedom).
    Two rows whose seeds all agree (std 0) differ exactly when their means do."""
    xa, xb = numbers(a), numbers(b)
    if not xa or not xb:
        return Difference(None, None, None, None)
    sa, sb = aggregate_values(xa), aggregate_values(xb)
    diff = sa.mean - sb.mean
    if sa.n < 2 or sb.n < 2:
        return Difference(diff, None, None, None)
    va, vb = sa.std**2 / sa.n, sb.std**2 / sb.n
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Difference(diff, 0.0, math.inf, diff != 0.0)
    df = (va + vb) ** 2 / (va**2 / (sa.n - 1) + vb**2 / (sb.n - 1))
    half = t95(df) * se
    return Difference(diff, half, df, abs(diff) > half)


def matched_forgetting(points, level: float, general_base: float) -> tuple[int, float] | None:
    """Forgetting at matched learning on one run's curve: (step, general drop)
    at the first evaluation whose target score reaches `level`, or None if
    none does. `points`: (step, target score, general score) in step order;
    the drop is `general_base` minus the general score there."""
    for step, target, general in sorted(points, key=lambda p: p[0]):
        if target is not None and general is not None and target >= level:
            return int(step), general_base - general
    return None
