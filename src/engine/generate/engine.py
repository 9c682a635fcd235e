"""InferenceEngine: the one generate loop every framework runs through, and its timing.

    t0 = clock(); logits = backend.prefill_batch(prompts); toks = sample(logits); t1 = clock()
    for i in range(n - 1): logits = backend.decode_batch(toks); toks = sample(logits); t[i] = clock()

One sequence is a batch of one. A batch's sequences are prefilled together and decoded in
lockstep, one token per sequence per step, each with its own sampler (seed + b). Backends return
host logits only after their queued work is complete, so the clock is read after real work.
`stream()` yields one event per step; `generate()` drains it into a Generation.
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
    """One step: a token per sequence of the batch, None for a sequence that has stopped."""

    tokens: tuple[int | None, ...]
    index: int  # 0 for the tokens sampled from the prefill logits
    t_ns: int  # clock when the tokens were on the host
    dt_ns: int  # since the previous event (the TTFT for index 0)

    @property
    def token(self) -> int | None:
        """The first sequence's token: the only one when generating one sequence."""
        return self.tokens[0]


@dataclass
class Generation:
    """One generation's tokens (per sequence of the batch) and timings per step, filled event by
    event (`add`), so a consumer that streams (chat) and one that drains (measurement) keep the
    same books."""

    sequences: list[list[int]] = field(default_factory=list)  # generated ids, one list per sequence
    ttft_ns: int = 0
    itl_ns: list[int] = field(default_factory=list)  # between consecutive steps
    decode_tokens: int = 0  # tokens the decode steps produced, all sequences

    def add(self, ev: TokenEvent) -> None:
        if not self.sequences:
            self.sequences = [[] for _ in ev.tokens]
        for seq, token in zip(self.sequences, ev.tokens):
            if token is not None:
                seq.append(token)
        if ev.index == 0:
            self.ttft_ns = ev.dt_ns
        else:
            self.itl_ns.append(ev.dt_ns)
            self.decode_tokens += sum(t is not None for t in ev.tokens)

    @property
    def tokens(self) -> list[int]:
        """The first sequence's ids: the only sequence outside a batch."""
        return self.sequences[0] if self.sequences else []

    @property
    def batch_size(self) -> int:
        return len(self.sequences)

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
        """Decode tokens per second, every sequence of the batch together, from the measured step
        latencies (never by subtraction); NaN with no decode step."""
        return self.decode_tokens / (sum(self.itl_ns) / 1e9) if self.itl_ns else math.nan

    @property
    def decode_tps_per_seq(self) -> float:
        return self.decode_tps / self.batch_size if self.itl_ns else math.nan


class InferenceEngine:
    def __init__(self, backend: Backend, clock: Callable[[], int] = time.perf_counter_ns):
        self.backend = backend
        self.clock = clock

    def stream(self, prompt_ids: Sequence[int], cfg: GenerationConfig, reset: bool = True) -> Iterator[TokenEvent]:
        """Generate after `prompt_ids`. With reset=False the KV cache is kept and the prompt is
        appended to it (multi-turn chat). A stop id ends the stream and is not yielded."""
        return self.stream_batch([prompt_ids], cfg, reset)

    def stream_batch(self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig,
                     reset: bool = True) -> Iterator[TokenEvent]:
        """Generate after each of `prompts` (one length) in lockstep. A sequence that samples a
        stop id is done (None from then on) but keeps its slot, as a static batch does; the
        stream ends when every sequence is done."""
        backend, clock = self.backend, self.clock
        samplers = [Sampler(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed + b) for b in range(len(prompts))]
        stops = () if cfg.ignore_eos else cfg.stop_ids
        live = [True] * len(prompts)
        if reset:
            backend.reset()
        t0 = clock()
        tokens = [s(row) for s, row in zip(samplers, backend.prefill_batch(prompts))]
        now = clock()
        for index in range(cfg.max_new_tokens):
            if index:
                tokens = [s(row) for s, row in zip(samplers, backend.decode_batch(tokens))]
                prev, now = now, clock()
                dt = now - prev
            else:
                dt = now - t0
            live = [alive and t not in stops for alive, t in zip(live, tokens)]
            if not any(live):
                return
            yield TokenEvent(tuple(t if alive else None for t, alive in zip(tokens, live)), index, now, dt)

    def generate(self, prompt_ids: Sequence[int], cfg: GenerationConfig) -> Generation:
        return self.generate_batch([prompt_ids], cfg)

    def generate_batch(self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig) -> Generation:
        gen = Generation()
        for ev in self.stream_batch(prompts, cfg):
            gen.add(ev)
        return gen
