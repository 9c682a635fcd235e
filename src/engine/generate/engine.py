"""InferenceEngine: the one generate loop every framework runs through, and its timing.

    t0 = clock(); logits = backend.prefill(prompt); tok = sample(logits); t1 = clock()
    for i in range(n - 1): logits = backend.decode(tok); tok = sample(logits); t[i] = clock()

Backends return host logits only after their queued work is complete, so the clock is read
after real work. `stream()` yields per-token events; `generate()` drains it into a Generation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from engine.generate.backend import Backend
from engine.errors import InputError
from engine.generate.sampling import Sampler


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    ignore_eos: bool = False
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")


@dataclass(frozen=True)
class TokenEvent:
    token: int
    index: int  # 0 for the token sampled from the prefill logits
    t_ns: int  # clock when the token was on the host
    dt_ns: int  # since the previous event (the TTFT for index 0)


@dataclass
class Generation:
    """One generation's tokens and timings, filled event by event (`add`), so a consumer that
    streams (chat) and one that drains (measurement) keep the same books."""

    tokens: list[int] = field(default_factory=list)
    ttft_ns: int = 0
    itl_ns: list[int] = field(default_factory=list)  # between consecutive tokens

    def add(self, ev: TokenEvent) -> None:
        self.tokens.append(ev.token)
        if ev.index == 0:
            self.ttft_ns = ev.dt_ns
        else:
            self.itl_ns.append(ev.dt_ns)

    @property
    def total_ns(self) -> int:
        return self.ttft_ns + sum(self.itl_ns)

    @property
    def ttft_s(self) -> float:
        return self.ttft_ns / 1e9

    @property
    def itl_s(self) -> list[float]:
        return [x / 1e9 for x in self.itl_ns]

    @property
    def decode_tps(self) -> float:
        """Decode tokens per second from the measured inter-token latencies (never by subtraction);
        NaN with no decode step."""
        return len(self.itl_ns) / (sum(self.itl_ns) / 1e9) if self.itl_ns else math.nan


class InferenceEngine:
    def __init__(self, backend: Backend, clock: Callable[[], int] = time.perf_counter_ns):
        self.backend = backend
        self.clock = clock

    def stream(self, prompt_ids: Sequence[int], cfg: GenerationConfig, reset: bool = True) -> Iterator[TokenEvent]:
        """Generate after `prompt_ids`. With reset=False the KV cache is kept and the prompt is
        appended to it (multi-turn chat). A stop id ends the stream and is not yielded."""
        backend, clock = self.backend, self.clock
        sample = Sampler(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
        stops = () if cfg.ignore_eos else cfg.stop_ids
        if reset:
            backend.reset()
        t0 = clock()
        token = sample(backend.prefill(prompt_ids))
        now = clock()
        for index in range(cfg.max_new_tokens):
            if index:
                token = sample(backend.decode(token))
                prev, now = now, clock()
                dt = now - prev
            else:
                dt = now - t0
            if token in stops:
                return
            yield TokenEvent(token, index, now, dt)

    def generate(self, prompt_ids: Sequence[int], cfg: GenerationConfig) -> Generation:
        gen = Generation()
        for ev in self.stream(prompt_ids, cfg):
            gen.add(ev)
        return gen
