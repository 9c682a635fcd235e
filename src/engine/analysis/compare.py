"""`bench compare A.csv B.csv`: per-cell ratio of a metric with a 95% bootstrap CI and Welch's
t-test over the repeats; exits 1 when a cell regresses beyond --threshold (a CI gate)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import InputError
from engine.results.modes import full_mode

LOWER_IS_BETTER = ("ttft_s", "itl_p50_s", "itl_p90_s", "itl_p99_s", "total_time", "avg_token_time",
                   "peak_rss_bytes", "load_s", "warmup_s", "compile_s")


@dataclass(frozen=True)
class CellComparison:
    cell: str
    label: str
    ratio: float  # candidate mean / baseline mean
    ci_low: float
    ci_high: float
    p_value: float
    regressed: bool
    improved: bool


def _load(path: str, metric: str):
    import pandas as pd

    if not Path(path).exists():
        raise InputError(f"results file not found: {path}")
    df = pd.read_csv(path)
    if metric not in df.columns:
        raise InputError(f"{path} has no column {metric!r}")
    return df[df.status == "ok"]


def compare(baseline: str, candidate: str, metric: str = "decode_tps", threshold: float = 0.05,
            alpha: float = 0.05) -> tuple[list[CellComparison], list[str]]:
    from scipy import stats

    a, b = _load(baseline, metric), _load(candidate, metric)
    lower_better = metric in LOWER_IS_BETTER
    out, unmatched = [], []
    for cell in sorted(set(a.cell_id) | set(b.cell_id)):
        xa, xb = a[a.cell_id == cell], b[b.cell_id == cell]
        if xa.empty or xb.empty:
            unmatched.append(cell)
            continue
        r0 = xa.iloc[0]
        label = f"{full_mode(r0)} {r0.device} p{r0.prompt_tokens} g{r0.gen_tokens}"
        if r0.get("batch_size", 1) > 1:
            label += f" b{r0.batch_size}"
        va, vb = xa[metric].to_numpy(float), xb[metric].to_numpy(float)
        ratio = vb.mean() / va.mean()
        if len(va) > 1 and len(vb) > 1:
            p = float(stats.ttest_ind(vb, va, equal_var=False).pvalue)
            ci = stats.bootstrap((vb, va), lambda y, x, axis=-1: np.mean(y, axis=axis) / np.mean(x, axis=axis),
                                 n_resamples=2000, method="percentile", random_state=0, vectorized=True).confidence_interval
            lo, hi = float(ci.low), float(ci.high)
        else:
            p, lo, hi = math.nan, math.nan, math.nan  # one repeat: no significance to claim
        significant = p < alpha
        worse = ratio > 1 + threshold if lower_better else ratio < 1 - threshold
        better = ratio < 1 - threshold if lower_better else ratio > 1 + threshold
        out.append(CellComparison(cell, label, ratio, lo, hi, p, significant and worse, significant and better))
    return out, unmatched
