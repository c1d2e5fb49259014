"""The grid report's statistics, in plain Python and NumPy (SciPy is not a dependency).

- **Intervals over replicates.** ``mean ± t(0.975, n-1) · s / √n`` with ``s`` the sample standard
  deviation. The t quantile is found by bisection on the closed-form t distribution for whole
  degrees of freedom (Abramowitz & Stegun 26.7.3–4), exact to the bisection's tolerance.
- **Rank correlation.** Kendall's τ-b between two measurements of the same networks, with the
  two-sided p-value of its normal approximation under independence, the variance corrected for
  ties (Kendall 1945; the ``asymptotic`` method of ``scipy.stats.kendalltau``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _t_central_mass(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with ``df`` (whole, ≥ 1) degrees of freedom."""
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2 == 1:
        term, total = math.cos(theta), 0.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= cos2 * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + math.sin(theta) * total)
    term, total = 1.0, 0.0
    for k in range(1, df // 2 + 1):
        total += term
        term *= cos2 * (2 * k - 1) / (2 * k)
    return math.sin(theta) * total


def t_critical(df: int, confidence: float = 0.95) -> float:
    """The two-sided critical value t with P(|T| < t) = ``confidence``, e.g. 12.706 for df = 1."""
    low, high = 0.0, 1.0
    while _t_central_mass(high, df) < confidence:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if _t_central_mass(middle, df) < confidence else (low, middle)
    return (low + high) / 2


def mean_ci(values: Sequence[float | None], confidence: float = 0.95) -> tuple[float | None, float | None]:
    """(mean, half-width of the confidence interval) of the non-missing values.

    The mean is None when no value is present; the half-width is None with fewer than two values.
    """
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    n = len(present)
    mean = math.fsum(present) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in present) / (n - 1))
    return mean, t_critical(n - 1, confidence) * sd / math.sqrt(n)


@dataclass(frozen=True)
class Estimate:
    """One metric over a cell's replicates: the mean, the 95% half-width, and how many values."""

    mean: float | None
    ci95: float | None
    n: int

    @property
    def few(self) -> bool:
        """An interval rests on fewer than three replicates: it is reported, but flagged."""
        return self.ci95 is not None and self.n < 3

    @property
    def wide(self) -> bool:
        """The half-width exceeds the mean's magnitude: the interval reaches past zero."""
        return self.ci95 is not None and self.mean is not None and self.ci95 > abs(self.mean)


def estimate(values: Sequence[float | None], confidence: float = 0.95) -> Estimate:
    """``mean_ci`` of the non-missing ``values``, with their count."""
    mean, half = mean_ci(values, confidence)
    return Estimate(mean=mean, ci95=half, n=sum(v is not None for v in values))


@dataclass(frozen=True)
class RankCorrelation:
    """Kendall's τ-b over ``n`` pairs and its two-sided p-value; None where they are undefined."""

    tau: float | None
    p_value: float | None
    n: int


def _tie_sums(values: np.ndarray) -> tuple[float, float, float]:
    """Σt(t−1), Σt(t−1)(2t+5) and Σt(t−1)(t−2) over the sizes t of the groups of equal values."""
    _, counts = np.unique(values, return_counts=True)
    t = counts[counts > 1].astype(np.float64)
    return float(np.sum(t * (t - 1))), float(np.sum(t * (t - 1) * (2 * t + 5))), float(np.sum(t * (t - 1) * (t - 2)))


def kendall_tau(x: Sequence[float | None], y: Sequence[float | None]) -> RankCorrelation:
    """Kendall's τ-b of the pairs ``(x[i], y[i])`` where both are present (not None, not NaN).

    τ-b = (C − D) / √((n₀ − n₁)(n₀ − n₂)), with C and D the concordant and discordant pairs,
    n₀ = n(n−1)/2 and n₁, n₂ the pairs tied in x and in y. The p-value is two-sided, from
    z = (C − D) / √Var(C − D) with the tie-corrected variance. τ is None with fewer than two pairs
    or when either side is constant; the p-value is None where τ is.
    """
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if a is not None and b is not None]
    values = np.array(pairs, dtype=np.float64).reshape(-1, 2)
    values = values[np.isfinite(values).all(axis=1)]
    n = len(values)
    a, b = values[:, 0], values[:, 1]
    score = 0  # C − D, one row of pairs at a time: O(n²) time, O(n) memory
    for i in range(n - 1):
        score += int(np.sum(np.sign(a[i + 1 :] - a[i]) * np.sign(b[i + 1 :] - b[i])))
    n0 = n * (n - 1) / 2
    tx, vx, wx = _tie_sums(a)
    ty, vy, wy = _tie_sums(b)
    denominator = math.sqrt((n0 - tx / 2) * (n0 - ty / 2)) if n >= 2 else 0.0
    if denominator == 0:
        return RankCorrelation(tau=None, p_value=None, n=n)
    variance = (n * (n - 1) * (2 * n + 5) - vx - vy) / 18
    variance += tx * ty / (2 * n * (n - 1))
    if n > 2:
        variance += wx * wy / (9 * n * (n - 1) * (n - 2))
    p_value = math.erfc(abs(score) / math.sqrt(variance) / math.sqrt(2)) if variance > 0 else None
    return RankCorrelation(tau=score / denominator, p_value=p_value, n=n)
