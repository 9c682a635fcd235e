"""Measure one cell in this process: load, warm up, repeat the identical loop, build rows.

Called inside the isolated child (engine.sweep.worker); tests call it directly too.
"""

from __future__ import annotations

import gc
import math
import time
from datetime import datetime, timezone
from dataclasses import replace
from typing import Any

import backends
from engine.measure.cell import Cell
from engine.generate.engine import Generation, GenerationConfig, InferenceEngine
from engine.errors import InputError
from engine.model.spec import ModelSpec, release_freed_memory
from engine.measure.fidelity_pass import UNCHECKED, PassResult, run_pass
from engine.measure.fit import Fit, admit
from engine.measure.reference import leading_matches, save_greedy
from engine.measure.memory import PeakRss
from engine.results.rows import BenchmarkResult, provenance
from engine.measure.stats import percentile, summarize
from engine.generate.prompts import prompt_ids

MAX_REPEATS = 1000


class LoadedModel:
    """A backend loaded for one cell's own shape (its batch, its positions); consecutive cells of
    equal load key and shape reuse it. The first cell measured on it pays (and reports) the load
    and the first-call overhead. `load` is what the backend was loaded with, for the rows."""

    def __init__(self, cell: Cell, spec: ModelSpec, max_seq_len: int, max_batch: int = 1):
        self.spec, self.max_seq_len = spec, max_seq_len
        self.fit: Fit | None = None  # the memory check the load passed (engine.measure.fit)

        def admitted(cls, opts):
            self.fit = admit(cls, spec, opts, cell.memory_limit_mb)
            return self.fit.opts

        opened = backends.open_backend(cell.framework, spec, cell.precision, cell.device, admitted,
                                       threads=cell.resolved_threads, max_seq_len=max_seq_len, max_batch=max_batch,
                                       compile=cell.compile, options=dict(cell.options))
        self.backend, self.info, self.precision = opened.backend, opened.info, opened.precision
        self.version, self.load_s = opened.version, opened.load_s
        opts = opened.opts
        self.load = dict(sequences=opts.max_batch, positions=opts.max_seq_len, precision=opts.precision,
                         device=opts.device, threads=opts.threads, compile=opts.compile, options=dict(opts.options))
        self.used = False
        self.compiles_marked = False
        self.released = False  # closed early to make room (the fidelity pass's own load): reload to reuse

    def compile_mark(self) -> int | None:
        """The backend's uncached compiles so far; 0 for the first cell, which owns the load's too."""
        mark = self.backend.uncached_compiles()
        if not self.compiles_marked and mark is not None:
            mark = 0
        self.compiles_marked = True
        return mark

    @property
    def load_shape(self) -> tuple[int, int]:
        return self.load["sequences"], self.load["positions"]

    def release(self) -> None:
        """Close the backend and drop it, its memory handed back (the caller holds no other reference)."""
        if not self.released:
            self.released = True
            self.backend.close()
            self.backend = None
            gc.collect()
            release_freed_memory()

    def close(self) -> None:
        self.release()


def cell_prompts(spec: ModelSpec, cell: Cell) -> list[list[int]]:
    """Each sequence's prompt."""
    return [prompt_ids(spec, cell.prompt_tokens, cell.prompt_text, seed) for seed in cell.sequence_seeds]


def positions_needed(spec: ModelSpec, cell: Cell) -> int:
    """Positions each sequence of the cell fills (prompt + generation), checked against the context."""
    prompt = len(prompt_ids(spec, cell.prompt_tokens, cell.prompt_text, cell.seed))
    if prompt + cell.gen_tokens > spec.config.context_length:
        raise InputError(f"prompt ({prompt}) + generation ({cell.gen_tokens}) tokens exceed the "
                         f"model's context of {spec.config.context_length}")
    return prompt + cell.gen_tokens


def kv_memory_shortfall(spec: ModelSpec, cell: Cell, max_seq_len: int) -> str:
    """Why a batch's KV caches (f32, the largest any backend holds) do not fit the cell's memory
    limit, or this host's available memory; '' when they fit. A clear `oom` row instead of a
    process the kernel kills."""
    import psutil

    need = cell.batch_size * max_seq_len * spec.config.kv_bytes_per_token(4)
    limit, what = cell.memory_limit_mb * 2**20, f"the memory limit of {cell.memory_limit_mb} MB"
    if not limit:
        limit, what = psutil.virtual_memory().available, "this host's available memory"
    if need <= limit:
        return ""
    return (f"a batch of {cell.batch_size} sequences x {max_seq_len} positions needs {need / 2**20:.0f} MB "
            f"of KV cache, beyond {what}")


class CellRun:
    """One cell measured a repeat at a time, so a scheduler can interleave the repeats of several
    loaded models (A B C A B C ...). The first step also runs the warm-up; `step()` says when the
    cell has its repeats (and `min_time_s` of measurement); `rows()` then builds its rows. `peak`
    is this process's memory mark, reset (or not) by the caller when the cell starts."""

    def __init__(self, cell: Cell, loaded: LoadedModel, prompts: list[list[int]], host_gbps: float, run_id: str,
                 peak: PeakRss | None = None):
        self.cell, self.loaded, self.prompts, self.host_gbps, self.run_id = cell, loaded, prompts, host_gbps, run_id
        self.peak = peak or PeakRss()
        self.engine = InferenceEngine(loaded.backend)
        self.gen_cfg = GenerationConfig(max_new_tokens=cell.gen_tokens, ignore_eos=True, seed=cell.seed)
        self.warm: list[float] | None = None
        self.runs: list[Generation] = []
        self.measured_at: list[str] = []
        self.measured_s = 0.0
        self.compile_cache = ""
        self._compiles_before: int | None = None
        self.steady_s = 0.0  # a repeat's seconds as the warm-up's steady steps predict them (0: unknown)

    def warm_up(self) -> float:
        """The cell's warm-up generations, once (a sweep may ask for them before the first repeat,
        else the first `step` runs them); their seconds, 0 when they had already run. `steady_s`
        then estimates a repeat from the last one's decode steps (past any compile on the first)."""
        if self.warm is not None:
            return 0.0
        self._compiles_before = self.loaded.compile_mark()
        self.warm = []
        short = replace(self.gen_cfg, max_new_tokens=self.cell.warmup_tokens)
        for _ in range(self.cell.warmup):
            t = time.perf_counter()
            gen = self.engine.generate_batch(self.prompts, short)
            self.warm.append(time.perf_counter() - t)
            self.steady_s = self.cell.gen_tokens * percentile(gen.itl_s, 50) if gen.itl_s else 0.0
        return sum(self.warm)

    def step(self) -> bool:
        """Warm up (if not yet), measure one repeat; True when the cell is complete."""
        first = not self.runs
        self.warm_up()
        self.measured_at.append(utc_now_ms())
        t = time.perf_counter()
        self.runs.append(self.engine.generate_batch(self.prompts, self.gen_cfg))
        self.measured_s += time.perf_counter() - t
        if first:  # through the first repeat too: with --warmup 0 that is where compilation happens
            self.compile_cache = compile_cache_state(self._compiles_before, self.loaded.backend.uncached_compiles())
        self.peak_rss_bytes = self.peak.bytes()  # through the timed runs, before any bookkeeping
        n, c = len(self.runs), self.cell
        if n < c.repeats or (self.measured_s < c.min_time_s and n < MAX_REPEATS):
            return False
        out_of_time = c.max_time_s and self.measured_s >= c.max_time_s
        return n >= c.max_repeats or out_of_time or not ci_wide(self.runs, c)

    def rows(self) -> list[BenchmarkResult]:
        loaded, runs, warm = self.loaded, self.runs, self.warm or []
        device_mem = loaded.backend.memory()
        # first-call overhead (JIT capture, kernel compilation, allocator growth) beyond the same tokens of a steady run;
        # only the first use of a loaded model pays it
        steady = warmup_share(runs, self.cell.warmup_tokens)
        compile_s = loaded.info.compile_s + (max(0.0, warm[0] - steady) if warm and not loaded.used else 0.0)
        load_s = 0.0 if loaded.used else loaded.load_s  # on the row that paid it
        loaded.used = True
        if backends.get(self.cell.framework).is_reference:  # what the sweep checks every mode's runs against
            for prompt, tokens in zip(self.prompts, runs[0].sequences):
                save_greedy(self.cell.model, prompt, self.cell.gen_tokens, tokens)
        rows = build_rows(self.cell, loaded, self.prompts, runs, sum(warm), compile_s, load_s, device_mem,
                          self.host_gbps, self.run_id, self.peak_rss_bytes)
        self.engine = None  # the pass may release the loaded backend to make room for its own
        # outside the timed runs, cached per mode
        checked = run_pass(self.cell, loaded) if self.cell.fidelity else UNCHECKED
        return [with_fidelity(replace(r, measured_at=at, peak_rss_scope=self.peak.scope, load=loaded.load,
                                      compile_cache=self.compile_cache), checked)
                for r, at in zip(rows, self.measured_at)]


def warmup_share(runs: list[Generation], tokens: int) -> float:
    """Seconds a steady run takes to its `tokens`-th token (the median over `runs`): what a warm-up
    of that length costs without its first-call overhead."""
    return sorted((r.ttft_ns + sum(r.itl_ns[:tokens - 1])) / 1e9 for r in runs)[len(runs) // 2]


def compile_cache_state(before: int | None, after: int | None) -> str:
    """`cold` when the backend compiled anything its disk cache could not serve in between,
    `cached` when it compiled nothing itself, '' when the mode compiles nothing."""
    if before is None or after is None:
        return ""
    return "cold" if after > before else "cached"


def measure(cell: Cell, loaded: LoadedModel, prompts: list[list[int]], host_gbps: float,
            run_id: str) -> list[BenchmarkResult]:
    """Every repeat of one cell, back to back, in this process."""
    run = CellRun(cell, loaded, prompts, host_gbps, run_id)
    while not run.step():
        pass
    return run.rows()


def utc_now_ms() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def with_fidelity(row: BenchmarkResult, checked: PassResult) -> BenchmarkResult:
    """The fidelity pass's numbers on a row; `diverged` when the text prompt's greedy tokens leave the reference's."""
    f = checked.fidelity
    row = replace(row, kld_mean=f.kld_mean, kld_p99=f.kld_p99, same_top_p=f.same_top_p, same_top_p_err=f.same_top_p_err,
                  rms_dp=f.rms_dp, fidelity_positions=f.positions, fidelity_s=checked.seconds,
                  kl_vs_reference=f.kld_mean, top1_agreement=f.same_top_p, match_tokens=checked.match_tokens)
    return row.with_flags(("diverged",)) if 0 <= checked.match_tokens < row.gen_tokens else row


def build_rows(cell: Cell, loaded: LoadedModel, prompts: list[list[int]], runs: list[Generation], warmup_s: float,
               compile_s: float, load_s: float, device_mem: dict[str, int], host_gbps: float, run_id: str,
               peak_rss_bytes: int) -> list[BenchmarkResult]:
    info, spec = loaded.info, loaded.spec
    threads_used, threads_note = loaded.backend.threads_used()
    cell_stats = summarize([r.decode_tps for r in runs if not math.isnan(r.decode_tps)])
    kv_depth = len(prompts[0]) + cell.gen_tokens / 2  # mean KV length a decode step reads
    # a step reads the weights once and each sequence's KV cache, for one token per sequence
    bytes_per_token = (info.decode_bytes + len(prompts) * info.kv_bytes_per_token * kv_depth) / len(prompts)
    common = dict(
        run_id=run_id, cell_id=cell.cell_id, framework=cell.framework, precision=loaded.precision,
        device=info.device, model=spec.name, model_size=spec.size_label, threads=cell.resolved_threads,
        threads_used=threads_used, options=dict(cell.options), optimization_level="compile" if cell.compile else "eager",
        iterations=len(runs), warmup_s=warmup_s, compile_s=compile_s,
        decode_tps_mean=cell_stats.mean, decode_tps_std=cell_stats.std, decode_tps_ci95_low=cell_stats.ci95_low,
        decode_tps_ci95_high=cell_stats.ci95_high, decode_tps_cov=cell_stats.cov,
        peak_rss_bytes=peak_rss_bytes, device_memory_bytes=max(device_mem.values(), default=0),
        memory_needed_bytes=loaded.fit.needed_bytes if loaded.fit else 0,
        memory_limit_bytes=loaded.fit.limit_bytes if loaded.fit else 0,
        model_bytes=info.weight_bytes, bytes_per_token=bytes_per_token, host_gbps=host_gbps,
        framework_version=loaded.version, extra={**info.details, **{f"memory_{k}": v for k, v in device_mem.items()},
               **({"threads_note": threads_note} if threads_note else {})},
        **provenance(),
    )
    flags = cell_flags(cell_stats.cov, cell.noise_threshold) + cold_flag(cell)
    if cell.max_repeats > cell.repeats and ci_wide(runs, cell):  # adaptive, and a bound (repeats, time) came first
        flags += ("ci_wide",)
    rows = []
    for i, run in enumerate(runs):
        achieved = bytes_per_token * run.decode_tps / 1e9
        roofline = achieved / host_gbps if host_gbps else math.nan
        rows.append(BenchmarkResult(
            **common, **timing_fields(run, prompts), repeat=i, load_s=load_s if i == 0 else 0.0,
            achieved_gbps=achieved, roofline_frac=roofline, flags=flags + (("over_roofline",) if roofline > 1.0 else ()),
        ))
    return rows


def timing_fields(run: Generation, prompts: list[list[int]]) -> dict[str, Any]:
    """The row fields one generation determines: tokens, TTFT, decode speed, latency percentiles.
    For a batch, speeds count every sequence's tokens and latencies are per step."""
    itl, total, batch = run.itl_s, run.total_ns / 1e9, run.batch_size
    return dict(
        prompt_tokens=len(prompts[0]), gen_tokens=len(run.tokens), batch_size=batch, tokens=list(run.tokens),
        prompt_ids=list(prompts[0]), batch_tokens=[list(s) for s in run.sequences],
        batch_prompt_ids=[list(p) for p in prompts], itl_s=itl, ttft_s=run.ttft_s,
        prefill_tps=batch * len(prompts[0]) / run.ttft_s, decode_tps=run.decode_tps,
        decode_tps_per_seq=run.decode_tps_per_seq,
        itl_p50_s=percentile(itl, 50), itl_p90_s=percentile(itl, 90), itl_p99_s=percentile(itl, 99),
        total_time=total, avg_token_time=sum(itl) / len(itl) if itl else math.nan,
        min_token_time=min(itl, default=math.nan), max_token_time=max(itl, default=math.nan),
        avg_tokens_per_second=sum(map(len, run.sequences)) / total,
        peak_tokens_per_second=batch / min(itl) if itl else math.nan,
    )


def ci_wide(runs: list[Generation], cell: Cell) -> bool:
    """The 95% CI of decode tok/s is wider than the cell's target (or cannot be had: one repeat)."""
    half = summarize([r.decode_tps for r in runs if not math.isnan(r.decode_tps)]).relative_half_width
    return not half <= cell.ci_target


def cell_flags(cov: float, noise_threshold: float) -> tuple[str, ...]:
    return ("noisy",) if not math.isnan(cov) and cov > noise_threshold else ()


def cold_flag(cell: Cell) -> tuple[str, ...]:
    """`cold`: a mode whose first call compiles, measured with `--warmup 0` as the user asked, so
    its first repeat (and the cell's tok/s) includes the compiler; every default run warms up."""
    compiles = backends.get(cell.framework).compiles_on_first_call(cell.compile, dict(cell.options))
    return ("cold",) if compiles and cell.warmup == 0 else ()


def with_reference(rows: list[BenchmarkResult], references: list[list[int]]) -> list[BenchmarkResult]:
    """Record, per sequence of the speed prompts, how many leading tokens agree with the reference's
    for that prompt alone (the batching check); flag `batch_diverged` when a batch's sequence falls short."""
    out = []
    for r in rows:
        matches = [leading_matches(seq, ref) for seq, ref in zip(r.batch_tokens, references)]
        r = replace(r, batch_match_tokens=matches)
        short = r.batch_size > 1 and any(m < len(seq) for m, seq in zip(matches, r.batch_tokens))
        out.append(r.with_flags(("batch_diverged",)) if short else r)
    return out


def failure_row(cell: Cell, status: str, error: str, run_id: str, **extra: Any) -> BenchmarkResult:
    return BenchmarkResult(
        run_id=run_id, cell_id=cell.cell_id, status=status, error=error, framework=cell.framework,
        precision=cell.precision, device=cell.device, model=cell.model.rsplit("/", 1)[-1],
        prompt_tokens=cell.prompt_tokens, gen_tokens=cell.gen_tokens, batch_size=cell.batch_size,
        threads=cell.resolved_threads, options=dict(cell.options),
        optimization_level="compile" if cell.compile else "eager", **provenance(), **extra,
    )
