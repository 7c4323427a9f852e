"""The statistics of a study's report against independent references: the t
quantiles against Student's t distribution integrated numerically in float64,
intervals against `statistics` and closed forms, Welch's interval against
`scipy.stats`; forgetting at matched learning on hand-made curves."""

import math
import statistics

import numpy as np
import pytest
import scipy.stats

from ftjax.study.stats import (
    T95,
    aggregate_values,
    difference,
    matched_forgetting,
    t95,
)


def _t_cdf(x: float, df: int) -> float:
    """Student's t CDF at x > 0: 1/2 plus the density integrated over [0, x]
    (Simpson's rule, float64), the density's constant from log-gamma."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    t = np.linspace(0.0, x, 200_001)
    f = np.exp(log_c - (df + 1) / 2 * np.log1p(t * t / df))
    h = t[1] - t[0]
    return 0.5 + h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())


@pytest.mark.parametrize("df", sorted(T95))
def test_t_quantiles_are_the_975th_percentile(df):
    assert _t_cdf(t95(df), df) == pytest.approx(0.975, abs=1e-5)


def test_t_quantile_closed_forms_and_conservative_rounding():
    # df = 1 is the Cauchy distribution: tan(0.475 pi); df = 2: (2p - 1) / sqrt(2p(1 - p)).
    assert t95(1) == pytest.approx(math.tan(0.475 * math.pi), abs=1e-3)
    assert t95(2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), abs=1e-3)
    # Between table entries the quantile of the next smaller df: never narrower.
    assert t95(2.7) == t95(2) > t95(3)
    assert t95(35) == t95(30) and t95(1000) == t95(120)
    assert t95(math.inf) == pytest.approx(1.959964, abs=1e-3)
    with pytest.raises(ValueError):
        t95(0.5)


def test_confidence_interval_of_the_mean():
    xs = [0.2, 0.9]
    s = aggregate_values(xs)
    # Two seeds: the half-width is 12.706 * s / sqrt(2), with s = |a - b| / sqrt(2).
    assert s.ci95 == pytest.approx(12.706 * (0.7 / math.sqrt(2)) / math.sqrt(2), rel=1e-4)
    xs = [0.5, 0.25, 0.75, 0.6]
    s = aggregate_values(xs + [None, float("nan")])
    assert s.n == 4 and s.mean == pytest.approx(statistics.fmean(xs))
    ref = scipy.stats.t.ppf(0.975, 3) * statistics.stdev(xs) / 2
    assert s.ci95 == pytest.approx(ref, rel=1e-4)
    assert s.scaled(100.0).ci95 == pytest.approx(100 * s.ci95)


def test_welch_difference_against_scipy():
    a, b = [0.9, 1.0, 0.95, 0.97], [0.5, 0.7, 0.4]
    d = difference(a, b)
    ref = scipy.stats.ttest_ind(a, b, equal_var=False)
    assert d.diff == pytest.approx(np.mean(a) - np.mean(b))
    assert d.df == pytest.approx(ref.df, rel=1e-9)
    ci = ref.confidence_interval(0.95)
    exact_half = (ci.high - ci.low) / 2
    # Fractional df round down to the table's entry: at least as wide as the exact one.
    se = math.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b))
    assert exact_half <= d.ci95 == pytest.approx(t95(math.floor(ref.df)) * se)
    assert d.resolved is True
    # Overlapping rows: not resolved.
    close = difference([0.5, 0.9, 0.1], [0.6, 0.2, 0.7])
    assert close.resolved is False and abs(close.diff) < close.ci95


def test_difference_edge_cases():
    # Seeds that all agree: the difference is exact, resolved when nonzero.
    assert difference([1.0, 1.0, 1.0], [0.0, 0.0, 0.0]).resolved is True
    assert difference([0.0, 0.0], [0.0, 0.0]).resolved is False
    one = difference([0.3], [0.1, 0.2])
    assert one.diff == pytest.approx(0.15) and one.resolved is None and one.ci95 is None
    assert difference([], [0.1]).diff is None


def test_matched_forgetting_reads_the_first_crossing():
    # (step, target, general): the target reaches 0.5 first at step 20, 0.9 at step 40.
    points = [(40, 0.95, 0.3), (0, 0.0, 0.9), (10, 0.2, 0.85), (20, 0.6, 0.7), (30, 0.4, 0.65)]
    assert matched_forgetting(points, 0.5, general_base=0.9) == (20, pytest.approx(0.2))
    assert matched_forgetting(points, 0.9, general_base=0.9) == (40, pytest.approx(0.6))
    assert matched_forgetting(points, 0.99, general_base=0.9) is None
    # An evaluation with a missing score is not a crossing.
    assert matched_forgetting([(5, 0.7, None), (9, 0.7, 0.5)], 0.5, 0.9) == (
        9,
        pytest.approx(0.4),
    )
