"""Terminal output: consoles for stdout and stderr, and sweep progress on stderr."""

from __future__ import annotations

import math
import sys
import time

from rich.console import Console

from engine.measure.cell import Cell
from engine.results.rows import BenchmarkResult
from engine.results.writers import results_table

stderr = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
# piped output keeps the table readable instead of folding it to 80 columns
stdout = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def workload(cell: Cell) -> str:
    batch = f" batch {cell.batch_size}" if cell.batch_size > 1 else ""
    return f"prompt {cell.prompt_tokens} gen {cell.gen_tokens}{batch}"


def progress_line(cell: Cell, rows: list[BenchmarkResult], done: int, total: int) -> str:
    r = rows[0]
    what = f"{cell.framework} {r.precision or cell.precision} {workload(cell)}"
    if r.node:
        what += f" on {r.node}"
    if r.status != "ok":
        return f"[{done}/{total}] {what}: {r.status}: {r.error[:160]}"
    return f"[{done}/{total}] {what}: {r.decode_tps_mean:.1f} tok/s decode, TTFT {r.ttft_s * 1e3:.0f} ms"


class SweepProgress:
    """Progress on stderr: when it is a terminal, a live bar (current cell, done/total, elapsed,
    ETA) above a table of finished cells; otherwise one line per finished cell."""

    def __init__(self, total: int):
        self.total, self.rows, self.started = total, [], time.monotonic()
        self.running: dict[str, str] = {}  # node -> what runs there
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

    def start(self, cell: Cell, node: str = "") -> None:
        """`cell` began (on cluster `node`); several run at once on a cluster."""
        if self.live:
            precision = "" if cell.precision == "auto" else f" {cell.precision}"
            where = f" on {node}" if node else ""
            self.running[node] = f"{cell.framework}{precision} {workload(cell)}{where}"
            self.progress.update(self.task, description=" | ".join(self.running.values()))

    def finish(self, cell: Cell, rows: list[BenchmarkResult], done: int, total: int) -> None:
        self.rows += rows
        if self.live:
            self.progress.update(self.task, completed=done)
            self._live.update(self._group(self.progress, results_table(self.rows)))
            return
        elapsed = time.monotonic() - self.started
        stderr.print(f"{progress_line(cell, rows, done, total)}  "
                     f"[dim]elapsed {elapsed:.0f}s, ETA {elapsed / done * (total - done):.0f}s[/]")


def comparison_table(rows, metric: str):
    """`bench compare`'s verdicts, one line per matched cell."""
    from rich.table import Table

    t = Table(title=f"{metric}: candidate / baseline", header_style="bold")
    for c in ("cell", "ratio", "95% CI", "p (Welch)", "verdict"):
        t.add_column(c)
    for r in rows:
        verdict = "[red]REGRESSION[/]" if r.regressed else "[green]improved[/]" if r.improved else "same"
        t.add_row(r.label, f"{r.ratio:.3f}", f"{r.ci_low:.3f}-{r.ci_high:.3f}" if not math.isnan(r.ci_low) else "-",
                  f"{r.p_value:.3g}" if not math.isnan(r.p_value) else "-", verdict)
    return t


def best_table(rows: list[BenchmarkResult]):
    """`--modes best`: one line per framework and workload, its chosen mode beside what it gives up."""
    from rich.table import Table

    t = Table(title="best mode per framework (fastest that passes the fidelity bar)", header_style="bold")
    for col in ("framework", "mode", "prompt", "gen", "decode tok/s", "KLD nats", "KLD p99", "same top", "peak RSS MB",
                "modes tried"):
        t.add_column(col, justify="left" if col in ("framework", "mode") else "right")
    chosen = [r for r in rows if "best" in r.flags and r.repeat == 0]
    for r in sorted(chosen, key=lambda r: -r.decode_tps_mean):
        tried = len({x.cell_id for x in rows if x.framework == r.framework and x.prompt_ids == r.prompt_ids})
        mode = r.precision + (" compiled" if r.optimization_level == "compile" else "") + "".join(
            f" {k}={v}" for k, v in sorted(r.options.items()))
        t.add_row(r.framework, mode, str(r.prompt_tokens), str(r.gen_tokens), f"{r.decode_tps_mean:.1f}",
                  f"{r.kld_mean:.4f}", f"{r.kld_p99:.3f}", f"{r.same_top_p:.3f}", f"{r.peak_rss_bytes / 1e6:.0f}",
                  str(tried))
    return t
