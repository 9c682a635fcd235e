"""`--modes best`: every mode a framework declares is measured; per framework and workload the
rule of engine.measure.decide flags the fastest mode that passes the fidelity bar `best`, or the
modes it cannot tell apart `tied`, over every row of the results file.

The bar (documented in docs/results-schema.md, `passes` in engine.measure.decide): mean
teacher-forced KL from the reference at most 0.05 nats and top-1 agreement at least 0.9. On the
default model bf16 and 4-bit modes measure 0.0004-0.01 nats and 0.97-1.0, so the bar leaves them
ample room, while a broken kernel or a wrong weight layout measures KL above 1 and fails it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import backends
from engine.errors import UnavailableError
from engine.measure.cell import Cell
from engine.measure.decide import VERDICT_FLAGS, Decision, blank_decision, decide, row_changes
from engine.results.rows import BenchmarkResult
from engine.results.writers import ResultWriter, read_jsonl
from engine.sweep.cells import dedupe, order


def with_modes(cells: list[Cell], spec_of: Callable[[str], object]) -> list[Cell]:
    """Each cell once per mode its framework declares for its model and device; an unavailable
    framework or device keeps the cell as it is (it becomes an `unavailable` row)."""
    out = []
    for c in cells:
        cls = backends.get(c.framework)
        try:
            modes = cls.modes(spec_of(c.model), cls.resolve_device(c.device)) if cls.availability().ok else []
        except UnavailableError:
            modes = []
        out += [replace(c, precision=m.precision, compile=m.compile,
                        options=tuple(sorted({**dict(c.options), **dict(m.options)}.items()))) for m in modes] or [c]
    return order(dedupe(out))


def decide_file(writer: ResultWriter) -> tuple[list[Decision], dict[str, dict]]:
    """Decide over every row of the results file (with --resume, the earlier runs' rows too; each
    node apart) and write the verdicts onto every row of both files. Returns the decisions and
    the per-cell changes, for the rows still in memory (`decided`)."""
    decisions = decide(read_jsonl(writer.jsonl_path))
    changes = row_changes(decisions)
    writer.update_cells(changes, blank_decision(), VERDICT_FLAGS)
    return decisions, changes


def decided(row: BenchmarkResult, changes: dict[str, dict]) -> BenchmarkResult:
    """`row` as `decide_file` rewrote it in the files."""
    change = dict(changes.get(row.cell_id, {}))
    flags = [f for f in row.flags if f not in VERDICT_FLAGS] + list(change.pop("flags", ()))
    return replace(row, **{**blank_decision(), **change}, flags=tuple(flags))
