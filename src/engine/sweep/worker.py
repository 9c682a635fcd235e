"""The child process that measures cells: `python -m engine.sweep.worker FD` with a JSON job on stdin.

It reports on file descriptor FD, one JSON line per event ({"event": "start"|"done"|"failed"}),
so whatever a framework prints to stdout or stderr cannot corrupt the results. Cells arrive in
groups sharing a load key: the model loads once for the group.
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


def main(argv: list[str]) -> int:
    from engine.results.rows import json_default  # light: no framework, no numpy

    out = os.fdopen(int(argv[1]), "w", buffering=1, encoding="utf-8")
    job = json.loads(sys.stdin.read())

    def emit(event: str, cell_id: str, **data: Any) -> None:
        out.write(json.dumps({"event": event, "cell_id": cell_id, **data}, default=json_default) + "\n")
        out.flush()

    _limit_memory(job["cells"][0].get("memory_limit_mb", 0))
    # imported after the limit is set, so framework imports count against it
    from engine.measure.cell import Cell
    from engine.errors import BenchError, UnavailableError
    from engine.model.spec import ModelSpec
    from engine.measure.runner import LoadedModel, measure, needed_seq_len

    cells = [Cell.from_json(c) for c in job["cells"]]
    loaded = None
    for cell in cells:
        emit("start", cell.cell_id)
        try:
            if loaded is None:
                spec = ModelSpec.open(cell.model)
                max_seq = max(needed_seq_len(spec, c)[1] for c in cells)
                loaded = LoadedModel(cell, spec, max_seq)
            prompt, _ = needed_seq_len(loaded.spec, cell)
            rows = measure(cell, loaded, prompt, job["host_gbps"], job["run_id"])
            emit("done", cell.cell_id, rows=[r.as_dict() for r in rows])
        except MemoryError:
            emit("failed", cell.cell_id, status="oom", error="out of memory (MemoryError)")
            return 0  # the heap may be unusable: let the parent start a fresh process
        except UnavailableError as e:
            emit("failed", cell.cell_id, status="unavailable", error=str(e))
        except BenchError as e:
            emit("failed", cell.cell_id, status="error", error=str(e))
        except Exception as e:  # a framework's own exception: one row, the sweep goes on
            detail = traceback.format_exc(limit=-3) if job.get("debug") else ""
            emit("failed", cell.cell_id, status="error", error=f"{type(e).__name__}: {e}".strip() + detail)
    if loaded is not None:
        loaded.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
