"""The child process that measures one load group: `python -m engine.sweep.worker FD`.

Its stdin carries JSON lines: first the job (the group's cells, host bandwidth, run id), then one
cell id per line, each meaning "measure the next repeat of this cell" (the first also warms up).
It reports on file descriptor FD, one JSON line per event: `start`, `loaded` (the model, with
its load_s), `step` (a repeat measured, the cell wants more), `done` (with the cell's rows) or
`failed` (status and error), so whatever a framework prints cannot corrupt the results; `step`
and `done` carry the repeat's seconds and the cell's warm-up seconds, for the parent's ETA. The
model loads once, on the first command.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import traceback
from typing import Any


def _limit_memory(mb: int) -> None:
    if mb:
        limit = mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _timing(run) -> dict[str, float]:
    """What the request just measured: its repeat, and the warm-up a cell's first request ran."""
    return {"repeat_s": run.runs[-1].total_ns / 1e9, "warmup_s": sum(run.warm) if len(run.runs) == 1 else 0.0}


def main(argv: list[str]) -> int:
    from engine.results.rows import json_default  # light: no framework, no numpy

    out = os.fdopen(int(argv[1]), "w", buffering=1, encoding="utf-8")
    job = json.loads(sys.stdin.readline())

    def emit(event: str, cell_id: str, **data: Any) -> None:
        out.write(json.dumps({"event": event, "cell_id": cell_id, **data}, default=json_default) + "\n")
        out.flush()

    _limit_memory(job["cells"][0]["cell"].get("memory_limit_mb", 0))
    # imported after the limit is set, so framework imports count against it
    import scipy.special  # noqa: F401  (statistics after the timed runs: loaded first, the same for every framework)

    import backends
    from engine.errors import BenchError, OutOfMemoryError, UnavailableError
    from engine.measure.cell import Cell
    from engine.measure.runner import CellRun, LoadedModel, cell_prompts, kv_memory_shortfall, positions_needed
    from engine.model.spec import ModelSpec

    cells = {c["cell_id"]: Cell.from_json(c["cell"]) for c in job["cells"]}
    spec, loaded, running, max_seq = None, None, {}, 0
    for line in sys.stdin:
        cell_id = line.strip()
        cell = cells[cell_id]
        emit("start", cell_id)
        try:
            if cell_id not in running:
                backends.get(cell.framework).check_batch_size(cell.batch_size)
                if spec is None:
                    spec = ModelSpec.open(cell.model)
                    max_seq = max(positions_needed(spec, c) for c in cells.values())
                short = kv_memory_shortfall(spec, cell, max_seq)
                if short:
                    raise OutOfMemoryError(short)
                if loaded is None:  # KV caches for the largest batch of the group that fits
                    max_batch = max(c.batch_size for c in cells.values() if not kv_memory_shortfall(spec, c, max_seq))
                    loaded = LoadedModel(cell, spec, max_seq, max_batch)
                    emit("loaded", cell_id, load_s=loaded.load_s, precision=loaded.precision)  # for the progress
                prompts = cell_prompts(spec, cell)
                running[cell_id] = CellRun(cell, loaded, prompts, job["host_gbps"], job["run_id"])
            if running[cell_id].step():
                run = running.pop(cell_id)
                emit("done", cell_id, rows=[r.as_dict() for r in run.rows()], **_timing(run))
            else:
                emit("step", cell_id, **_timing(running[cell_id]))
        except MemoryError:
            emit("failed", cell_id, status="oom", error="out of memory (MemoryError)")
            return 0  # the heap may be unusable: let the parent start a fresh process
        except OutOfMemoryError as e:  # refused before allocating: the process is fine
            running.pop(cell_id, None)
            emit("failed", cell_id, status="oom", error=str(e))
        except UnavailableError as e:
            running.pop(cell_id, None)
            emit("failed", cell_id, status="unavailable", error=str(e))
        except BenchError as e:
            running.pop(cell_id, None)
            emit("failed", cell_id, status="error", error=str(e))
        except Exception as e:  # a framework's own exception: one row, the sweep goes on
            running.pop(cell_id, None)
            detail = traceback.format_exc(limit=-3) if job.get("debug") else ""
            emit("failed", cell_id, status="error", error=f"{type(e).__name__}: {e}".strip() + detail)
    if loaded is not None:
        loaded.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
