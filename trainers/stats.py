"""Mean and 95% confidence interval over replicates, with Student's t (no SciPy needed).

The interval is ``mean ± t(0.975, n-1) · s / √n`` with ``s`` the sample standard deviation. The
t quantile is found by bisection on the closed-form t distribution for whole degrees of freedom
(Abramowitz & Stegun 26.7.3–4), which is exact to the bisection's tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


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


def format_mean_ci(mean: float | None, ci: float | None, digits: int = 4) -> str:
    """``0.9512 ± 0.0031``; just the mean without an interval, ``n/a`` without a mean."""
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" if ci is None else f"{mean:.{digits}f} ± {ci:.{digits}f}"
