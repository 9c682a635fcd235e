"""Run cells in child processes so a crash, an OOM kill or a hang costs one row, never the sweep.

Cells sharing a load key go to one child (the model loads once). The child reports each cell on a
pipe; the parent enforces a per-cell timeout. If the child dies, the cell it was in gets a
`crash`, `oom` or `timeout` row and the rest of the group continues in a fresh child.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator

from dataclasses import replace

from engine.measure.cell import Cell
from engine.measure.memory import ProcessSampler
from engine.measure.runner import failure_row
from engine.results.rows import BenchmarkResult

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
               "NUMEXPR_NUM_THREADS")
STDERR_TAIL = 600
SAMPLE_INTERVAL_S = 0.05  # the parent's RSS/USS sampling period of the measuring child


def child_env(cell: Cell) -> dict[str, str]:
    env = dict(os.environ)
    if cell.threads:
        env.update({v: str(cell.threads) for v in THREAD_VARS})
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    return env


def run_cells(cells: list[Cell], host_gbps: float, run_id: str, debug: bool = False,
              on_start: Callable[[Cell], None] | None = None) -> Iterator[tuple[Cell, list[BenchmarkResult]]]:
    """Yield (cell, rows) for every cell, in order, each measured in a child process."""
    for _, group in itertools.groupby(cells, key=lambda c: c.load_key):
        pending = list(group)
        while pending:
            for cell, rows in _run_child(list(pending), host_gbps, run_id, debug, on_start):
                pending.remove(cell)
                yield cell, rows


def _run_child(cells: list[Cell], host_gbps: float, run_id: str, debug: bool,
               on_start: Callable[[Cell], None] | None) -> Iterator[tuple[Cell, list[BenchmarkResult]]]:
    by_id = {c.cell_id: c for c in cells}
    job = json.dumps({"cells": [c.to_json() for c in cells], "host_gbps": host_gbps, "run_id": run_id, "debug": debug})
    read_fd, write_fd = os.pipe()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "engine.sweep.worker", str(write_fd)], stdin=subprocess.PIPE,
                            stdout=log, stderr=log, pass_fds=(write_fd,), env=child_env(cells[0]),
                            start_new_session=True)
    os.close(write_fd)
    memory = ProcessSampler(proc.pid)
    try:
        proc.stdin.write(job.encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    current: Cell | None = None
    started = time.monotonic()  # of the current cell, or since the last event between cells
    buf = b""
    timed_out = eof = False
    reported: set[str] = set()
    try:
        while True:
            wait = (current or cells[0]).timeout_s - (time.monotonic() - started)
            if wait <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([read_fd], [], [], min(wait, SAMPLE_INTERVAL_S))
            memory.sample()
            if not ready:
                continue
            chunk = os.read(read_fd, 1 << 20)
            if not chunk:
                eof = True  # the child closed its end: it is exiting
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                msg = json.loads(line)
                cell = by_id[msg["cell_id"]]
                started = time.monotonic()
                if msg["event"] == "start":
                    current = cell
                    memory.reset()
                    if on_start is not None:
                        on_start(cell)
                    continue
                current = None
                reported.add(cell.cell_id)
                if msg["event"] == "done":
                    yield cell, [replace(BenchmarkResult.from_dict(r), sampled_rss_peak_bytes=memory.rss_peak,
                                         sampled_uss_peak_bytes=memory.uss_peak) for r in msg["rows"]]
                else:
                    yield cell, [failure_row(cell, msg["status"], msg["error"], run_id)]
    finally:
        os.close(read_fd)
        if not eof:  # timed out, or the consumer stopped early (Ctrl-C): leave no orphan
            _kill(proc)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # hung while exiting
            _kill(proc)
            proc.wait()
    unreported = [c for c in cells if c.cell_id not in reported]
    if current is None and (not unreported or (proc.returncode == 0 and reported)):
        return  # every cell reported (a crash at teardown costs nothing), or a clean early exit to retry
    victim = current or unreported[0]
    if timed_out:
        yield victim, [failure_row(victim, "timeout", f"no result after {victim.timeout_s:g} s; killed", run_id)]
        return
    status, error = classify_exit(proc.returncode, _tail(log))
    yield victim, [failure_row(victim, status, error, run_id)]


def classify_exit(returncode: int, stderr_tail: str) -> tuple[str, str]:
    if returncode < 0:
        sig = signal.Signals(-returncode).name
        if sig == "SIGKILL":  # not ours (timeouts are handled above): the kernel's OOM killer
            return "oom", f"killed by SIGKILL (out of memory?) {stderr_tail}".strip()
        return "crash", f"killed by {sig} {stderr_tail}".strip()
    return "crash", f"child exited with code {returncode} {stderr_tail}".strip()


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(log) -> str:
    log.seek(0)
    text = log.read().decode("utf-8", "replace").strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines)[-STDERR_TAIL:] if lines else ""
