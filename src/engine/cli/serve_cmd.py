"""`bench serve`: load tests of real inference servers on the same model (engine.serve)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import click

from engine.errors import InputError

POSITIVE = click.IntRange(min=1)
COLUMNS = (("server", False), ("load", False), ("ok/fail", True), ("req/s", True), ("out tok/s", True),
           ("TTFT p50/p99 ms", True), ("TPOT p50 ms", True), ("ITL p50/p99 ms", True), ("E2EL p50 ms", True),
           ("goodput", True), ("match", True), ("diverged", True), ("startup s", True), ("status", False))


def _ms(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{v * 1e3:.1f}"


def summary_cells(r) -> list[str]:
    load = f"c={r.concurrency}" if r.profile == "concurrency" else f"{r.rate_rps:g} req/s"
    if r.status not in ("ok",):
        return [r.server, load] + ["-"] * 11 + [f"{r.status}: {r.error[:90]}"]
    fmt = lambda v, spec=".1f": "-" if math.isnan(v) else format(v, spec)  # noqa: E731
    match = "-" if r.match_tokens < 0 else f"{r.match_tokens}/{r.gen_tokens}"  # the fewest over checked requests
    ties = f" ({r.near_tie_requests} ties)" if r.near_tie_requests else ""
    diverged = f"{r.diverged_requests}/{r.checked_requests}{ties}" if r.checked_requests else "-"
    return [r.server, load, f"{r.requests_ok}/{r.requests_failed}", fmt(r.request_throughput_rps, ".2f"),
            fmt(r.output_tps), f"{_ms(r.ttft_p50_s)}/{_ms(r.ttft_p99_s)}", _ms(r.tpot_p50_s),
            f"{_ms(r.itl_p50_s)}/{_ms(r.itl_p99_s)}", _ms(r.e2el_p50_s), fmt(r.goodput_rps, ".2f"), match, diverged,
            fmt(r.startup_s), " ".join(("ok", *r.flags))]


def print_serve_rows(rows: Sequence[Any], fmt: str, out) -> None:
    from engine.results.writers import CsvPrinter, JsonlPrinter, markdown_table
    from engine.serve.rows import ServeResult

    if fmt in ("csv", "jsonl"):
        p = CsvPrinter(out, ServeResult.csv_columns()) if fmt == "csv" else JsonlPrinter(out)
        p.header()
        p.rows(rows)
        return
    if fmt == "markdown":
        out.write(markdown_table([c for c, _ in COLUMNS], (summary_cells(r) for r in rows)) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(header_style="bold")
    for col, right in COLUMNS:
        t.add_column(col, justify="right" if right else "left")
    for r in rows:
        t.add_row(*summary_cells(r))
    Console(file=out, highlight=False, width=None if out.isatty() else 200).print(t)


def _server_options(items: Sequence[str]) -> dict[str, int]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if key != "parallel" or not sep or not value.isdigit() or int(value) < 1:
            raise InputError(f"-o takes parallel=N (N >= 1), got {item!r}")
        out[key] = int(value)
    return out


def _find_max(o: dict[str, Any], levels: list, slo):
    """The --find-max search: over --rate when one is given, else concurrency, from the first level."""
    from engine.serve.findmax import FindMax

    if not o["find_max"]:
        return None
    if slo.empty:
        raise InputError("--find-max needs --slo ttft_ms=..,tpot_ms=.. (the limits a level must meet)")
    profile = "rate" if o["rate"] else "concurrency"
    start = o["rate"][0] if o["rate"] else (o["concurrency"][0] if o["concurrency"] else 1)
    return FindMax(profile, float(start), float(o["find_max_limit"]), o["slo_fraction"])


def _calibrate() -> int:
    from engine.serve.capacity import cache_file, client_capacity

    c = client_capacity(recalibrate=True)
    print(f"client capacity: {c['client_capacity_rps']:.0f} requests/s, {c['client_capacity_chunks_per_s']:.0f} "
          f"chunks/s (cached in {cache_file()})")
    return 0


def _done_levels(writer) -> frozenset[str]:
    """The level ids --resume skips: rows of the file with status ok."""
    from engine.results.writers import read_jsonl

    rows = read_jsonl(writer.jsonl_path) if writer.jsonl_path.exists() else []
    return frozenset(r["level_id"] for r in rows if r.get("status") == "ok" and r.get("level_id"))


@click.command()
@click.option("--server", "-s", multiple=True,
              help="server to start: llama-server, llama-cpp-python, vllm, mlx, transformers, transformers-cb (repeatable)")
@click.option("--url", multiple=True, help="a running OpenAI-compatible endpoint (repeatable)")
@click.option("--server-command", multiple=True, metavar="NAME=CMD",
              help="any server command line, with {host} {port} and {model} or {checkpoint} filled in")
@click.option("--api-key-env", default="", metavar="VAR", help="environment variable holding the --url API key")
@click.option("--served-model", default="", help="`model` field sent to --url endpoints (default: their first)")
@click.option("--ignore-eos", is_flag=True,
              help="send `ignore_eos` to --url endpoints, so every request runs to --gen-tokens (as vllm bench serve's)")
@click.option("--model", "-m", default="default", show_default=True, help="GGUF path, 'default', or synth:SHAPE")
@click.option("--concurrency", "-c", type=POSITIVE, multiple=True, help="closed-loop concurrency level (repeatable)")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), multiple=True,
              help="open-loop Poisson arrival rate, requests/s (repeatable)")
@click.option("--requests", type=POSITIVE, default=16, show_default=True, help="requests per level")
@click.option("--duration", type=click.FloatRange(min=0), default=0.0, help="seconds per level (instead of --requests)")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="unmeasured requests per level")
@click.option("--prompt-tokens", type=POSITIVE, default=64, show_default=True, help="seeded prompt length")
@click.option("--gen-tokens", "-n", type=POSITIVE, default=32, show_default=True, help="tokens per request")
@click.option("--dataset", default="", help="JSONL file of {\"prompt\": TEXT} (instead of seeded prompts)")
@click.option("--slo", default="", metavar="ttft_ms=..,tpot_ms=..", help="goodput: requests meeting these limits")
@click.option("--metrics-as", type=click.Choice(["vllm", "guidellm", "aiperf", "mlperf"]), default="vllm",
              show_default=True, help="whose metric definitions the rows use (docs/results-schema.md)")
@click.option("--find-max", is_flag=True, help="search the highest concurrency (or --rate) that meets --slo")
@click.option("--find-max-limit", type=click.FloatRange(min=0, min_open=True), default=32, show_default=True,
              help="the highest level --find-max tries")
@click.option("--slo-fraction", type=float, default=0.9, show_default=True,
              help="--find-max: share of a level's requests that must meet --slo")
@click.option("--server-option", "-o", multiple=True, metavar="parallel=N",
              help="server option: parallel=N (llama-server slots; default: the highest concurrency, 1 for --rate)")
@click.option("--threads", "-t", type=click.IntRange(min=0), default=0, help="server threads (0: all cores)")
@click.option("--startup-timeout", type=float, default=600.0, show_default=True, help="seconds to become healthy")
@click.option("--request-timeout", type=float, default=60.0, show_default=True,
              help="a request receiving nothing this long fails (the server counts as hung)")
@click.option("--check", type=click.IntRange(min=0), default=4, show_default=True,
              help="distinct prompts whose tokens are checked against the reference (0: none)")
@click.option("--seed", type=int, default=0)
@click.option("--output", "-O", help="results CSV (JSONL with per-request samples beside it)")
@click.option("--resume", is_flag=True, help="continue --output: levels already in it with status ok are not run again")
@click.option("--calibrate", is_flag=True,
              help="measure again what this client can time (requests/s, chunks/s: cached, in every row)")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "jsonl", "markdown"]), default="table")
def serve(**o) -> int:
    """Load-test real inference servers (started here on the same weights, or --url)."""
    from engine.cli import display
    from engine.model.catalog import resolve_model
    from engine.results.rows import new_run_id
    from engine.results.writers import ResultWriter
    from engine.serve.load import Level, LoadSpec
    from engine.serve.metrics import parse_slo
    from engine.serve.rows import ServeResult
    from engine.serve.run import Endpoint, ServePlan, run_serve
    from engine.serve.servers import command_kind, server_kind

    servers: list[Any] = [server_kind(n) for n in o["server"]] + [command_kind(c) for c in o["server_command"]]
    servers += [Endpoint(u, o["api_key_env"]) for u in o["url"]]
    if o["calibrate"] and not servers:
        return _calibrate()
    if not servers:
        raise InputError("name at least one --server, --server-command or --url (or --calibrate alone)")
    levels = [Level("concurrency", c) for c in o["concurrency"]] + [Level("rate", r) for r in o["rate"]]
    slo = parse_slo(o["slo"])
    if o["resume"] and not o["output"]:
        raise InputError("--resume needs --output naming the results file to continue")
    out = Path(o["output"]) if o["output"] else Path("results") / f"serve-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    writer = ResultWriter(out, ServeResult, continuing=o["resume"])  # a file with rows only through --resume
    plan = ServePlan(model=resolve_model(o["model"]), servers=servers, levels=levels or [Level("concurrency", 1)],
                     load=LoadSpec(o["requests"], o["duration"], o["warmup"], o["request_timeout"], o["seed"]),
                     prompt_tokens=o["prompt_tokens"], gen_tokens=o["gen_tokens"], dataset=o["dataset"],
                     slo=slo, threads=o["threads"], startup_timeout_s=o["startup_timeout"],
                     check_prompts=o["check"], served_model=o["served_model"], log_dir=out.parent / "serve-logs",
                     metrics_as=o["metrics_as"], parallel=_server_options(o["server_option"]).get("parallel", 0),
                     find_max=_find_max(o, levels, slo), done_levels=_done_levels(writer) if o["resume"] else frozenset(),
                     recalibrate=o["calibrate"], ignore_eos=o["ignore_eos"])
    display.stderr.print(f"{len(servers)} server(s) x {len(plan.levels)} level(s) -> {out}")

    def on_row(row) -> None:
        writer.write([row])
        display.stderr.print("  " + " | ".join(summary_cells(row)))

    rows = run_serve(plan, new_run_id(), on_row, on_status=lambda s: display.stderr.print(s))
    print_serve_rows(rows, o["fmt"], sys.stdout)
    display.stderr.print(f"wrote {len(rows)} row(s) to {out} and {writer.jsonl_path}")
    failed = [r for r in rows if r.status not in ("ok", "unavailable")]
    return 1 if failed else 0
