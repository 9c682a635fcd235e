"""The child process that measures one load group: `python -m engine.sweep.worker FD`.

Its stdin carries JSON lines: first the job (the group's cells, host bandwidth, run id), then one
command per line: `prepare ID`, "load for this cell (where it needs a load) and warm it up,
measure nothing", then the cell id alone for each repeat, "measure the next repeat of this cell"
(a cell never prepared warms up in its first).
It reports on file descriptor FD, one JSON line per event: `ready` (its framework imported,
before the first request), `start`, `loaded` (the model, with its load_s), `prepared` (warmed
up), `step` (a repeat measured, the cell wants more), `done` (with the cell's rows) or `failed`
(status and error), so whatever a framework prints cannot corrupt the results; `prepared`
carries the warm-up's seconds and a repeat's as its decode steps predict it, `step` and `done`
the repeat's, for the parent's ETA. The
model loads on a cell's first command, sized for that cell's own batch and positions; the next
cells of that shape reuse it. The parent measures one cell of a process at a time, so the memory
mark reset when a cell starts is that cell's.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any, Callable

Emit = Callable[..., None]


def _emitter(fd: int) -> Emit:
    from engine.results.rows import json_default  # light: no framework, no numpy

    out = os.fdopen(fd, "w", buffering=1, encoding="utf-8")

    def emit(event: str, cell_id: str, **data: Any) -> None:
        out.write(json.dumps({"event": event, "cell_id": cell_id, **data}, default=json_default) + "\n")
        out.flush()
    return emit


PREPARE = "prepare "  # the command prefix: load and warm up only

def failure(e: Exception, debug: bool) -> tuple[str, str]:
    """The status and error of a cell that raised `e` (not a MemoryError: the caller ends on that)."""
    from engine.errors import BenchError, OutOfMemoryError, UnavailableError

    if isinstance(e, OutOfMemoryError):  # refused before allocating: the process is fine
        return "oom", str(e)
    if isinstance(e, UnavailableError):
        return "unavailable", str(e)
    if isinstance(e, BenchError):
        return "error", str(e)
    # a framework's own exception: one row, the sweep goes on
    detail = traceback.format_exc(limit=-3) if debug else ""
    return "error", f"{type(e).__name__}: {e}".strip() + detail


class Measuring:
    """The child's state: its group's cells, the model loaded for the current shape, the cells
    being measured and this process's memory mark."""

    def __init__(self, job: dict[str, Any], emit: Emit):
        from engine.measure.cell import Cell
        from engine.measure.memory import PeakRss

        self.job, self.emit = job, emit
        self.cells = {c["cell_id"]: Cell.from_json(c["cell"]) for c in job["cells"]}
        self.spec = self.loaded = None
        self.running: dict[str, Any] = {}  # cell id -> its CellRun
        self.peak = PeakRss()

    def command(self, line: str) -> bool:
        """Prepare a cell or measure its next repeat; False when this process must end (heap unusable)."""
        prepare = line.startswith(PREPARE)
        cell_id = line.removeprefix(PREPARE)
        self.emit("start", cell_id)
        try:
            run = self.running.get(cell_id) or self._start(self.cells[cell_id])
            self.running[cell_id] = run
            if prepare:
                self.emit("prepared", cell_id, warmup_s=run.warm_up(), repeat_s=run.steady_s)
            elif run.step():
                rows = [r.as_dict() for r in self.running.pop(cell_id).rows()]
                self.emit("done", cell_id, rows=rows, repeat_s=run.runs[-1].total_ns / 1e9)
            else:
                self.emit("step", cell_id, repeat_s=run.runs[-1].total_ns / 1e9)
        except MemoryError:
            self.emit("failed", cell_id, status="oom", error="out of memory (MemoryError)")
            return False  # let the parent start a fresh process
        except Exception as e:
            self.running.pop(cell_id, None)
            status, error = failure(e, self.job.get("debug", False))
            self.emit("failed", cell_id, status=status, error=error, fields=getattr(e, "fields", {}))
        return True

    def _start(self, cell):
        """A cell's first command: the memory mark reset, a load of its shape, its prompts."""
        import backends
        from engine.errors import OutOfMemoryError
        from engine.measure.runner import CellRun, cell_prompts, kv_memory_shortfall, positions_needed
        from engine.model.spec import ModelSpec

        self.peak.reset()  # from here: this cell's load (when it pays one), warm-up and timed runs
        backends.get(cell.framework).check_batch_size(cell.batch_size)
        self.spec = self.spec or ModelSpec.open(cell.model)
        positions = positions_needed(self.spec, cell)
        short = kv_memory_shortfall(self.spec, cell, positions)
        if short:
            raise OutOfMemoryError(short)
        self._load_for(cell, positions)
        return CellRun(cell, self.loaded, cell_prompts(self.spec, cell), self.job["host_gbps"], self.job["run_id"],
                       self.peak)

    def _load_for(self, cell, positions: int) -> None:
        """A model loaded for exactly this cell's sequences and positions (reused when it is)."""
        from engine.measure.runner import LoadedModel

        loaded = self.loaded
        if loaded is not None and not loaded.released and loaded.load_shape == (cell.batch_size, positions):
            return
        self.close()
        self.loaded = LoadedModel(cell, self.spec, positions, cell.batch_size)
        self.emit("loaded", cell.cell_id, load_s=self.loaded.load_s, precision=self.loaded.precision)  # for the progress

    def close(self) -> None:
        if self.loaded is not None:
            self.loaded.close()
            self.loaded = None


def _import_framework(job: dict[str, Any]) -> None:
    """Import the lane's framework before the first request, so a parent that starts every lane's
    child at once pays the imports side by side, before anything is measured (engine.sweep.isolation).
    A framework that fails to import fails later, in its cell, with its own row."""
    import importlib

    import backends
    from engine.measure import runner  # noqa: F401  (the measuring code, imported once for every framework)

    try:
        for needed in backends.get(job["cells"][0]["cell"]["framework"]).requires:
            importlib.import_module(needed.module)
    except Exception:
        pass


def main(argv: list[str]) -> int:
    emit = _emitter(int(argv[1]))
    job = json.loads(sys.stdin.readline())
    # the cell's memory limit is set once its first load is admitted (engine.measure.fit), before
    # the load: framework imports count against it
    import scipy.special  # noqa: F401  (statistics after the timed runs: loaded first, the same for every framework)

    _import_framework(job)
    emit("ready", "")
    measuring = Measuring(job, emit)
    for line in sys.stdin:
        if not measuring.command(line.strip()):
            return 0
    measuring.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
