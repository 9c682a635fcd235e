"""Load profiles: closed-loop concurrency levels and open-loop Poisson arrivals, each for a
number of requests or a duration, after warm-up requests that are not measured."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from engine.errors import InputError
from engine.serve.client import RequestRecord, connector, stream_completion


@dataclass(frozen=True)
class Level:
    profile: str  # concurrency (closed loop) or rate (Poisson arrivals)
    value: float  # concurrent requests, or requests per second

    def __post_init__(self) -> None:
        if self.profile not in ("concurrency", "rate"):
            raise InputError(f"load profile must be concurrency or rate, got {self.profile!r}")
        if self.value <= 0:
            raise InputError(f"--{self.profile} must be positive, got {self.value:g}")

    @property
    def label(self) -> str:
        return f"c{int(self.value)}" if self.profile == "concurrency" else f"r{self.value:g}"


@dataclass(frozen=True)
class LoadSpec:
    requests: int = 16  # per level (ignored when duration_s is set)
    duration_s: float = 0.0  # per level: send requests until then, wait for those in flight
    warmup: int = 1  # requests per level before measuring, at the level's concurrency, not recorded
    timeout_s: float = 60.0  # a request that receives nothing for this long fails
    seed: int = 0

    def __post_init__(self) -> None:
        if self.requests < 1:
            raise InputError(f"--requests must be at least 1, got {self.requests}")
        if self.duration_s < 0 or self.warmup < 0:
            raise InputError("--duration and --warmup must not be negative")


# (request index; warm-ups are -1, -2, ...) -> (prompt index, request body)
BodyFor = Callable[[int], tuple[int, dict[str, Any]]]


@dataclass
class LevelRun:
    records: list[RequestRecord]  # in send order
    duration_s: float  # from the first send to the last completion
    not_sent: int = 0  # requests of the level never sent: the server died or a request timed out
    stopped: str = ""  # why sending stopped early


async def _closed_loop(send, n_workers: int, more: Callable[[int], bool]) -> None:
    counter = iter(range(1 << 62))

    async def worker() -> None:
        while True:
            i = next(counter)
            if not more(i):
                return
            await send(i)

    await asyncio.gather(*(worker() for _ in range(n_workers)))


async def _open_loop(send, rate: float, more: Callable[[int], bool], seed: int) -> None:
    """Poisson arrivals; each request is timed from its scheduled time, so a client that falls
    behind shows as lag (RequestRecord.lag_s), not as a faster server."""
    rng = np.random.default_rng(seed)
    tasks, t0, at = [], time.perf_counter(), 0.0
    i = 0
    while more(i):
        due = t0 + at
        await asyncio.sleep(max(due - time.perf_counter(), 0.0))  # yields even when late: sent ones go out
        tasks.append(asyncio.ensure_future(send(i, due)))
        at += float(rng.exponential(1.0 / rate))
        i += 1
    await asyncio.gather(*tasks)


async def _run(url: str, level: Level, load: LoadSpec, body_for: BodyFor, headers: dict[str, str] | None,
               alive: Callable[[], bool]) -> LevelRun:
    import aiohttp

    conc = int(level.value) if level.profile == "concurrency" else 0
    # every body made before the first send (a duration's as they go): making one (a seeded prompt,
    # decoded) takes milliseconds, which on the event loop would delay the other streams' chunks
    bodies = {i: body_for(i) for i in (*range(-load.warmup, 0), *(() if load.duration_s else range(load.requests)))}
    async with aiohttp.ClientSession(connector=connector(), trust_env=False) as client:
        async def one(i: int, start: float, due: float | None = None) -> RequestRecord:
            prompt_index, body = bodies.pop(i) if i in bodies else body_for(i)
            rec = RequestRecord(index=i, prompt_index=prompt_index,
                                start_s=(time.perf_counter() if due is None else due) - start)
            return await stream_completion(client, url, body, rec, load.timeout_s, headers, due)

        if load.warmup:  # at the level's concurrency (1 for a rate), results dropped
            await _closed_loop(lambda i: one(-1 - i, time.perf_counter()), max(conc, 1),
                               lambda i: i < load.warmup and alive())
        records: list[RequestRecord] = []
        stopped: list[str] = []
        start = time.perf_counter()

        def more(i: int) -> bool:
            if not alive() or any(r.error.startswith("timeout") for r in records):
                stopped[:] = ["the server died" if not alive() else "a request timed out"]
                return False  # the server died or hangs: send nothing more, count the rest not_sent
            if load.duration_s:
                return time.perf_counter() - start < load.duration_s
            return i < load.requests

        async def send(i: int, due: float | None = None) -> None:
            records.append(await one(i, start, due))

        if level.profile == "concurrency":
            await _closed_loop(send, conc, more)
        else:
            await _open_loop(send, level.value, more, load.seed)
        duration = time.perf_counter() - start
    not_sent = 0 if load.duration_s else max(load.requests - len(records), 0)
    return LevelRun(sorted(records, key=lambda r: r.index), duration, not_sent, stopped[0] if stopped else "")


def run_level(url: str, level: Level, load: LoadSpec, body_for: BodyFor, headers: dict[str, str] | None = None,
              alive: Callable[[], bool] = lambda: True) -> LevelRun:
    """Drive one level (after its warm-up requests, which are not recorded)."""
    return asyncio.run(_run(url, level, load, body_for, headers, alive))
