"""Run cells in child processes so a crash, an OOM kill or a hang costs one row, never the sweep,
and schedule their repeats so drift on a shared host hits every framework alike.

Cells sharing a load key (which includes the batch and positions that size the load) form a
lane: one child loads the model once and measures the lane's cells in order, one cell at a time
(its memory mark is reset per cell). With several lanes and `interleave`, every lane's child
stays loaded and the repeats are taken round-robin, one measuring at a time (A B C A B C ...):
the children start together and import their frameworks side by side, then load their models
and warm up one after another (`prepare_lanes`), all before the first timed repeat, and exit
together after the last; otherwise lanes run one after another. Every cell is prepared (loaded
where it needs a load, warmed up) before its first repeat, on a timeout budget of its own. A
child that dies costs the cell it was in (a `crash`, `oom` or `timeout` row); the lane goes on
in a fresh child.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import psutil

from engine.measure.cell import Cell
from engine.measure.host import HostMonitor
from engine.measure.runner import failure_row, kv_memory_shortfall, positions_needed
from engine.results.rows import BenchmarkResult
from engine.sweep.child import GroupChild, Reply
from engine.sweep.eta import Progress

FREE_MEMORY_SHARE = 0.7  # of the host's available memory that the loaded models may take together
PER_MODEL_OVERHEAD = 300 * 2**20  # a framework's own footprint beside the weights


@dataclass
class Lane:
    """The cells of one load group still to measure, and the child measuring them."""

    pending: list[Cell]
    child: GroupChild | None = None
    spent_s: dict[str, float] = field(default_factory=dict)  # per cell: time its requests took
    monitor: HostMonitor | None = None  # the host around the current cell's timed requests


def run_cells(cells: list[Cell], host_gbps: float, run_id: str, debug: bool = False,
              on_start: Callable[[Cell], None] | None = None, interleave: bool = True,
              on_progress: Callable[[Progress], None] | None = None) -> Iterator[tuple[Cell, list[BenchmarkResult]]]:
    """Yield (cell, rows) for every cell as it completes, each measured in a child process;
    `on_progress` hears when a lane's model has loaded and when each repeat is measured."""
    lanes = [Lane(list(group)) for _, group in itertools.groupby(cells, key=lambda c: c.load_key)]
    schedule, note = plan(lanes, interleave)
    interleaved = schedule == "interleaved"
    # copies: `lanes` stays whole for the close at the end
    active, waiting = (list(lanes), []) if interleaved else (lanes[:1], lanes[1:])
    try:
        if interleaved:
            start_children(lanes, host_gbps, run_id, debug)
            for cell, rows in prepare_lanes(lanes, run_id, on_start, on_progress):
                yield cell, [replace(r, schedule=schedule) for r in rows]
            active = [lane for lane in lanes if lane.pending]
        while active:
            for lane in list(active):
                done = _advance(lane, host_gbps, run_id, debug, on_start, on_progress)
                if done is not None:
                    cell, rows = done
                    extra = {"schedule_note": note} if note else {}
                    yield cell, [replace(r, schedule=schedule, extra={**r.extra, **extra}) for r in rows]
                if not lane.pending:
                    if lane.child is not None and not interleaved:  # interleaved: all exit together at the end
                        lane.child.close()
                    active.remove(lane)
                    if waiting:
                        active.append(waiting.pop(0))
    finally:  # finished, or the consumer stopped early (Ctrl-C), or something broke: leave no child behind
        close_children(lanes)


def start_children(lanes: list[Lane], host_gbps: float, run_id: str, debug: bool) -> None:
    """Start every lane's child at once and wait until each has imported its framework: the
    imports run side by side (tens of seconds of the main job's start-up) and all of them end
    before the first request, so nothing is measured while another child is busy."""
    for lane in lanes:
        lane.child = GroupChild(lane.pending, host_gbps, run_id, debug)
    for lane in lanes:
        lane.child.wait_ready(lane.pending[0].timeout_s)


def prepare_lanes(lanes: list[Lane], run_id: str, on_start: Callable[[Cell], None] | None,
                  on_progress: Callable[[Progress], None] | None) -> Iterator[tuple[Cell, list[BenchmarkResult]]]:
    """Load every lane's first cell and warm it up, one lane at a time, before anything is timed:
    the round-robin of repeats then runs in one stretch, and the ETA knows every lane's pace.
    (Two lanes at a time saved about 30 s of the 436 s main job, but a warm-up beside another
    took up to 15x its time alone, llama.cpp's 11.2 s against 0.7 s, and `load_s`, `warmup_s`
    and `compile_s` are numbers of the rows.) Yields the cells that failed on the way."""
    for lane in lanes:
        if lane.child is not None and lane.pending:
            failed = _start(lane, run_id, on_start, on_progress)
            if failed is not None:
                yield failed


def close_children(lanes: list[Lane]) -> None:
    """End every child left: finished ones exit side by side (every one asked first, then each
    waited for), an unfinished one is killed."""
    alive = [lane for lane in lanes if lane.child is not None]
    for lane in alive:
        if lane.pending:
            lane.child.kill()
        else:
            lane.child.ask_to_exit()
    for lane in alive:
        lane.child.close()


def plan(lanes: list[Lane], interleave: bool) -> tuple[str, str]:
    """`interleaved` when asked for, worth it (several lanes) and every model fits in memory at once."""
    if not interleave or len(lanes) < 2:
        return "sequential", ""
    need = sum(estimated_bytes(lane.pending[0]) for lane in lanes)
    free = psutil.virtual_memory().available * FREE_MEMORY_SHARE
    if need > free:
        return "sequential", (f"not interleaved: {len(lanes)} loaded models need about {need / 1e9:.1f} GB, "
                              f"{free / 1e9:.1f} GB is free to use")
    return "interleaved", ""


def estimated_bytes(cell: Cell) -> int:
    """A loaded model's memory, pessimistically: every parameter as f32, the framework, and f32 KV
    caches for the cell's own batch and positions (none for a batch that will be refused for them)."""
    from engine.model.spec import open_spec

    try:
        spec = open_spec(cell.model)
        positions = positions_needed(spec, cell)
    except Exception:  # an unreadable model or prompt fails in its own child, with its own row
        return PER_MODEL_OVERHEAD
    refused = kv_memory_shortfall(spec, cell, positions)
    kv = 0 if refused else cell.batch_size * positions * spec.config.kv_bytes_per_token(4)
    return spec.n_params * 4 + PER_MODEL_OVERHEAD + kv


def _advance(lane: Lane, host_gbps: float, run_id: str, debug: bool, on_start: Callable[[Cell], None] | None,
             on_progress: Callable[[Progress], None] | None) -> tuple[Cell, list[BenchmarkResult]] | None:
    """One repeat of the lane's current cell (prepared first if it is new); (cell, rows) once the
    cell is complete or failed."""
    cell = lane.pending[0]
    if lane.child is None:
        lane.child = GroupChild(lane.pending, host_gbps, run_id, debug)
    if cell.cell_id not in lane.spent_s:
        failed = _start(lane, run_id, on_start, on_progress)
        if failed is not None:
            return failed
    if lane.monitor is None:
        lane.monitor = HostMonitor(lane.child.proc.pid)
    else:
        lane.monitor.resume()
    reply = lane.child.request(cell, max(cell.timeout_s - lane.spent_s[cell.cell_id], 0.001))
    wall = lane.monitor.pause()
    lane.spent_s[cell.cell_id] += wall
    if on_progress is not None and reply.kind in ("step", "done"):
        on_progress(Progress("repeat", cell, wall, reply.repeat_s, reply.kind == "done"))
    if reply.kind == "step":
        return None
    return _finish(lane, cell, reply, run_id)


def _start(lane: Lane, run_id: str, on_start: Callable[[Cell], None] | None,
           on_progress: Callable[[Progress], None] | None) -> tuple[Cell, list[BenchmarkResult]] | None:
    """Start the lane's current cell and prepare it; its failure's (cell, rows), None when prepared."""
    cell = lane.pending[0]
    _begin(lane, cell, on_start)
    reply = _prepare(lane, on_progress)
    return None if reply.kind == "prepared" else _finish(lane, cell, reply, run_id)


def _prepare(lane: Lane, on_progress: Callable[[Progress], None] | None) -> Reply:
    """The lane's current cell loaded (where it needs a load) and warmed up, within a `timeout_s`
    of its own: a cold compile or kernel search on a slow host leaves the timed repeats and the
    fidelity pass their whole budget (a cold BEAM=2 search took 840 s here)."""
    cell = lane.pending[0]
    heard = on_progress or (lambda p: None)
    reply = lane.child.request(cell, cell.timeout_s,
                               lambda load_s, precision: heard(Progress("loaded", cell, load_s, precision=precision)),
                               prepare=True)
    if reply.kind == "prepared":
        heard(Progress("prepared", cell, reply.warmup_s, repeat_s=reply.repeat_s))
    return reply


def _begin(lane: Lane, cell: Cell, on_start: Callable[[Cell], None] | None) -> None:
    """A cell's start: its time and the memory sampled from here on are its own."""
    lane.spent_s[cell.cell_id] = 0.0
    lane.child.memory.reset()
    if on_start is not None:
        on_start(cell)


def _finish(lane: Lane, cell: Cell, reply: Reply, run_id: str) -> tuple[Cell, list[BenchmarkResult]]:
    """The cell is complete or failed: its rows; a child that died or cannot go on is dropped."""
    lane.pending.pop(0)
    rows = _rows(cell, reply, lane, run_id)
    lane.monitor = None
    if reply.kind in ("died", "timeout") or reply.status == "oom":  # the process is gone or unusable
        lane.child.close()
        lane.child = None
    return cell, rows


def _rows(cell: Cell, reply: Reply, lane: Lane, run_id: str) -> list[BenchmarkResult]:
    if reply.kind != "done":
        status = "timeout" if reply.kind == "timeout" else reply.status
        return [failure_row(cell, status, reply.error, run_id, **reply.fields)]
    host, memory = lane.monitor.state(), lane.child.memory
    return [replace(BenchmarkResult.from_dict(r), sampled_rss_peak_bytes=memory.rss_peak,
                    sampled_uss_peak_bytes=memory.uss_peak, cpu_governor=host.cpu_governor,
                    load_avg_1m=host.load_avg_1m, other_cpu_frac=host.other_cpu_frac).with_flags(
                        ("contended",) if host.contended else ()) for r in reply.rows]
