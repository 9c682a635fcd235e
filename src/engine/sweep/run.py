"""A sweep: cells run one child process per load group, rows appended as each cell finishes,
greedy tokens checked against the reference backend, progress on stderr."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import backends
from engine.measure.cell import Cell
from engine.sweep.cells import order
from engine.sweep.eta import Progress
from engine.sweep.isolation import run_cells
from engine.results.rows import BenchmarkResult
from engine.results.writers import ResultWriter
from engine.measure.runner import with_reference

# runs cells somewhere and yields (cell, rows) as each ends: isolation.run_cells (children on this
# host) or a cluster executor (engine.sweep.ray_executor), same signature
Executor = Callable[..., Iterator[tuple[Cell, list[BenchmarkResult]]]]


@dataclass
class SweepOutcome:
    rows: list[BenchmarkResult] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    skipped: int = 0

    @property
    def failed(self) -> int:
        """Cells that ran and failed; `unavailable` (framework or device not on this host) is not a failure."""
        return sum(n for s, n in self.statuses.items() if s not in ("ok", "unavailable"))


class ReferenceTokens:
    """The reference's greedy tokens for each sequence of a sweep's cells, read from the one cache
    (engine.measure.reference). Before the sweep, one reference cell runs in a child for every
    workload whose answers are not cached: its runs save the speed prompts' tokens and its fidelity
    pass the corpus distributions and the text prompt's tokens. A batch is checked sequence by
    sequence against the reference run on that prompt alone."""

    def __init__(self, host_gbps: float, run_id: str, executor: Executor = run_cells):
        self.host_gbps, self.run_id, self.executor = host_gbps, run_id, executor
        self.name = backends.reference().name

    @staticmethod
    def key(cell: Cell) -> tuple:
        """What one reference run answers for: the model, the prompts' kind and lengths, the first seed."""
        return (cell.model, cell.prompt_tokens, cell.prompt_text, cell.gen_tokens, cell.seed)

    def prefetch(self, cells: list[Cell]) -> None:
        """Run the reference for every cell whose answers are missing. Done before the sweep, never
        while a measured child runs, so nothing competes for cores. Cells that differ only in batch
        size share one reference run at the largest batch: its sequence b is the reference for
        sequence b of each (the reference's batched tokens equal its unbatched ones:
        tests/test_batch.py). A batch whose KV caches cannot fit gets none: it will not run."""
        missing: dict[tuple, Cell] = {}
        for c in cells:
            if self.ready(c) is not False:
                continue
            key = self.key(c)
            if key not in missing or missing[key].batch_size < c.batch_size:
                missing[key] = replace(c, framework=self.name, precision="auto", device="auto", repeats=1,
                                       max_repeats=0, warmup=0, min_time_s=0.0, compile=False, options=(),
                                       threads=0, memory_limit_mb=0)
        # grouped by load key: references of one shape share a child and a load
        for _ in self.executor(order(list(missing.values())), self.host_gbps, self.run_id):
            pass

    def ready(self, cell: Cell) -> bool | None:
        """Whether every answer `cell` is checked against is cached; None when the cell cannot run
        (a bad model or prompt, a batch that cannot fit: it fails in its own cell, with its own row)."""
        from engine.measure import corpus, reference
        from engine.measure.runner import kv_memory_shortfall, positions_needed
        from engine.model.spec import open_spec

        try:
            spec = open_spec(cell.model)
            if kv_memory_shortfall(spec, cell, positions_needed(spec, cell)):
                return None
            return (self.get(cell) is not None and reference.distributions_file(cell.model).exists()
                    and reference.greedy_file(cell.model, corpus.text_prompt(spec), cell.gen_tokens).exists())
        except Exception:
            return None

    def get(self, cell: Cell) -> list[list[int]] | None:
        """The reference's tokens for each sequence of `cell`; None when one is missing."""
        from engine.measure import reference
        from engine.measure.runner import cell_prompts
        from engine.model.spec import open_spec

        refs = [reference.greedy_tokens(cell.model, p, cell.gen_tokens)
                for p in cell_prompts(open_spec(cell.model), cell)]
        return None if any(r is None for r in refs) else refs


def run_sweep(cells: list[Cell], writer: ResultWriter, host_gbps: float, run_id: str, *, resume: bool = False,
              check_reference: bool = True, delay_s: float = 0.0, debug: bool = False, interleave: bool = True,
              on_cell: Callable[[Cell, list[BenchmarkResult], int, int], None] | None = None,
              on_start: Callable[[Cell], None] | None = None, executor: Executor = run_cells,
              on_plan: Callable[[list[Cell]], None] | None = None,
              on_progress: Callable[[Progress], None] | None = None) -> SweepOutcome:
    """`on_plan` hears the cells left to measure (after --resume), `on_progress` every load and
    repeat the executor reports (a cluster's reports only finished cells), `on_cell` each cell."""
    outcome = SweepOutcome()
    done = writer.completed_cells() if resume else set()
    todo = [c for c in cells if c.cell_id not in done]
    outcome.skipped = len(cells) - len(todo)
    if on_plan is not None:
        on_plan(todo)
    reference = ReferenceTokens(host_gbps, run_id, executor)
    if check_reference:
        reference.prefetch(todo)
    for i, (cell, rows) in enumerate(executor(todo, host_gbps, run_id, debug, on_start, interleave,
                                              on_progress=on_progress)):
        if check_reference and rows[0].status == "ok":
            ref = reference.get(cell)
            if ref is not None:
                rows = with_reference(rows, ref)
        writer.write(rows)
        outcome.rows.extend(rows)
        outcome.statuses[rows[0].status] += 1
        if on_cell is not None:
            on_cell(cell, rows, i + 1, len(todo))
        if delay_s and i + 1 < len(todo):
            time.sleep(delay_s)
    return outcome
