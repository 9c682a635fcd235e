"""Small statistics over raw samples: percentiles, mean with a 95% confidence interval, CoV."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def t95(df: int) -> float:
    """Two-sided 95% Student-t quantile, from scipy as `bench compare` uses (scipy.special: a
    fraction of scipy.stats' import cost inside a measuring process)."""
    from scipy.special import stdtrit

    return float(stdtrit(df, 0.975))


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
