"""Terminal output: the results table, progress on stderr, rows as CSV/JSONL on stdout."""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Iterable

from rich.console import Console
from rich.table import Table

from engine.cells import Cell
from engine.results import BenchmarkResult, csv_text

stderr = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
# piped output keeps the table readable instead of folding it to 80 columns
stdout = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def _fmt(v: float, spec: str = ".1f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def cell_summaries(rows: Iterable[BenchmarkResult]) -> list[list[BenchmarkResult]]:
    by_cell: dict[str, list[BenchmarkResult]] = {}
    for r in rows:
        by_cell.setdefault(r.cell_id, []).append(r)
    return list(by_cell.values())


def results_table(rows: Iterable[BenchmarkResult], title: str = "") -> Table:
    t = Table(title=title or None, header_style="bold")
    for col, justify in [("framework", "left"), ("prec", "left"), ("dev", "left"), ("prompt", "right"),
                         ("gen", "right"), ("decode tok/s (95% CI)", "right"), ("TTFT ms", "right"),
                         ("prefill tok/s", "right"), ("ITL p50/p99 ms", "right"), ("peak RSS MB", "right"),
                         ("GB/s", "right"), ("roofline", "right"), ("match", "right"), ("status", "left")]:
        t.add_column(col, justify=justify)
    for cell_rows in cell_summaries(rows):
        r = cell_rows[0]
        if r.status != "ok":
            t.add_row(r.framework, r.precision, r.device, str(r.prompt_tokens), str(r.gen_tokens),
                      *["-"] * 8, f"[red]{r.status}[/]: {r.error[:80]}")
            continue
        mean = lambda f, rows=cell_rows: sum(getattr(x, f) for x in rows) / len(rows)  # noqa: E731
        ci = (f" ±{_fmt((r.decode_tps_ci95_high - r.decode_tps_ci95_low) / 2)}"
              if not math.isnan(r.decode_tps_ci95_high) else "")
        match = "-" if r.match_tokens < 0 else f"{r.match_tokens}/{r.gen_tokens}"
        status = "ok" + (f" [yellow]{r.flags}[/]" if r.flags else "")
        t.add_row(r.framework, r.precision, r.device, str(r.prompt_tokens), str(r.gen_tokens),
                  f"{_fmt(r.decode_tps_mean)}{ci}", _fmt(mean("ttft_s") * 1e3), _fmt(mean("prefill_tps"), ".0f"),
                  f"{_fmt(mean('itl_p50_s') * 1e3)}/{_fmt(mean('itl_p99_s') * 1e3)}",
                  _fmt(r.peak_rss_bytes / 1e6, ".0f"), _fmt(mean("achieved_gbps")), _fmt(mean("roofline_frac"), ".2f"),
                  match, status)
    return t


def progress_line(cell: Cell, rows: list[BenchmarkResult], done: int, total: int) -> str:
    r = rows[0]
    what = f"{cell.framework} {r.precision or cell.precision} prompt {r.prompt_tokens} gen {cell.gen_tokens}"
    if r.status != "ok":
        return f"[{done}/{total}] {what}: {r.status}: {r.error[:160]}"
    return f"[{done}/{total}] {what}: {r.decode_tps_mean:.1f} tok/s decode, TTFT {r.ttft_s * 1e3:.0f} ms"


def write_rows(rows: list[BenchmarkResult], fmt: str) -> None:
    if fmt == "jsonl":
        for r in rows:
            sys.stdout.write(json.dumps(r.as_dict()) + "\n")
    elif fmt == "csv":
        sys.stdout.write(csv_text((r.as_dict() for r in rows), BenchmarkResult.csv_columns(), header=True))
    else:
        stdout.print(results_table(rows))


class SweepProgress:
    """Progress on stderr: when it is a terminal, a live bar (current cell, done/total, elapsed,
    ETA) above a table of finished cells; otherwise one line per finished cell."""

    def __init__(self, total: int):
        self.total, self.rows, self.started = total, [], time.monotonic()
        self.live = stderr.is_terminal
        if self.live:
            from rich.console import Group
            from rich.live import Live
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._group = Group
            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn(), console=stderr)
            self.task = self.progress.add_task("starting", total=total)
            self._live = Live(self.progress, console=stderr, refresh_per_second=4)

    def __enter__(self) -> "SweepProgress":
        if self.live:
            self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self._live.stop()

    def start(self, cell: Cell) -> None:
        if self.live:
            precision = "" if cell.precision == "auto" else f" {cell.precision}"
            self.progress.update(self.task, description=f"{cell.framework}{precision} "
                                                        f"prompt {cell.prompt_tokens} gen {cell.gen_tokens}")

    def finish(self, cell: Cell, rows: list[BenchmarkResult], done: int, total: int) -> None:
        self.rows += rows
        if self.live:
            self.progress.update(self.task, completed=done)
            self._live.update(self._group(self.progress, results_table(self.rows)))
            return
        elapsed = time.monotonic() - self.started
        stderr.print(f"{progress_line(cell, rows, done, total)}  "
                     f"[dim]elapsed {elapsed:.0f}s, ETA {elapsed / done * (total - done):.0f}s[/]")
