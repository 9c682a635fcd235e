"""`--modes best`: every mode a framework declares is measured; per framework and workload, the
fastest mode whose fidelity passes the bar is flagged `best`.

The bar (documented in docs/results-schema.md): mean teacher-forced KL from the reference at most
0.05 nats and top-1 agreement at least 0.9. On the default model bf16 and 4-bit modes measure
0.0004-0.01 nats and 0.97-1.0, so the bar leaves them ample room, while a broken kernel or a wrong
weight layout measures KL above 1 and fails it.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import backends
from engine.errors import UnavailableError
from engine.measure.cell import Cell
from engine.results.rows import BenchmarkResult
from engine.sweep.cells import dedupe, order

KL_BAR = 0.05
TOP1_BAR = 0.9


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


def passes(row: BenchmarkResult) -> bool:
    """Fidelity good enough to be chosen; a row with no fidelity measured (--no-check) is not judged."""
    if math.isnan(row.kl_vs_reference):
        return True
    return row.kl_vs_reference <= KL_BAR and row.top1_agreement >= TOP1_BAR


def best_cells(rows: list[BenchmarkResult]) -> set[str]:
    """Per framework and workload, the cell id of the fastest mode that passes the fidelity bar."""
    best: dict[tuple, BenchmarkResult] = {}
    for r in rows:
        if r.status != "ok" or not passes(r):
            continue
        key = (r.framework, r.model, r.device, r.prompt_tokens, r.gen_tokens, r.batch_size, r.threads, tuple(r.prompt_ids))
        if key not in best or r.decode_tps_mean > best[key].decode_tps_mean:
            best[key] = r
    return {r.cell_id for r in best.values()}
