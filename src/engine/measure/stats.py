"""Small statistics over raw samples: percentiles, mean with a 95% confidence interval, CoV, and
the ratio of two speeds with its confidence interval (paired rounds, or two independent samples)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def t_quantile(df: float, level: float = 0.95) -> float:
    """Two-sided Student-t quantile at confidence `level`, from scipy.special (a fraction of
    scipy.stats' import cost inside a measuring process)."""
    from scipy.special import stdtrit

    return float(stdtrit(df, 0.5 + level / 2))


def t95(df: int) -> float:
    return t_quantile(df, 0.95)


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof=1); 0 for one sample
    ci95_low: float
    ci95_high: float

    @property
    def cov(self) -> float:
        return self.std / self.mean if self.mean else math.nan

    @property
    def relative_half_width(self) -> float:
        """Half the 95% CI over the mean (NaN with fewer than two samples)."""
        return (self.ci95_high - self.ci95_low) / 2 / self.mean if self.mean else math.nan


def summarize(values: Sequence[float]) -> Summary:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    half = t95(v.size - 1) * std / math.sqrt(v.size) if v.size > 1 else math.nan
    return Summary(int(v.size), mean, std, mean - half, mean + half)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


@dataclass(frozen=True)
class Ratio:
    """a / b with its confidence interval and the two-sided p-value of 'a equals b'."""

    ratio: float
    low: float
    high: float
    p_value: float
    method: str  # paired: t on the log-ratios of rounds run side by side; welch: Welch's t on the logs

    def excludes_one(self) -> bool:
        return self.low > 1 or self.high < 1


def _on_logs(diff: float, se: float, df: float, level: float, method: str) -> Ratio:
    """exp of a mean log difference and its t interval; a zero spread gives a point interval."""
    if se == 0:
        return Ratio(math.exp(diff), math.exp(diff), math.exp(diff), 1.0 if diff == 0 else 0.0, method)
    from scipy.special import stdtr

    half = t_quantile(df, level) * se
    return Ratio(math.exp(diff), math.exp(diff - half), math.exp(diff + half),
                 float(2 * stdtr(df, -abs(diff) / se)), method)


def paired_ratio(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Ratio:
    """a / b from rounds measured side by side (a[i] beside b[i]): the geometric mean of the
    per-round ratios, with a t interval on their logs (drift shared by a round cancels)."""
    d = np.log(np.asarray(a, np.float64)) - np.log(np.asarray(b, np.float64))
    if d.size < 2:
        return Ratio(math.exp(d.mean()) if d.size else math.nan, math.nan, math.nan, math.nan, "paired")
    return _on_logs(float(d.mean()), float(d.std(ddof=1)) / math.sqrt(d.size), d.size - 1, level, "paired")


def welch_ratio(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Ratio:
    """a / b from two independent samples: the ratio of geometric means, with Welch's t interval
    on the difference of the mean logs (Welch-Satterthwaite degrees of freedom)."""
    la, lb = np.log(np.asarray(a, np.float64)), np.log(np.asarray(b, np.float64))
    if la.size < 2 or lb.size < 2:
        ratio = math.exp(la.mean() - lb.mean()) if la.size and lb.size else math.nan
        return Ratio(ratio, math.nan, math.nan, math.nan, "welch")
    va, vb = la.var(ddof=1) / la.size, lb.var(ddof=1) / lb.size
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (la.size - 1) + vb**2 / (lb.size - 1)) if se else 1.0
    return _on_logs(float(la.mean() - lb.mean()), se, df, level, "welch")


def ratio_text(ratio: float, low: float, high: float, versus: str) -> str:
    """'1.12x VERSUS [1.05, 1.19]': a speed ratio and its CI (no bounds where there is none)."""
    bounds = "" if math.isnan(low) else f" [{low:.2f}, {high:.2f}]"
    return f"{ratio:.2f}x {versus}{bounds}"
