"""`--find-max`: the highest load level at which at least `fraction` of a level's requests meet the
SLO. Doubling from the first level until one fails (or the limit), then bisection between the
last level that met it and the first that did not: integer concurrency, or a rate bisected until
the bracket is within `rate_precision` of its top."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from engine.errors import InputError


@dataclass(frozen=True)
class FindMax:
    profile: str = "concurrency"  # or rate
    start: float = 1.0
    limit: float = 64.0  # the highest level tried
    fraction: float = 0.9  # of a level's requests (failed and unsent included) that must meet the SLO
    rate_precision: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise InputError(f"--slo-fraction must be in (0, 1], got {self.fraction:g}")
        if not 0 < self.start <= self.limit:
            raise InputError(f"--find-max needs 0 < first level <= --find-max-limit ({self.start:g}, {self.limit:g})")


@dataclass
class Search:
    best: float | None = None  # the highest level that met the SLO
    tried: list[tuple[float, bool]] = field(default_factory=list)  # (level, met) in the order run


def find_max(spec: FindMax, meets: Callable[[float], bool | None]) -> Search:
    """Run `meets(level)` on the levels the search picks; it returns None when the level could not
    run at all (the server died), which ends the search."""
    s = Search()

    def attempt(level: float) -> bool | None:
        ok = meets(level)
        if ok is not None:
            s.tried.append((level, ok))
            if ok and (s.best is None or level > s.best):
                s.best = level
        return ok

    level, failed = spec.start, None
    while True:
        ok = attempt(level)
        if ok is None:
            return s
        if not ok:
            failed = level
            break
        if level >= spec.limit:
            return s
        level = min(level * 2, spec.limit)
    low = s.best
    while low is not None and not _close(low, failed, spec):
        mid = (low + failed) // 2 if spec.profile == "concurrency" else (low + failed) / 2
        ok = attempt(mid)
        if ok is None:
            return s
        low, failed = (mid, failed) if ok else (low, mid)
    return s


def _close(low: float, high: float, spec: FindMax) -> bool:
    if spec.profile == "concurrency":
        return high - low <= 1
    return high - low <= spec.rate_precision * high
