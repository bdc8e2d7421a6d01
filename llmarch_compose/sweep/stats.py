"""The statistics of seeds as replicates: mean, standard deviation, Student t intervals
and Welch's t-test, in plain Python (no SciPy).

Student's t distribution is reached through the regularized incomplete beta function:
for t >= 0, P(|T| > t) = I_x(df/2, 1/2) with x = df / (df + t^2), valid for any real
df > 0 (Welch's degrees of freedom are not whole numbers). I_x is evaluated with its
continued fraction (modified Lentz), as in Numerical Recipes' `betai`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

#: The two-sided level of the intervals and of the test: 95% intervals, a 5% test.
ALPHA = 0.05


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz); converges for x < (a + 1) / (a + b + 2)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"the incomplete beta fraction did not converge (a={a}, b={b}, x={x})")


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x={x} is outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b  # the symmetry I_x(a, b) = 1 - I_{1-x}(b, a)


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    return incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The `p` quantile of Student's t (0.5 < p < 1), by bisection on the two-sided tail."""
    if not 0.5 < p < 1.0:
        raise ValueError(f"p={p} must lie between 0.5 and 1")
    tail = 2.0 * (1.0 - p)
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > tail:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        if t_two_sided_p(mid, df) > tail:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * high:
            break
    return (low + high) / 2.0


@dataclass(frozen=True)
class Replicates:
    """One metric over the seeds of one configuration."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return math.fsum(self.values) / self.n

    @property
    def sd(self) -> Optional[float]:
        """The sample standard deviation (n - 1 in the denominator); None for one value."""
        if self.n < 2:
            return None
        mean = self.mean
        return math.sqrt(math.fsum((v - mean) ** 2 for v in self.values) / (self.n - 1))

    @property
    def interval(self) -> Optional[tuple[float, float]]:
        """The 95% Student t interval of the mean, mean -+ t(0.975, n-1) * sd / sqrt(n)."""
        if self.n < 2:
            return None
        half = t_quantile(1.0 - ALPHA / 2.0, self.n - 1) * self.sd / math.sqrt(self.n)
        return self.mean - half, self.mean + half


def replicates(values: Sequence[float]) -> Replicates:
    return Replicates(tuple(float(v) for v in values))


@dataclass(frozen=True)
class Welch:
    """Welch's unequal-variance t-test of two means."""

    t: float
    df: float
    p: float

    @property
    def significant(self) -> bool:
        return self.p < ALPHA


def welch(a: Replicates, b: Replicates) -> Optional[Welch]:
    """Welch's two-sided t-test of mean(a) == mean(b); None where it cannot be computed
    (fewer than two values on a side, or no spread on either side)."""
    if a.n < 2 or b.n < 2:
        return None
    va, vb = a.sd ** 2 / a.n, b.sd ** 2 / b.n
    if va + vb == 0.0:
        return None
    t = (a.mean - b.mean) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (a.n - 1) + vb ** 2 / (b.n - 1))
    return Welch(t, df, t_two_sided_p(t, df))


__all__ = ["ALPHA", "Replicates", "Welch", "incomplete_beta", "replicates", "t_quantile", "t_two_sided_p", "welch"]
