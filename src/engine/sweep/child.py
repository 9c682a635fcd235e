"""A measuring child process for one load group, driven a repeat at a time.

The child (engine.sweep.worker) loads the group's model once and answers each request ("the next
repeat of cell X") on a dedicated pipe. The parent samples the child's memory while it waits, so
nothing but the measured loop runs inside the child, and kills the child's whole process group on
a timeout, on close, or when the harness stops.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import backends
from engine.measure.cell import Cell
from engine.measure.memory import ProcessSampler
from engine.parent_death import PREEXEC
from engine.sweep.worker import PREPARE
from engine.paths import compile_cache_dir

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
               "NUMEXPR_NUM_THREADS")
STDERR_TAIL = 600
SAMPLE_INTERVAL_S = 0.05  # the parent's RSS/USS sampling period of the measuring child
EXIT_GRACE_S = 60


def child_env(cell: Cell) -> dict[str, str]:
    env = dict(os.environ)
    env.update({v: str(cell.resolved_threads) for v in THREAD_VARS})
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    env.update(compile_cache_env(cell.framework))
    return env


def compile_cache_env(framework: str) -> dict[str, str]:
    """The framework's compile caches under the project's cache directory, so a later run (a fresh
    process, a reboot) reads back what an earlier one compiled, and BENCH_CACHE_DIR keeps a test's
    compiles out of the user's caches."""
    root = compile_cache_dir()
    return {var: str(root / where) for var, where in backends.get(framework).compile_caches.items()}


@dataclass
class Reply:
    """What a request came to: `prepared` (loaded and warmed up), `step` (measured, wants more),
    `done` (rows), `failed` (the worker caught it), `died` (the process ended; status from its
    exit) or `timeout`."""

    kind: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    status: str = ""
    error: str = ""
    repeat_s: float = 0.0  # the measured generation of this request (step, done)
    warmup_s: float = 0.0  # the warm-up it ran (a cell's prepare)
    fields: dict[str, Any] = field(default_factory=dict)  # row columns a failure fills (a refused load's memory)


class GroupChild:
    def __init__(self, cells: list[Cell], host_gbps: float, run_id: str, debug: bool):
        job = {"cells": [{"cell_id": c.cell_id, "cell": c.to_json()} for c in cells], "host_gbps": host_gbps,
               "run_id": run_id, "debug": debug}
        self._read_fd, write_fd = os.pipe()
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.sweep.worker", str(write_fd)],
                                     stdin=subprocess.PIPE, stdout=self._log, stderr=self._log, pass_fds=(write_fd,),
                                     env=child_env(cells[0]), start_new_session=True, preexec_fn=PREEXEC)
        os.close(write_fd)
        self.memory = ProcessSampler(self.proc.pid)
        self._buf = b""
        self._closed = False
        self._send(json.dumps(job))

    def _send(self, line: str) -> bool:
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def request(self, cell: Cell, timeout_s: float, on_loaded: Callable[[float, str], None] | None = None,
                prepare: bool = False) -> Reply:
        """Ask for the next repeat of `cell` (or, `prepare`, for its load and warm-up alone: a
        `prepared` reply); wait for its answer at most `timeout_s`. The child loads its model
        within its first request: `on_loaded(load_s, precision)` hears of it then."""
        if not self._send(PREPARE + cell.cell_id if prepare else cell.cell_id):
            return self._died()
        deadline = time.monotonic() + timeout_s
        while True:
            msg = self._next_message(deadline)
            if msg is None:
                return self._died()
            if msg == "timeout":
                self.kill()
                return Reply("timeout", error=f"no result after {cell.timeout_s:g} s; killed")
            if msg["event"] in ("ready", "start"):
                continue
            if msg["event"] == "loaded":
                if on_loaded is not None:
                    on_loaded(msg["load_s"], msg.get("precision", ""))
                continue
            if msg["event"] == "failed":
                return Reply("failed", status=msg["status"], error=msg["error"], fields=msg.get("fields", {}))
            return Reply(msg["event"], rows=msg.get("rows", []), repeat_s=msg.get("repeat_s", 0.0),
                         warmup_s=msg.get("warmup_s", 0.0))

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until the child has imported its framework (its `ready`), at most `timeout_s`; a
        child that died or hung on the way is left for its first request to report."""
        deadline = time.monotonic() + timeout_s
        while True:
            msg = self._next_message(deadline)
            if not isinstance(msg, dict) or msg["event"] == "ready":
                return

    def ask_to_exit(self) -> None:
        """Close the child's stdin: it ends its loop and exits; `close` then waits for it."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def _next_message(self, deadline: float) -> dict | str | None:
        while b"\n" not in self._buf:
            wait = deadline - time.monotonic()
            if wait <= 0:
                return "timeout"
            ready, _, _ = select.select([self._read_fd], [], [], min(wait, SAMPLE_INTERVAL_S))
            self.memory.sample()
            if ready:
                chunk = os.read(self._read_fd, 1 << 20)
                if not chunk:
                    return None  # the child closed its end: it is exiting
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def _died(self) -> Reply:
        try:
            self.proc.wait(timeout=EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            self.kill()
        status, error = classify_exit(self.proc.returncode, self._tail())
        self.close()
        return Reply("died", status=status, error=error)

    def close(self) -> None:
        """End the child: stdin closed so it exits on its own; killed if it hangs on the way out."""
        if self._closed:
            return
        self._closed = True
        self.ask_to_exit()
        try:
            self.proc.wait(timeout=EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            self.kill()
        self.kill()  # whatever the child left in its process group
        os.close(self._read_fd)
        self._log.close()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()

    def _tail(self) -> str:
        try:
            self._log.seek(0)
            text = self._log.read().decode("utf-8", "replace").strip()
        except ValueError:  # already closed
            return ""
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return " | ".join(lines)[-STDERR_TAIL:] if lines else ""


def classify_exit(returncode: int, stderr_tail: str) -> tuple[str, str]:
    if returncode < 0:
        sig = signal.Signals(-returncode).name
        if sig == "SIGKILL":  # not ours (timeouts are handled apart): the kernel's OOM killer
            return "oom", f"killed by SIGKILL (out of memory?) {stderr_tail}".strip()
        return "crash", f"killed by {sig} {stderr_tail}".strip()
    return "crash", f"child exited with code {returncode} {stderr_tail}".strip()
