"""`bench compare A.csv B.csv`: per cell, candidate (B) over baseline (A) of a metric with its CI,
and a verdict. Rows of two runs are not paired, so the interval is Welch's t interval on the logs
of the repeats (the ratio of geometric means); a cell regresses only when its whole CI lies
beyond --threshold in the worse direction, and improves only when it lies beyond it in the better
one. `bench compare` exits 1 on a regression (a CI gate)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from engine.errors import InputError
from engine.results.modes import full_mode
from engine.measure.stats import welch_ratio

LOWER_IS_BETTER = ("ttft_s", "itl_p50_s", "itl_p90_s", "itl_p99_s", "total_time", "avg_token_time",
                   "peak_rss_bytes", "load_s", "warmup_s", "compile_s")


@dataclass(frozen=True)
class CellComparison:
    cell: str
    label: str
    ratio: float  # candidate / baseline, ratio of geometric means
    ci_low: float
    ci_high: float
    p_value: float  # Welch's t-test on the logs
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


def _label(r0) -> str:
    label = f"{full_mode(r0)} {r0.device} p{r0.prompt_tokens} g{r0.gen_tokens}"
    if r0.get("batch_size", 1) > 1:
        label += f" b{r0.batch_size}"
    if isinstance(r0.get("node"), str) and r0.node:
        label += f" @{r0.node}"
    return label


def verdict(ratio_low: float, ratio_high: float, threshold: float, lower_better: bool) -> tuple[bool, bool]:
    """(regressed, improved): only when the whole CI lies beyond the threshold; no CI, no verdict."""
    if math.isnan(ratio_low):
        return False, False
    if lower_better:
        return ratio_low > 1 + threshold, ratio_high < 1 - threshold
    return ratio_high < 1 - threshold, ratio_low > 1 + threshold


def compare(baseline: str, candidate: str, metric: str = "decode_tps", threshold: float = 0.05,
            alpha: float = 0.05) -> tuple[list[CellComparison], list[str]]:
    """Per cell id in both files: the comparison at confidence 1 - alpha; and the unmatched ids."""
    a, b = _load(baseline, metric), _load(candidate, metric)
    out, unmatched = [], []
    for cell in sorted(set(a.cell_id) | set(b.cell_id)):
        xa, xb = a[a.cell_id == cell], b[b.cell_id == cell]
        if xa.empty or xb.empty:
            unmatched.append(cell)
            continue
        va, vb = xa[metric].to_numpy(float), xb[metric].to_numpy(float)
        r = welch_ratio(vb[vb > 0], va[va > 0], level=1 - alpha)
        regressed, improved = verdict(r.low, r.high, threshold, metric in LOWER_IS_BETTER)
        out.append(CellComparison(cell, _label(xa.iloc[0]), r.ratio, r.low, r.high, r.p_value, regressed, improved))
    return out, unmatched
