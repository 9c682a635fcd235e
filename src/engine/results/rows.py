"""BenchmarkResult: one typed row per measured repeat (a failed cell is one row with its status).

Rows are typed: token ids are lists of ints, flags a tuple of strings, `extra` a dict. The JSONL
keeps those types; the CSV flattens them (`csv_record`), the contract with notebooks and
`bench report`. docs/results-schema.md describes every column and a test keeps the two in step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import socket
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping

from engine import __version__

STATUSES = ("ok", "error", "crash", "oom", "timeout", "unavailable", "lost")


class TypedRow:
    """What every results row (a frozen dataclass) shares: its CSV columns, its typed JSON form and
    back, and added flags. `jsonl_only` names the fields too large for the CSV (raw samples)."""

    jsonl_only: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        object.__setattr__(self, "flags", tuple(self.flags))

    @classmethod
    def csv_columns(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in cls.jsonl_only]

    def as_dict(self) -> dict[str, Any]:
        """Typed, JSON-ready: lists stay lists, dicts stay objects, a missing number is None."""
        d = asdict(self)
        d["flags"] = list(self.flags)
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Inverse of `as_dict` (a JSONL line); derived columns are recomputed, unknown keys dropped."""
        init = {f.name: f.type for f in fields(cls) if f.init}
        return cls(**{k: math.nan if v is None and init[k] == "float" else v for k, v in d.items() if k in init})

    def with_flags(self, flags: Iterable[str]):
        return replace(self, flags=(*self.flags, *flags))


@dataclass(frozen=True)
class BenchmarkResult(TypedRow):
    # identity
    run_id: str = ""
    cell_id: str = ""
    repeat: int = 0
    status: str = "ok"
    error: str = ""
    flags: tuple[str, ...] = ()  # noisy, over_roofline, diverged, best, tied, unchecked, ci_wide, ...
    # what ran
    framework: str = ""
    precision: str = ""
    device: str = ""
    model: str = ""
    model_size: str = ""
    prompt_tokens: int = 0
    gen_tokens: int = 0
    batch_size: int = 1  # sequences decoded in lockstep
    threads: int = 0
    threads_used: int = 0
    optimization_level: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # backend options (-o KEY=VALUE) the cell ran with
    load: dict[str, Any] = field(default_factory=dict)  # what the backend was loaded with: capacity, threads, ...
    iterations: int = 0  # measured repeats in this cell
    # time
    load_s: float = math.nan
    warmup_s: float = math.nan
    compile_s: float = math.nan
    compile_cache: str = ""  # cold, cached, or empty (the mode compiles nothing)
    ttft_s: float = math.nan
    prefill_tps: float = math.nan
    decode_tps: float = math.nan  # every sequence of the batch together
    decode_tps_per_seq: float = math.nan
    itl_p50_s: float = math.nan
    itl_p90_s: float = math.nan
    itl_p99_s: float = math.nan
    total_time: float = math.nan
    first_token_time: float = field(default=math.nan, init=False)  # alias of ttft_s
    avg_token_time: float = math.nan
    min_token_time: float = math.nan
    max_token_time: float = math.nan
    avg_tokens_per_second: float = math.nan
    peak_tokens_per_second: float = math.nan
    jit_compilation_time: float = field(default=math.nan, init=False)  # alias of compile_s
    model_loading_time: float = field(default=math.nan, init=False)  # alias of load_s
    # across the cell's repeats
    decode_tps_mean: float = math.nan
    decode_tps_std: float = math.nan
    decode_tps_ci95_low: float = math.nan
    decode_tps_ci95_high: float = math.nan
    decode_tps_cov: float = math.nan
    # the `--modes best` decision over the whole results file (engine.measure.decide)
    runner_up: str = ""  # mode label of the runner-up, on the row of its workload's top mode
    ratio_to_runner_up: float = math.nan  # decode tok/s of this mode over the runner-up's
    ratio_ci95_low: float = math.nan
    ratio_ci95_high: float = math.nan
    ratio_method: str = ""  # paired (t on per-round log-ratios) or welch (Welch's t on logs)
    tied_modes: str = ""  # on every tied row: the tied modes, top first, ", "-joined
    # memory
    peak_rss_bytes: int = 0
    peak_rss_scope: str = ""  # what interval peak_rss_bytes covers: cell or process
    sampled_rss_peak_bytes: int = 0
    sampled_uss_peak_bytes: int = 0
    device_memory_bytes: int = 0
    memory_needed_bytes: int = 0  # the load's estimated peak (of the process), checked before loading
    memory_limit_bytes: int = 0  # what it was checked against: --memory-limit-mb or the host's available memory
    peak_memory_gb: float = field(default=math.nan, init=False)  # peak_rss_bytes / 1e9
    model_bytes: int = 0
    model_memory_gb: float = field(default=math.nan, init=False)  # model_bytes / 1e9
    # roofline
    bytes_per_token: float = math.nan
    achieved_gbps: float = math.nan
    host_gbps: float = math.nan
    roofline_frac: float = math.nan
    # correctness
    tokens: list[int] = field(default_factory=list)  # generated ids (of the first sequence of a batch)
    tokens_sha: str = field(default="", init=False)
    prompt_ids: list[int] = field(default_factory=list)
    batch_tokens: list[list[int]] = field(default_factory=list)  # every sequence's generated ids
    batch_prompt_ids: list[list[int]] = field(default_factory=list)
    match_tokens: int = -1  # leading greedy tokens equal to the reference's on the corpus text prompt; -1: not compared
    batch_match_tokens: list[int] = field(default_factory=list)  # per sequence, on the speed prompts
    # fidelity on the natural-text corpus (engine.measure.fidelity), llama-perplexity's statistics
    kld_mean: float = math.nan
    kld_p99: float = math.nan
    same_top_p: float = math.nan
    same_top_p_err: float = math.nan
    rms_dp: float = math.nan
    fidelity_positions: int = 0
    fidelity_s: float = math.nan  # this run's time on the fidelity pass (about 0 when cached)
    kl_vs_reference: float = math.nan  # = kld_mean, kept for readers of earlier files
    top1_agreement: float = math.nan  # = same_top_p, likewise
    # provenance
    host: str = ""
    cpu: str = ""
    node: str = ""  # cluster node name (`bench sweep --ray`); empty for a local run
    ray_node_id: str = ""
    node_gpu: str = ""
    os: str = ""
    python: str = ""
    framework_version: str = ""
    bench_version: str = __version__
    git_commit: str = ""
    timestamp: str = ""
    cpu_governor: str = ""
    load_avg_1m: float = math.nan
    other_cpu_frac: float = math.nan
    schedule: str = ""  # interleaved or sequential
    measured_at: str = ""  # UTC start of this repeat, ISO 8601 with milliseconds
    extra: dict[str, Any] = field(default_factory=dict)  # backend details (fallback blocks, BEAM level, ...)
    # JSONL only
    itl_s: list[float] = field(default_factory=list)

    jsonl_only: ClassVar[tuple[str, ...]] = ("itl_s",)

    def __post_init__(self) -> None:
        super().__post_init__()
        derived = dict(first_token_time=self.ttft_s, jit_compilation_time=self.compile_s,
                       model_loading_time=self.load_s, peak_memory_gb=self.peak_rss_bytes / 1e9 if self.peak_rss_bytes
                       else math.nan, model_memory_gb=self.model_bytes / 1e9 if self.model_bytes else math.nan,
                       tokens_sha=hashlib.sha1(" ".join(map(str, self.tokens)).encode()).hexdigest()[:12]
                       if self.tokens else "")
        for name, value in derived.items():  # the aliases and derived columns, computed in one place
            object.__setattr__(self, name, value)


JSONL_ONLY = BenchmarkResult.jsonl_only


def csv_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """A typed row (`as_dict`) flattened for the CSV: id lists space-joined (a list per sequence
    '|'-joined), flags ';'-joined, `extra` as JSON text, NaN as an empty cell."""
    out = {}
    for k, v in row.items():
        if k == "flags" and not isinstance(v, str):
            v = ";".join(v)
        elif isinstance(v, dict):
            v = json.dumps(v, sort_keys=True, default=json_default) if v else ""
        elif isinstance(v, (list, tuple)) and v and isinstance(v[0], (list, tuple)):
            v = "|".join(" ".join(map(str, seq)) for seq in v)
        elif isinstance(v, (list, tuple)):
            v = " ".join(map(str, v))
        elif v is None or (isinstance(v, float) and math.isnan(v)):
            v = ""
        out[k] = v
    return out


def json_default(v: Any) -> Any:
    """numpy scalars and arrays in rows and messages become plain JSON values."""
    if hasattr(v, "tolist"):
        return v.tolist()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


@cache
def _git_commit() -> str:
    root = Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


@cache
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_cpu() -> str:
    """The CPU as rows name it: model and logical core count."""
    return f"{cpu_name()} x{os.cpu_count()}"


def provenance() -> dict[str, str]:
    return {
        "host": socket.gethostname(),
        "cpu": host_cpu(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
