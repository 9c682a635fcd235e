"""Measure one cell in this process: load, warm up, repeat the identical loop, build rows.

Called inside the isolated child (engine.sweep.worker); tests call it directly too.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any

import backends
from engine.measure.cell import Cell
from engine.generate.engine import Generation, GenerationConfig, InferenceEngine
from engine.errors import InputError
from engine.model.spec import ModelSpec
from engine.measure.memory import high_water_mark_bytes
from engine.results.rows import BenchmarkResult, provenance
from engine.measure.stats import percentile, summarize
from engine.generate.prompts import prompt_ids

MAX_REPEATS = 1000


class LoadedModel:
    """A backend loaded for a cell's load key; consecutive cells with the same key reuse it.
    The first cell measured on it pays (and reports) the load and the first-call overhead."""

    def __init__(self, cell: Cell, spec: ModelSpec, max_seq_len: int):
        self.spec = spec
        opened = backends.open_backend(cell.framework, spec, cell.precision, cell.device, threads=cell.threads,
                                       max_seq_len=max_seq_len, compile=cell.compile, options=dict(cell.options))
        self.backend, self.info, self.precision = opened.backend, opened.info, opened.precision
        self.version, self.load_s = opened.version, opened.load_s
        self.used = False

    def close(self) -> None:
        self.backend.close()


def needed_seq_len(spec: ModelSpec, cell: Cell) -> tuple[list[int], int]:
    prompt = prompt_ids(spec, cell.prompt_tokens, cell.prompt_text, cell.seed)
    need = len(prompt) + cell.gen_tokens
    if need > spec.config.context_length:
        raise InputError(f"prompt ({len(prompt)}) + generation ({cell.gen_tokens}) tokens exceed the "
                         f"model's context of {spec.config.context_length}")
    return prompt, need


def measure(cell: Cell, loaded: LoadedModel, prompt: list[int], host_gbps: float, run_id: str) -> list[BenchmarkResult]:
    engine = InferenceEngine(loaded.backend)
    gen_cfg = GenerationConfig(max_new_tokens=cell.gen_tokens, ignore_eos=True, seed=cell.seed)
    warm = [_timed(engine, prompt, gen_cfg) for _ in range(cell.warmup)]
    runs: list[Generation] = []
    t0 = time.perf_counter()
    while len(runs) < cell.repeats or (time.perf_counter() - t0 < cell.min_time_s and len(runs) < MAX_REPEATS):
        runs.append(engine.generate(prompt, gen_cfg))
    device_mem = loaded.backend.memory()
    # first-call overhead (JIT capture, kernel compilation, allocator growth) beyond a steady run;
    # only the first use of a loaded model pays it
    steady = sorted(r.total_ns / 1e9 for r in runs)[len(runs) // 2]
    compile_s = loaded.info.compile_s + (max(0.0, warm[0] - steady) if warm and not loaded.used else 0.0)
    load_s = 0.0 if loaded.used else loaded.load_s  # on the row that paid it
    loaded.used = True
    return build_rows(cell, loaded, prompt, runs, sum(warm), compile_s, load_s, device_mem, host_gbps,
                      run_id)


def _timed(engine: InferenceEngine, prompt: list[int], cfg: GenerationConfig) -> float:
    t = time.perf_counter()
    engine.generate(prompt, cfg)
    return time.perf_counter() - t


def build_rows(cell: Cell, loaded: LoadedModel, prompt: list[int], runs: list[Generation], warmup_s: float,
               compile_s: float, load_s: float, device_mem: dict[str, int], host_gbps: float, run_id: str) -> list[BenchmarkResult]:
    info, spec = loaded.info, loaded.spec
    cell_stats = summarize([r.decode_tps for r in runs if not math.isnan(r.decode_tps)])
    kv_depth = len(prompt) + cell.gen_tokens / 2  # mean KV length a decode step reads
    bytes_per_token = info.decode_bytes + info.kv_bytes_per_token * kv_depth
    common = dict(
        run_id=run_id, cell_id=cell.cell_id, framework=cell.framework, precision=loaded.precision,
        device=info.device, model=spec.name, model_size=spec.size_label, threads=cell.threads, optimization_level="compile" if cell.compile else "eager",
        iterations=len(runs), warmup_s=warmup_s, compile_s=compile_s,
        decode_tps_mean=cell_stats.mean, decode_tps_std=cell_stats.std, decode_tps_ci95_low=cell_stats.ci95_low,
        decode_tps_ci95_high=cell_stats.ci95_high, decode_tps_cov=cell_stats.cov,
        peak_rss_bytes=high_water_mark_bytes(), device_memory_bytes=max(device_mem.values(), default=0),
        model_bytes=info.weight_bytes, bytes_per_token=bytes_per_token, host_gbps=host_gbps, prompt_ids=list(prompt),
        framework_version=loaded.version, extra={**info.details, **{f"memory_{k}": v for k, v in device_mem.items()}},
        **provenance(),
    )
    flags = cell_flags(cell_stats.cov, cell.noise_threshold)
    rows = []
    for i, run in enumerate(runs):
        achieved = bytes_per_token * run.decode_tps / 1e9
        roofline = achieved / host_gbps if host_gbps else math.nan
        rows.append(BenchmarkResult(
            **common, **timing_fields(run, len(prompt)), repeat=i, load_s=load_s if i == 0 else 0.0,
            achieved_gbps=achieved, roofline_frac=roofline, flags=flags + (("over_roofline",) if roofline > 1.0 else ()),
        ))
    return rows


def timing_fields(run: Generation, prompt_tokens: int) -> dict[str, Any]:
    """The row fields one generation determines: tokens, TTFT, decode speed, latency percentiles."""
    itl, total = run.itl_s, run.total_ns / 1e9
    return dict(
        prompt_tokens=prompt_tokens, gen_tokens=len(run.tokens), tokens=list(run.tokens), itl_s=itl,
        ttft_s=run.ttft_s, prefill_tps=prompt_tokens / run.ttft_s, decode_tps=run.decode_tps,
        itl_p50_s=percentile(itl, 50), itl_p90_s=percentile(itl, 90), itl_p99_s=percentile(itl, 99),
        total_time=total, avg_token_time=sum(itl) / len(itl) if itl else math.nan,
        min_token_time=min(itl, default=math.nan), max_token_time=max(itl, default=math.nan),
        avg_tokens_per_second=len(run.tokens) / total, peak_tokens_per_second=1 / min(itl) if itl else math.nan,
    )


def cell_flags(cov: float, noise_threshold: float) -> tuple[str, ...]:
    return ("noisy",) if not math.isnan(cov) and cov > noise_threshold else ()


def with_reference(rows: list[BenchmarkResult], reference: list[int]) -> list[BenchmarkResult]:
    """Record how many leading tokens agree with the reference's; flag `diverged` when not all."""
    out = []
    for r in rows:
        match = leading_matches(r.tokens, reference)
        r = replace(r, match_tokens=match)
        out.append(r.with_flag("diverged") if match < len(r.tokens) else r)
    return out


def leading_matches(tokens: list[int], reference: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


def failure_row(cell: Cell, status: str, error: str, run_id: str, **extra: Any) -> BenchmarkResult:
    return BenchmarkResult(
        run_id=run_id, cell_id=cell.cell_id, status=status, error=error, framework=cell.framework,
        precision=cell.precision, device=cell.device, model=cell.model.rsplit("/", 1)[-1],
        prompt_tokens=cell.prompt_tokens, gen_tokens=cell.gen_tokens, threads=cell.threads,
        optimization_level="compile" if cell.compile else "eager", **provenance(), **extra,
    )
