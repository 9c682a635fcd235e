"""Terminal output: consoles for stdout and stderr, and sweep progress on stderr."""

from __future__ import annotations

import math
import sys
import time
from typing import Callable

from rich.console import Console
from rich.progress import ProgressColumn
from rich.text import Text

from engine.measure.cell import Cell
from engine.results.modes import mode_label, row_mode
from engine.measure.stats import ratio_text
from engine.results.rows import BenchmarkResult
from engine.results.writers import fmt, results_table
from engine.sweep.eta import Progress, SweepEta

stderr = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
# piped output keeps the table readable instead of folding it to 80 columns
stdout = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def workload(cell: Cell) -> str:
    batch = f" batch {cell.batch_size}" if cell.batch_size > 1 else ""
    return f"prompt {cell.prompt_tokens} gen {cell.gen_tokens}{batch}"


def cell_mode(cell: Cell, precision: str = "") -> str:
    """A cell's mode before it has a row: the precision the child resolved, or the one asked for."""
    return mode_label(precision or cell.precision, "compile" if cell.compile else "", dict(cell.options))


def format_eta(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.0f}s"


def progress_line(cell: Cell, rows: list[BenchmarkResult], done: int, total: int) -> str:
    r = rows[0]
    what = f"{cell.framework} {row_mode(r) if r.status == 'ok' else cell_mode(cell)} {workload(cell)}"
    if r.node:
        what += f" on {r.node}"
    if r.status != "ok":
        return f"[{done}/{total}] {what}: {r.status}: {r.error[:160]}"
    return f"[{done}/{total}] {what}: {r.decode_tps_mean:.1f} tok/s decode, TTFT {r.ttft_s * 1e3:.0f} ms"


class SweepProgress:
    """Progress on stderr: a line when each load group has loaded its model and when each cell
    finishes, each with the ETA of `engine.sweep.eta`; on a terminal, a live bar (current cell,
    done/total, elapsed, the same ETA) above the table of finished cells."""

    def __init__(self, total: int, clock: Callable[[], float] = time.monotonic):
        self.total, self.rows, self.clock, self.started = total, [], clock, clock()
        self.eta, self.loaded = SweepEta([], clock), 0
        self.running: dict[str, str] = {}  # node -> what runs there
        self.live = stderr.is_terminal
        if self.live:
            from rich.console import Group
            from rich.live import Live
            from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            self._group = Group
            self.progress = Bar(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), EtaColumn(self.eta_text), console=stderr)
            self.task = self.progress.add_task("starting", total=total)
            self._live = Live(self.progress, console=stderr, refresh_per_second=4)

    def __enter__(self) -> "SweepProgress":
        if self.live:
            self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self._live.stop()

    def eta_text(self) -> str:
        return f"ETA {format_eta(self.eta.remaining_s())}"

    def plan(self, cells: list[Cell]) -> None:
        """The cells left to measure (after --resume): what the ETA counts."""
        self.total, self.eta = len(cells), SweepEta(cells, self.clock)
        if self.live:
            self.progress.update(self.task, total=self.total)

    def start(self, cell: Cell, node: str = "") -> None:
        """`cell` began (on cluster `node`); several run at once on a cluster."""
        if self.live:
            where = f" on {node}" if node else ""
            self.running[node] = f"{cell.framework} {cell_mode(cell)} {workload(cell)}{where}"
            self.progress.update(self.task, description=" | ".join(self.running.values()))

    def report(self, event: Progress) -> None:
        """A lane loaded its model (a line), warmed up or measured a repeat (the ETA learns from them)."""
        if event.kind != "loaded":
            (self.eta.warmed if event.kind == "prepared" else self.eta.measured)(event)
            return
        self.eta.loaded(event.cell, event.seconds)
        self.loaded += 1
        stderr.print(f"loaded {event.cell.framework} {cell_mode(event.cell, event.precision)} in "
                     f"{event.seconds:.1f}s (group {self.loaded}/{len(self.eta.lanes)})  [dim]{self.eta_text()}[/]")

    def finish(self, cell: Cell, rows: list[BenchmarkResult], done: int, total: int) -> None:
        self.rows += rows
        self.eta.cell_done(cell)
        if self.live:
            self.progress.update(self.task, completed=done)
            self._live.update(self._group(self.progress, results_table(self.rows)))
            return
        stderr.print(f"{progress_line(cell, rows, done, total)}  "
                     f"[dim]elapsed {self.clock() - self.started:.0f}s, {self.eta_text()}[/]")


class EtaColumn(ProgressColumn):
    """The live bar's ETA: the sweep's own estimate, re-read at every refresh."""

    def __init__(self, text: Callable[[], str]):
        super().__init__()
        self.text = text

    def render(self, task) -> Text:
        return Text(self.text())


def comparison_table(rows, metric: str, baseline: str, candidate: str, level: float):
    """`bench compare`'s verdicts, one line per matched cell: 'B 0.80x A [0.79, 0.81]'."""
    from pathlib import Path
    from rich.table import Table

    a, b = Path(baseline).stem, Path(candidate).stem
    if a == b:
        a, b = baseline, candidate
    t = Table(title=f"{metric}: {b} / {a}, {level:.0%} CI (Welch on logs: rows of two runs are not paired)",
              header_style="bold")
    for c in ("cell", "ratio", "p (Welch)", "verdict"):
        t.add_column(c)
    for r in rows:
        verdict = "[red]REGRESSION[/]" if r.regressed else "[green]improved[/]" if r.improved else "same"
        t.add_row(r.label, f"{b} {ratio_text(r.ratio, r.ci_low, r.ci_high, a)}",
                  f"{r.p_value:.3g}" if not math.isnan(r.p_value) else "-", verdict)
    return t


def best_table(decisions, rows: list[dict]):
    """`--modes best`: one line per framework and workload: the chosen mode (or the tie), its ratio
    to the runner-up with the 95% CI, and what it gives up."""
    from rich.table import Table

    t = Table(title="best mode per framework (fastest that passes the fidelity bar, by a CI excluding 1)",
              header_style="bold")
    for col in ("framework", "mode", "prompt", "gen", "decode tok/s (median)", "verdict", "vs runner-up",
                "KLD nats", "KLD p99", "same top", "peak RSS MB",
                "modes tried"):
        t.add_column(col, justify="left" if col in ("framework", "mode", "verdict", "vs runner-up") else "right")
    first = {r["cell_id"]: r for r in reversed(rows)}
    for d in sorted(decisions, key=lambda d: -(d.top.median if d.top else 0)):
        tried = str(len({r["cell_id"] for r in rows if _workload(r) == d.key}))
        if d.top is None:
            reason = "unchecked: no fidelity measured" if d.unchecked else "no mode passes the fidelity bar"
            t.add_row(d.key[0], "-", *map(str, d.key[3:5]), "-", reason, "-", "-", "-", "-", "-", tried)
            continue
        r = first[d.top.cell_id]
        verdict = "best" if d.verdict == "best" else "tied: " + ", ".join(c.label for c in d.tied)
        vs = ratio_text(d.ratio.ratio, d.ratio.low, d.ratio.high, d.runner_up.label) if d.ratio else "only mode"
        t.add_row(r["framework"] + (f" @{r['node']}" if r.get("node") else ""), d.top.label, str(r["prompt_tokens"]),
                  str(r["gen_tokens"]), f"{d.top.median:.1f}", verdict, vs, fmt(r["kld_mean"], ".4f"),
                  fmt(r["kld_p99"], ".3f"), fmt(r["same_top_p"], ".3f"), f"{r['peak_rss_bytes'] / 1e6:.0f}", tried)
    return t


def _workload(row: dict) -> tuple:
    from engine.measure.decide import workload_key

    return workload_key(row)

