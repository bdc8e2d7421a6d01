"""The replicate statistics (llmarch_compose/sweep/stats.py) against independent references:
mpmath's incomplete beta, Student t's density integrated numerically, Python's statistics."""

from __future__ import annotations

import statistics

import mpmath
import pytest

from llmarch_compose.sweep.stats import incomplete_beta, replicates, t_quantile, t_two_sided_p, welch


def t_density(df: float):
    c = mpmath.gamma((df + 1) / 2) / (mpmath.sqrt(df * mpmath.pi) * mpmath.gamma(df / 2))
    return lambda t: c * (1 + t * t / df) ** (-(df + 1) / 2)


@pytest.mark.parametrize("a, b, x", [(0.5, 0.5, 0.2), (1.0, 0.5, 0.9), (2.5, 0.5, 0.3), (15.0, 0.5, 0.97),
                                     (4.37, 0.5, 0.05), (3.0, 7.0, 0.5)])
def test_incomplete_beta_matches_mpmath(a, b, x):
    assert incomplete_beta(a, b, x) == pytest.approx(float(mpmath.betainc(a, b, 0, x, regularized=True)), rel=1e-10)


@pytest.mark.parametrize("df", [2, 3, 4, 9, 4.37])
def test_t_quantile_and_tail_match_the_density(df):
    q = t_quantile(0.975, df)
    assert float(mpmath.quad(t_density(df), [0, q])) == pytest.approx(0.475, abs=1e-9)
    assert t_two_sided_p(1.3, df) == pytest.approx(float(2 * mpmath.quad(t_density(df), [1.3, mpmath.inf])),
                                                   rel=1e-8)


def test_replicates_mean_sd_and_interval():
    values = [2.10, 2.14, 2.12, 2.19]
    r = replicates(values)
    assert r.mean == pytest.approx(statistics.mean(values)) and r.sd == pytest.approx(statistics.stdev(values))
    low, high = r.interval
    half = t_quantile(0.975, 3) * statistics.stdev(values) / 2
    assert (low, high) == pytest.approx((r.mean - half, r.mean + half))
    one = replicates([2.0])
    assert one.sd is None and one.interval is None  # one seed: no spread to state


def test_welch_against_the_textbook_formula():
    a, b = replicates([2.31, 2.35, 2.28, 2.30]), replicates([2.10, 2.14, 2.12])
    va, vb = statistics.variance(a.values) / 4, statistics.variance(b.values) / 3
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
    t = (a.mean - b.mean) / (va + vb) ** 0.5
    test = welch(a, b)
    assert (test.t, test.df) == pytest.approx((t, df))
    assert test.p == pytest.approx(float(2 * mpmath.quad(t_density(df), [t, mpmath.inf])), rel=1e-8)
    assert test.significant
    assert welch(replicates([1.0]), b) is None  # one seed: nothing to test
    assert welch(replicates([1.0, 1.0]), replicates([2.0, 2.0])) is None  # no spread on either side
