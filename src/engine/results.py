"""BenchmarkResult rows and the writers that append them (CSV + JSONL), flushed and fsynced.

One row per measured repeat. A failed cell is one row with its status and error. The CSV is the
contract with notebooks and `bench report`; docs/results-schema.md describes every column and a
test keeps the two in step.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import socket
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any, Iterable

from engine import __version__
from engine.errors import InputError

STATUSES = ("ok", "error", "crash", "oom", "timeout", "unavailable")


@dataclass(frozen=True)
class BenchmarkResult:
    # identity
    run_id: str = ""
    cell_id: str = ""
    repeat: int = 0
    status: str = "ok"
    error: str = ""
    flags: str = ""  # ';'-joined: noisy, over_roofline, diverged
    # what ran
    framework: str = ""
    precision: str = ""
    device: str = ""
    model: str = ""
    model_size: str = ""
    prompt_tokens: int = 0
    gen_tokens: int = 0
    threads: int = 0
    optimization_level: str = ""
    iterations: int = 0  # measured repeats in this cell
    # time
    load_s: float = math.nan
    warmup_s: float = math.nan
    compile_s: float = math.nan
    ttft_s: float = math.nan
    prefill_tps: float = math.nan
    decode_tps: float = math.nan
    itl_p50_s: float = math.nan
    itl_p90_s: float = math.nan
    itl_p99_s: float = math.nan
    total_time: float = math.nan
    first_token_time: float = math.nan
    avg_token_time: float = math.nan
    min_token_time: float = math.nan
    max_token_time: float = math.nan
    avg_tokens_per_second: float = math.nan
    peak_tokens_per_second: float = math.nan
    jit_compilation_time: float = math.nan
    model_loading_time: float = math.nan
    # across the cell's repeats
    decode_tps_mean: float = math.nan
    decode_tps_std: float = math.nan
    decode_tps_ci95_low: float = math.nan
    decode_tps_ci95_high: float = math.nan
    decode_tps_cov: float = math.nan
    # memory
    peak_rss_bytes: int = 0
    sampled_rss_peak_bytes: int = 0
    sampled_uss_peak_bytes: int = 0
    device_memory_bytes: int = 0
    peak_memory_gb: float = math.nan
    model_bytes: int = 0
    model_memory_gb: float = math.nan
    # roofline
    bytes_per_token: float = math.nan
    achieved_gbps: float = math.nan
    host_gbps: float = math.nan
    roofline_frac: float = math.nan
    # correctness
    tokens: str = ""  # generated ids, space-separated
    tokens_sha: str = ""
    prompt_ids: str = ""
    match_tokens: int = -1  # leading tokens equal to the reference backend's; -1 when not compared
    # provenance
    host: str = ""
    cpu: str = ""
    os: str = ""
    python: str = ""
    framework_version: str = ""
    bench_version: str = __version__
    git_commit: str = ""
    timestamp: str = ""
    extra: str = ""  # JSON: backend details (fallback blocks, BEAM level, kernel cache, ...)
    # JSONL only
    itl_s: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    @classmethod
    def csv_columns(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in JSONL_ONLY]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


JSONL_ONLY = ("itl_s",)


@cache
def _git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


@cache
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict[str, str]:
    return {
        "host": socket.gethostname(),
        "cpu": f"{_cpu_name()} x{os.cpu_count()}",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def _csv_value(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return ""
    return v


def csv_text(rows: Iterable[dict[str, Any]], columns: list[str], header: bool = False) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(columns)
    for r in rows:
        w.writerow([_csv_value(r[c]) for c in columns])
    return buf.getvalue()


class ResultWriter:
    """Appends rows to FILE.csv and FILE.jsonl beside it; each `write` is one flushed, fsynced
    append, so a crash or a kill between writes loses nothing already written."""

    def __init__(self, csv_path: str | os.PathLike):
        self.csv_path = Path(csv_path)
        if self.csv_path.suffix != ".csv":
            raise InputError(f"--output must name a .csv file, got {self.csv_path}")
        self.jsonl_path = self.csv_path.with_suffix(".jsonl")
        self.columns = BenchmarkResult.csv_columns()
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        if self.csv_path.exists() and self.csv_path.stat().st_size:
            with open(self.csv_path, newline="") as f:
                header = next(csv.reader(f), [])
            if header != self.columns:
                raise InputError(f"{self.csv_path} exists with other columns; choose another --output")
            _repair_tail(self.csv_path)
            _repair_tail(self.jsonl_path)
        else:
            self._append(self.csv_path, self._csv_lines([], header=True))

    def _csv_lines(self, rows: Iterable[dict[str, Any]], header: bool = False) -> str:
        return csv_text(rows, self.columns, header)

    @staticmethod
    def _append(path: Path, text: str) -> None:
        with open(path, "a", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def write(self, rows: list[BenchmarkResult]) -> None:
        self._append(self.jsonl_path, "".join(json.dumps(r.as_dict(), default=_json_default) + "\n" for r in rows))
        self._append(self.csv_path, self._csv_lines(r.as_dict() for r in rows))


    def completed_cells(self) -> set[str]:
        """Cell ids fully written to the CSV. Rows of a cell cut short by a kill are dropped from
        both files (the cell runs again), so a resumed sweep ends with every cell exactly once."""
        with open(self.csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["cell_id"]] = counts.get(r["cell_id"], 0) + 1
        done = {r["cell_id"] for r in rows
                if r["status"] != "ok" or counts[r["cell_id"]] == int(r["iterations"] or 0)}
        if len(done) != len(counts):
            kept = [r for r in rows if r["cell_id"] in done]
            self._rewrite(self.csv_path, self._csv_lines(kept, header=True))
        if self.jsonl_path.exists():
            rows_j = read_jsonl(self.jsonl_path)
            kept_j = [r for r in rows_j if r.get("cell_id") in done]
            if len(kept_j) != len(rows_j):
                self._rewrite(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in kept_j))
        return done

    @staticmethod
    def _rewrite(path: Path, text: str) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _json_default(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def _repair_tail(path: Path) -> None:
    """Drop a last line left half-written by a killed process, so appends start on a clean line."""
    if not path.exists() or not path.stat().st_size:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue  # a torn last line from a killed writer
    return rows
