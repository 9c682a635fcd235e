"""ServeResult: one typed row per (server, load level) of `bench serve`.

Same conventions as BenchmarkResult: units in field names, NaN for what was not measured, raw
per-request samples in the JSONL only, the CSV flattened by `results.rows.csv_record`.
docs/results-schema.md describes every column and tests/test_schema.py keeps the two in step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from engine import __version__
from engine.results.rows import TypedRow


@dataclass(frozen=True)
class ServeResult(TypedRow):
    # identity
    run_id: str = ""
    level_id: str = ""
    status: str = "ok"
    error: str = ""
    flags: tuple[str, ...] = ()  # diverged, some_failed, short, not_sent, prefix_cached, slo_met, find_max
    # the server
    server: str = ""
    server_version: str = ""
    server_command: str = ""
    server_log: str = ""
    server_url: str = ""
    startup_s: float = math.nan
    weights: str = ""  # the GGUF, or the checkpoint exported from it
    # the workload
    model: str = ""
    model_size: str = ""
    prompt_source: str = ""  # token_ids, text (decoded from seeded ids), dataset
    prompt_tokens: int = 0
    gen_tokens: int = 0
    ignore_eos: bool = False
    profile: str = ""  # concurrency or rate
    concurrency: int = 0
    rate_rps: float = math.nan
    warmup_requests: int = 0
    # the level's outcome
    metrics_definition: str = "vllm"  # vllm, guidellm, aiperf, mlperf (--metrics-as)
    requests_ok: int = 0
    requests_failed: int = 0
    requests_not_sent: int = 0
    duration_s: float = math.nan
    request_throughput_rps: float = math.nan
    output_tps: float = math.nan
    input_tokens_total: int = 0
    output_tokens_total: int = 0
    output_tokens_mean: float = math.nan
    usage_completion_tokens_total: int = 0
    output_tokens_client_total: int = 0
    short_requests: int = 0
    cached_prompt_tokens_total: int = -1
    send_lag_mean_s: float = math.nan  # the client's lag behind the schedule (open loop; 0 closed)
    send_lag_max_s: float = math.nan
    ttft_mean_s: float = math.nan
    ttft_p50_s: float = math.nan
    ttft_p90_s: float = math.nan
    ttft_p99_s: float = math.nan
    tpot_mean_s: float = math.nan
    tpot_p50_s: float = math.nan
    tpot_p90_s: float = math.nan
    tpot_p99_s: float = math.nan
    itl_mean_s: float = math.nan
    itl_p50_s: float = math.nan
    itl_p90_s: float = math.nan
    itl_p99_s: float = math.nan
    e2el_mean_s: float = math.nan
    e2el_p50_s: float = math.nan
    e2el_p90_s: float = math.nan
    e2el_p99_s: float = math.nan
    slo_ttft_s: float = math.nan
    slo_tpot_s: float = math.nan
    slo_e2el_s: float = math.nan
    goodput_rps: float = math.nan
    goodput_frac: float = math.nan
    # correctness at temperature 0
    checked_requests: int = 0
    match_tokens: int = -1  # fewest leading tokens equal to the reference's over checked requests
    diverged_requests: int = 0  # left the reference where it was no near tie
    near_tie_requests: int = 0  # left it at a near tie of the reference's own logits
    # provenance
    host: str = ""
    cpu: str = ""
    os: str = ""
    python: str = ""
    bench_version: str = __version__
    git_commit: str = ""
    client_capacity_rps: float = math.nan  # what this client can time (engine.serve.capacity)
    client_capacity_chunks_per_s: float = math.nan
    timestamp: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # JSONL only
    requests: list[dict[str, Any]] = field(default_factory=list)

    jsonl_only: ClassVar[tuple[str, ...]] = ("requests",)


SERVE_JSONL_ONLY = ServeResult.jsonl_only

