"""Means over seeds with 95 % Student-t confidence intervals, and paired differences to a reference.

The interval of a mean over n seeds is ``mean ± t(0.975, n-1) · s / sqrt(n)`` with ``s`` the
sample standard deviation (n - 1 in the denominator): the usual interval when the seeds' values
are treated as independent draws from a normal distribution. With 3 seeds t = 4.30, so the
interval is wide; that is the honest width of 3 seeds, not a defect of the formula.

A paired difference takes, for every seed both arms ran, ``arm - reference`` and gives the same
interval of its mean. Seeds share the data order and initialisation stream between arms (the
same ``seed_everything``), so pairing removes the seed-to-seed spread both arms share. The
verdict is "better" or "worse" when the interval excludes 0 (in the metric's good direction),
else "not distinguishable"; with one common seed there is no interval and no verdict. Costs
(step time, latency) pair as ratios ``arm / reference`` per seed instead, judged against 1.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

CONFIDENCE = 0.95
BETTER, WORSE, UNDECIDED = "better", "worse", "not distinguishable"


@functools.cache  # 30 ms a call, and a table asks for the same few (p, df) hundreds of times
def t_quantile(probability: float, df: int) -> float:
    """The `probability` quantile (0.5 < p < 1) of Student's t with `df` degrees of freedom.

    Solved by bisection on the distribution function, evaluated by integrating the density
    (Simpson's rule after a substitution that makes the integrand smooth); the kit needs no
    SciPy for it. Matches the printed tables to 4 decimals for df ≥ 1 (tested).
    """
    if not 0.5 < probability < 1 or df < 1:
        raise ValueError(f"need 0.5 < probability < 1 and df >= 1, got {probability}, {df}")
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < probability:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if _t_cdf(middle, df) < probability else (low, middle)
    return (low + high) / 2


def _t_cdf(x: float, df: int) -> float:
    """P(T ≤ x) for x ≥ 0: 1/2 + the density's integral over [0, x]."""
    # Substituting t = tan(θ) · sqrt(df) turns the density into c · cos(θ)^(df-1) on [0, atan(x/sqrt(df))].
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(math.pi)
    upper = math.atan(x / math.sqrt(df))
    steps = 2000
    width = upper / steps
    total = 0.0
    for index in range(steps + 1):
        weight = 1 if index in (0, steps) else (4 if index % 2 else 2)
        total += weight * math.cos(index * width) ** (df - 1)
    return 0.5 + math.exp(log_norm) * total * width / 3


@dataclass(frozen=True)
class Interval:
    """A mean over `n` values with the bounds of its 95 % t-interval (None when n < 2)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    @property
    def half_width(self) -> float | None:
        return None if self.low is None else (self.high - self.low) / 2


def mean_interval(values: list[float]) -> Interval:
    """The mean of `values` and its 95 % Student-t confidence interval.

    Raises:
        ValueError: on an empty list.
    """
    if not values:
        raise ValueError("no values to average")
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, None, None, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_difference(values: dict[int, float], reference: dict[int, float]) -> Interval | None:
    """The mean of ``values[s] - reference[s]`` over the seeds both have, with its interval; None if none."""
    common = sorted(set(values) & set(reference))
    return mean_interval([values[s] - reference[s] for s in common]) if common else None


def paired_ratio(values: dict[int, float], reference: dict[int, float]) -> Interval | None:
    """The mean of ``values[s] / reference[s]`` over the seeds both have (reference non-zero), with
    its interval; None if none. For costs (step time, latency), where a ratio is what carries over."""
    common = sorted(s for s in set(values) & set(reference) if reference[s] != 0)
    return mean_interval([values[s] / reference[s] for s in common]) if common else None


def ratio_verdict(ratio: Interval | None, better: str) -> str:
    """`verdict` of an arm-over-reference `ratio`: its interval against 1 instead of 0."""
    if ratio is None or ratio.low is None:
        return UNDECIDED
    return verdict(Interval(ratio.mean - 1, ratio.low - 1, ratio.high - 1, ratio.n), better)


def verdict(difference: Interval | None, better: str) -> str:
    """"better", "worse" or "not distinguishable" for an arm-minus-reference `difference`.

    `better` is "lower" or "higher": the direction in which the metric improves.
    """
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', got {better!r}")
    if difference is None or difference.low is None:
        return UNDECIDED
    if difference.high < 0:
        return BETTER if better == "lower" else WORSE
    if difference.low > 0:
        return BETTER if better == "higher" else WORSE
    return UNDECIDED
