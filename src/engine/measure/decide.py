"""The one decision rule, used by `--modes best` (sweep) and the report's winners (analysis).

Per workload (framework, model, device, prompt, lengths, batch, threads, node; the report drops
the framework to pick among frameworks), the ok cells that pass the fidelity bar are ranked by
the median decode tok/s of their repeats. The top cell is compared with the runner-up by the ratio
of their speeds and its 95% CI: paired by round (repeat i of one beside repeat i of the other,
which ran interleaved in one run: a t interval on the per-round log-ratios), or, for cells from
different runs or a sequential schedule, Welch's t interval on the logs. The top is `best` only
where that CI excludes 1 (a lone passing cell is `best` with no ratio); otherwise every cell whose
CI against the top includes 1 is `tied`. A cell with no fidelity measured is `unchecked`, never
chosen. Rows are plain mappings (a JSONL line, a pandas record) or BenchmarkResults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import median
from typing import Any, Iterable, Mapping

from engine.measure.stats import Ratio, paired_ratio, welch_ratio
from engine.results.modes import mode_label

# the fidelity bar on the real-text statistics (docs/results-schema.md says why these values)
KLD_MEAN_BAR = 0.02  # nats
KLD_P99_BAR = 0.25  # nats
SAME_TOP_BAR = 0.90
VERDICT_FLAGS = ("best", "tied", "unchecked")  # flags this rule owns: a new decision replaces them


def value(row: Any, name: str, default: Any = None) -> Any:
    return row.get(name, default) if isinstance(row, Mapping) else getattr(row, name, default)


def number(row: Any, name: str) -> float:
    v = value(row, name)
    return math.nan if v is None or v == "" else float(v)


def text(row: Any, name: str) -> str:
    v = value(row, name)
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def passes(row: Any) -> bool | None:
    """The fidelity bar (docs/results-schema.md): True or False; None where fidelity was not
    measured (`unchecked`: never chosen)."""
    kld, p99, same = number(row, "kld_mean"), number(row, "kld_p99"), number(row, "same_top_p")
    if math.isnan(kld) or math.isnan(p99) or math.isnan(same):
        return None
    return kld <= KLD_MEAN_BAR and p99 <= KLD_P99_BAR and same >= SAME_TOP_BAR


def _label(row: Any, with_framework: bool) -> str:
    """How a cell ran (the one mode label of engine.results.modes), with its framework where frameworks compete."""
    label = mode_label(text(row, "precision"), text(row, "optimization_level"), value(row, "options"))
    return f"{text(row, 'framework')} {label}" if with_framework else label


def _ids(v: Any) -> tuple:
    """Prompt ids as a JSONL list, a CSV's space-joined text, or a one-id number pandas parsed."""
    if isinstance(v, str):
        return tuple(v.split())
    if isinstance(v, (list, tuple)):
        return tuple(map(str, v))
    return () if v is None or (isinstance(v, float) and math.isnan(v)) else (str(int(v)),)


def _int(row: Any, name: str, default: int) -> int:
    v = number(row, name)  # a column older files lack reads as its default
    return default if math.isnan(v) else int(v)


def workload_key(row: Any, across_frameworks: bool = False) -> tuple:
    key = (text(row, "model"), text(row, "device"), _int(row, "prompt_tokens", 0), _int(row, "gen_tokens", 0),
           _int(row, "batch_size", 1), _int(row, "threads", 0), _ids(value(row, "prompt_ids")), text(row, "node"))
    return key if across_frameworks else (text(row, "framework"), *key)


@dataclass
class CellSpeeds:
    """One cell's decode tok/s by repeat, and what says whether its rounds pair with another's."""

    cell_id: str
    label: str
    run_id: str
    schedule: str
    fidelity: bool | None
    speeds: dict[int, float] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return median(self.speeds.values())

    def ratio_to(self, other: "CellSpeeds") -> Ratio:
        """self / other: paired by round where both ran interleaved in one run, else Welch."""
        if self.run_id == other.run_id and self.schedule == other.schedule == "interleaved":
            rounds = sorted(set(self.speeds) & set(other.speeds))
            return paired_ratio([self.speeds[i] for i in rounds], [other.speeds[i] for i in rounds])
        return welch_ratio(list(self.speeds.values()), list(other.speeds.values()))


@dataclass(frozen=True)
class Decision:
    """One workload's verdict: `best` (top beats the runner-up, or is alone), `tied`, or `none`
    (no passing cell). `ratio` is top / runner-up; `tied` lists the tied cells' ids, top first."""

    key: tuple
    verdict: str
    top: CellSpeeds | None
    runner_up: CellSpeeds | None = None
    ratio: Ratio | None = None
    tied: tuple[CellSpeeds, ...] = ()
    unchecked: tuple[CellSpeeds, ...] = ()


def cell_speeds(rows: Iterable[Any], across_frameworks: bool = False) -> dict[tuple, list[CellSpeeds]]:
    """Ok cells per workload. A cell written by several runs keeps its last run's rows."""
    cells: dict[str, tuple[tuple, CellSpeeds]] = {}
    for r in rows:
        speed = number(r, "decode_tps")
        if text(r, "status") != "ok" or math.isnan(speed) or speed <= 0:
            continue
        cid, run = text(r, "cell_id"), text(r, "run_id")
        if cid not in cells or cells[cid][1].run_id != run:
            cells[cid] = (workload_key(r, across_frameworks), CellSpeeds(
                cid, _label(r, across_frameworks), run, text(r, "schedule"), passes(r)))
        cells[cid][1].speeds[_int(r, "repeat", 0)] = speed
    out: dict[tuple, list[CellSpeeds]] = {}
    for key, c in cells.values():
        out.setdefault(key, []).append(c)
    return out


def decide_workload(key: tuple, cells: list[CellSpeeds]) -> Decision:
    unchecked = tuple(c for c in cells if c.fidelity is None)
    ranked = sorted((c for c in cells if c.fidelity), key=lambda c: -c.median)
    if not ranked:
        return Decision(key, "none", None, unchecked=unchecked)
    top = ranked[0]
    if len(ranked) == 1:
        return Decision(key, "best", top, unchecked=unchecked)
    ratio = top.ratio_to(ranked[1])
    if ratio.low > 1:
        return Decision(key, "best", top, ranked[1], ratio, unchecked=unchecked)
    tied = (top, *(c for c in ranked[1:] if not top.ratio_to(c).low > 1))
    return Decision(key, "tied", top, ranked[1], ratio, tied, unchecked)


def decide(rows: Iterable[Any], across_frameworks: bool = False) -> list[Decision]:
    return [decide_workload(k, cells) for k, cells in cell_speeds(rows, across_frameworks).items()]


def blank_decision() -> dict[str, Any]:
    """The decision columns of a row no verdict names: every row is reset to these before a file
    is decided again."""
    return {"runner_up": "", "ratio_to_runner_up": math.nan, "ratio_ci95_low": math.nan,
            "ratio_ci95_high": math.nan, "ratio_method": "", "tied_modes": ""}


def row_changes(decisions: Iterable[Decision]) -> dict[str, dict[str, Any]]:
    """Per cell id, what its rows carry: the decision columns and a verdict flag (`flags`, added to
    the row's own). The top cell holds the ratio to the runner-up; every tied cell names the tie."""
    out: dict[str, dict[str, Any]] = {}
    for d in decisions:
        for c in d.unchecked:
            out[c.cell_id] = {"flags": ("unchecked",)}
        tied = ", ".join(c.label for c in d.tied)
        for c in d.tied:
            out[c.cell_id] = {"flags": ("tied",), "tied_modes": tied}
        if d.verdict == "best":
            out[d.top.cell_id] = {"flags": ("best",)}
        if d.ratio is not None:
            out[d.top.cell_id].update(runner_up=d.runner_up.label, ratio_to_runner_up=d.ratio.ratio,
                                      ratio_ci95_low=d.ratio.low, ratio_ci95_high=d.ratio.high,
                                      ratio_method=d.ratio.method)
    return out
