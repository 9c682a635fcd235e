"""A sweep's remaining time, estimated from what it has measured so far.

One child measures at a time (lanes interleaved or one after another), so the time left is the
sum over lanes of what each still has to do: its load if not loaded yet (as long as the loaded
lanes took, on average), each unstarted cell's warm-up (its steady runs plus half of what the
lane's last new cell compiled: a new prompt shape recompiles the prefill but not the decode step),
every remaining repeat at the seconds a repeat took in that cell (or, before its first, the lane's
seconds per generated token times the cell's tokens; an adaptive cell's count from its spread so
far and its bounds: `repeats_wanted`), and the finishing of each cell (fidelity
pass and rows, once one was measured). Every cell is prepared (loaded where it needs it, warmed
up) before its first repeat; an interleaved sweep prepares every lane's first cell before any
repeat, and until a lane's first repeat its pace is the one its warm-up's decode steps showed.
Events in, seconds out; the clock is injected so a test can replay a whole sweep.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from engine.measure.cell import Cell


@dataclass(frozen=True)
class Progress:
    """What a lane reports: `loaded` (its model loaded in `seconds`, at `precision`), `prepared`
    (a cell warmed up, in `seconds`, before its first repeat; `repeat_s`, a repeat as the warm-up's
    steady decode steps predict it, 0 if unknown) or `repeat` (one repeat of `cell` measured: the
    request took `seconds`, of which `repeat_s` the measured generation; `final` when it was the
    cell's last, whose request also ran the fidelity pass and built the rows)."""

    kind: str
    cell: Cell
    seconds: float
    repeat_s: float = 0.0
    final: bool = False
    precision: str = ""


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


@dataclass
class _Lane:
    cells: list[Cell]
    loaded: bool = False
    repeats_done: dict[str, list[float]] = field(default_factory=dict)  # cell id -> request seconds
    finished: set[str] = field(default_factory=set)
    per_token_s: list[float] = field(default_factory=list)  # a repeat's seconds per generated token
    warm_excess_s: list[float] = field(default_factory=list)  # each started cell's warm-up beyond steady runs
    prepared: str = ""  # the cell warmed up last, until its first repeat
    provisional: bool = False  # per_token_s holds only the warm-up's steady pace, no repeat's yet


def repeats_wanted(cell: Cell, done: list[float], repeat_s: float) -> int:
    """The repeats `cell` will end with: its least (and `min_time_s`'s), and for an adaptive cell
    as many as its spread so far needs for the CI target (the CoV of its repeats' seconds stands
    for its tok/s'), within its bounds of repeats and measured time; the time bound alone before
    two repeats show a spread."""
    least = max(cell.repeats, math.ceil(cell.min_time_s / repeat_s) if repeat_s > 0 else 0)
    if cell.max_repeats <= least:
        return least
    most = cell.max_repeats
    if cell.max_time_s and repeat_s > 0:
        most = max(least, min(most, math.ceil(cell.max_time_s / repeat_s)))
    if len(done) < 2:
        return most
    from engine.measure.stats import summarize, t95

    cov = summarize(done).cov
    return next((n for n in range(max(least, len(done)), most) if t95(n - 1) * cov / math.sqrt(n) <= cell.ci_target),
                most)


class SweepEta:
    def __init__(self, cells: list[Cell], clock: Callable[[], float] = time.monotonic):
        self.clock, self.started, self.last_event = clock, clock(), clock()
        self.lanes: dict[tuple, _Lane] = {}
        for c in cells:
            self.lanes.setdefault(c.load_key, _Lane([])).cells.append(c)
        self.load_s: list[float] = []
        self.first_warmup_s: list[float] = []  # a lane's first warm-up: where JIT and compile land
        self.finish_s: list[float] = []
        self.done = 0

    def _lane(self, cell: Cell) -> _Lane:
        """The cell's lane; a cell outside the plan gets one of its own (progress never fails a sweep)."""
        return self.lanes.setdefault(cell.load_key, _Lane([cell]))

    def loaded(self, cell: Cell, load_s: float) -> None:
        self._lane(cell).loaded = True
        self.load_s.append(load_s)
        self.last_event = self.clock()

    def warmed(self, p: Progress) -> None:
        """A cell was loaded (where it needed a load) and warmed up (`p.seconds`) ahead of its repeats."""
        lane = self._lane(p.cell)
        if not lane.warm_excess_s:  # the lane's first warm-up: where its compile lands
            self.first_warmup_s.append(p.seconds)
        lane.prepared = p.cell.cell_id
        lane.warm_excess_s.append(max(0.0, p.seconds - warm_steady_s(p.cell, p.repeat_s)))
        if p.repeat_s > 0 and not lane.per_token_s:  # the warm-up's steady pace, until the lane's first repeat
            lane.per_token_s, lane.provisional = [p.repeat_s / p.cell.gen_tokens], True
        self.last_event = self.clock()

    def measured(self, p: Progress) -> None:
        lane = self._lane(p.cell)
        lane.prepared = ""
        if lane.provisional:
            lane.per_token_s, lane.provisional = [], False
        # a final request also ran the fidelity pass and built the rows: counted apart, once per cell
        lane.repeats_done.setdefault(p.cell.cell_id, []).append(p.repeat_s if p.final else p.seconds)
        lane.per_token_s.append(p.repeat_s / p.cell.gen_tokens)
        if p.final:
            self.finish_s.append(max(0.0, p.seconds - p.repeat_s))
        self.last_event = self.clock()

    def cell_done(self, cell: Cell) -> None:
        """The cell ended (complete or failed): nothing of it is left to do."""
        self._lane(cell).finished.add(cell.cell_id)
        self.done += 1
        self.last_event = self.clock()

    @property
    def all_loaded(self) -> bool:
        return all(lane.loaded or len(lane.finished) == len(lane.cells) for lane in self.lanes.values())

    def remaining_s(self) -> float | None:
        """Seconds left, counting down between events; None before anything was measured."""
        lanes = [self._lane_left(lane) for lane in self.lanes.values()]
        if any(math.isnan(s) for s in lanes):  # nothing measured to go by for some lane
            return self._by_rate()
        return max(0.0, sum(lanes) - (self.clock() - self.last_event))

    def _by_rate(self) -> float | None:
        """With no lane measurements (a cluster reports only finished cells): elapsed per cell."""
        total = sum(len(lane.cells) for lane in self.lanes.values())
        if not self.done:
            return None
        elapsed = self.clock() - self.started
        return max(0.0, elapsed / self.done * (total - self.done) - (self.clock() - self.last_event))

    def _lane_left(self, lane: _Lane) -> float:
        todo = [c for c in lane.cells if c.cell_id not in lane.finished]
        if not todo:
            return 0.0
        per_token = _mean(lane.per_token_s) if lane.per_token_s else _mean(
            [s for other in self.lanes.values() for s in other.per_token_s])
        left = 0.0 if lane.loaded else _mean(self.load_s)
        if not lane.warm_excess_s:  # nothing warmed up yet: its first warm-up pays its compile as others did
            left += _mean(self.first_warmup_s)
        for c in todo:
            done = lane.repeats_done.get(c.cell_id, [])
            repeat = _mean(done) if done else per_token * c.gen_tokens
            wanted = repeats_wanted(c, done, repeat)
            # a later cell's warm-up: steady runs plus half what the lane's last new cell compiled (a new
            # prompt shape recompiles the prefill, not the decode step: tinygrad measured 5.5 s then 2.8 s)
            # (no cell of the lane warmed up yet: its first warm-up is counted above, a later one's unknown)
            warmed = done or c.cell_id == lane.prepared or not lane.warm_excess_s
            warm = 0.0 if warmed else warm_steady_s(c, repeat) + lane.warm_excess_s[-1] / 2
            left += warm + max(0, wanted - len(done)) * repeat + (_mean(self.finish_s) if self.finish_s else 0.0)
        return left


def warm_steady_s(cell: Cell, repeat_s: float) -> float:
    """A cell's warm-ups without their compile: each the share of a repeat its tokens are."""
    return cell.warmup * repeat_s * cell.warmup_tokens / cell.gen_tokens
