"""Measure one cell in this process: load, warm up, repeat the identical loop, build rows.

Called inside the isolated child (engine.worker); tests call it directly too.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import replace
from typing import Any

import backends
from backends.base import Backend, LoadOptions
from engine.cells import Cell
from engine.engine import Generation, GenerationConfig, InferenceEngine
from engine.errors import InputError, UnavailableError
from engine.gguf_model import ModelSpec
from engine.memory import MemoryTracker
from engine.results import BenchmarkResult, provenance
from engine.stats import percentile, summarize
from engine.workload import prompt_ids

MAX_REPEATS = 1000


class LoadedModel:
    """A backend loaded for a cell's load key; consecutive cells with the same key reuse it."""

    def __init__(self, cell: Cell, spec: ModelSpec, max_seq_len: int):
        cls = backends.get(cell.framework)
        avail = cls.availability()
        if not avail.ok:
            raise UnavailableError(f"framework {cell.framework} is unavailable: {avail.reason}")
        self.version = avail.version
        self.spec = spec
        self.precision = cls.resolve_precision(self.spec, cell.precision)
        self.backend: Backend = cls()
        t = time.perf_counter()
        self.info = self.backend.load(self.spec, LoadOptions(
            precision=self.precision, device=cls.resolve_device(cell.device), threads=cell.threads or None,
            max_seq_len=max_seq_len, compile=cell.compile, options=dict(cell.options)))
        self.load_s = time.perf_counter() - t
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
    with MemoryTracker() as mem:
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
    loaded.used = True
    return build_rows(cell, loaded, prompt, runs, sum(warm), compile_s, mem.summary(), device_mem, host_gbps, run_id)


def _timed(engine: InferenceEngine, prompt: list[int], cfg: GenerationConfig) -> float:
    t = time.perf_counter()
    engine.generate(prompt, cfg)
    return time.perf_counter() - t


def build_rows(cell: Cell, loaded: LoadedModel, prompt: list[int], runs: list[Generation], warmup_s: float,
               compile_s: float, mem, device_mem: dict[str, int], host_gbps: float, run_id: str) -> list[BenchmarkResult]:
    info, spec = loaded.info, loaded.spec
    decode = [(len(r.itl_ns)) / (sum(r.itl_ns) / 1e9) if r.itl_ns else math.nan for r in runs]
    cell_stats = summarize([d for d in decode if not math.isnan(d)])
    kv_depth = len(prompt) + cell.gen_tokens / 2  # mean KV length a decode step reads
    bytes_per_token = info.decode_bytes + info.kv_bytes_per_token * kv_depth
    device_bytes = max(device_mem.values(), default=0)
    extra = json.dumps({**info.details, **{f"memory_{k}": v for k, v in device_mem.items()}}, sort_keys=True)
    common = dict(
        run_id=run_id, cell_id=cell.cell_id, framework=cell.framework, precision=loaded.precision,
        device=info.device, model=spec.name, model_size=spec.size_label, prompt_tokens=len(prompt),
        threads=cell.threads, optimization_level="compile" if cell.compile else "eager",
        iterations=len(runs), load_s=loaded.load_s, model_loading_time=loaded.load_s, warmup_s=warmup_s,
        compile_s=compile_s, jit_compilation_time=compile_s,
        decode_tps_mean=cell_stats.mean, decode_tps_std=cell_stats.std, decode_tps_ci95_low=cell_stats.ci95_low,
        decode_tps_ci95_high=cell_stats.ci95_high, decode_tps_cov=cell_stats.cov,
        peak_rss_bytes=mem.peak_rss_bytes, sampled_rss_peak_bytes=mem.sampled_rss_peak_bytes,
        sampled_uss_peak_bytes=mem.sampled_uss_peak_bytes, device_memory_bytes=device_bytes,
        peak_memory_gb=mem.peak_rss_bytes / 1e9, model_bytes=info.weight_bytes,
        model_memory_gb=info.weight_bytes / 1e9, bytes_per_token=bytes_per_token, host_gbps=host_gbps,
        prompt_ids=" ".join(map(str, prompt)), framework_version=loaded.version, extra=extra, **provenance(),
    )
    rows = []
    for i, (run, tps) in enumerate(zip(runs, decode)):
        itl = [x / 1e9 for x in run.itl_ns]
        ttft = run.ttft_ns / 1e9
        total = run.total_ns / 1e9
        achieved = bytes_per_token * tps / 1e9
        roofline = achieved / host_gbps if host_gbps else math.nan
        toks = " ".join(map(str, run.tokens))
        rows.append(BenchmarkResult(
            **common, repeat=i, gen_tokens=len(run.tokens), ttft_s=ttft, first_token_time=ttft,
            prefill_tps=len(prompt) / ttft, decode_tps=tps,
            itl_p50_s=percentile(itl, 50), itl_p90_s=percentile(itl, 90), itl_p99_s=percentile(itl, 99),
            total_time=total, avg_token_time=sum(itl) / len(itl) if itl else math.nan,
            min_token_time=min(itl, default=math.nan), max_token_time=max(itl, default=math.nan),
            avg_tokens_per_second=len(run.tokens) / total,
            peak_tokens_per_second=1 / min(itl) if itl else math.nan,
            achieved_gbps=achieved, roofline_frac=roofline, tokens=toks,
            tokens_sha=hashlib.sha1(toks.encode()).hexdigest()[:12],
            flags=_flags(cell_stats.cov, cell.noise_threshold, roofline), itl_s=itl,
        ))
    return rows


def _flags(cov: float, noise_threshold: float, roofline_frac: float) -> str:
    flags = []
    if not math.isnan(cov) and cov > noise_threshold:
        flags.append("noisy")
    if roofline_frac > 1.0:
        flags.append("over_roofline")
    return ";".join(flags)


def with_reference(rows: list[BenchmarkResult], reference: list[int]) -> list[BenchmarkResult]:
    """Record how many leading tokens agree with the reference's; flag `diverged` when not all."""
    out = []
    for r in rows:
        toks = [int(t) for t in r.tokens.split()]
        match = next((i for i, (a, b) in enumerate(zip(toks, reference)) if a != b), min(len(toks), len(reference)))
        flags = r.flags.split(";") if r.flags else []
        if match < len(toks):
            flags.append("diverged")
        out.append(replace(r, match_tokens=match, flags=";".join(flags)))
    return out


def failure_row(cell: Cell, status: str, error: str, run_id: str, **extra: Any) -> BenchmarkResult:
    return BenchmarkResult(
        run_id=run_id, cell_id=cell.cell_id, status=status, error=error, framework=cell.framework,
        precision=cell.precision, device=cell.device, model=cell.model.rsplit("/", 1)[-1],
        prompt_tokens=cell.prompt_tokens, gen_tokens=cell.gen_tokens, threads=cell.threads,
        optimization_level="compile" if cell.compile else "eager", **provenance(), **extra,
    )
