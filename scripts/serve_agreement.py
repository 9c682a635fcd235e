"""Start one server and compare `vllm bench serve` with `bench serve --url` on it: `--rounds`
back-to-back alternations per concurrency, then a markdown table of the medians and the paired ratios.

    PYTHONPATH=src python scripts/serve_agreement.py -s llama-server [-s vllm] [-m default]
        [-c 1 -c 4] [--requests 16] [--prompt-tokens 64] [-n 32] [--rounds 5] [--out DIR]

Each server is started once (`--parallel` = the highest concurrency for llama-server), every run
gets prompts no other run used, and the server is stopped (its whole process group) at the end.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from engine.errors import BenchError  # noqa: E402
from engine.model.catalog import resolve_model  # noqa: E402
from engine.model.spec import ModelSpec  # noqa: E402
from engine.serve.agreement import Workload, alternate, start_server, summarize, table, vllm_python  # noqa: E402
from engine.serve.export import export_checkpoint  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("-s", "--server", action="append", required=True)
    p.add_argument("-m", "--model", default="default")
    p.add_argument("-c", "--concurrency", type=int, action="append")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("-n", "--gen-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)  # medians of 3 swing by ~10% at c=4 on 2 cores
    p.add_argument("--out", default="")
    a = p.parse_args()
    model = resolve_model(a.model)
    out = Path(a.out or tempfile.mkdtemp(prefix="serve-agreement-"))
    out.mkdir(parents=True, exist_ok=True)
    python, tokenizer = vllm_python(), str(export_checkpoint(model))
    concurrencies = a.concurrency or [1, 4]
    rows = []
    try:
        for name in a.server:
            runs_dir = out / name  # each server's runs apart: both clients' files are named by level and seed
            runs_dir.mkdir(exist_ok=True)
            server, served = start_server(name, model, max(concurrencies), a.prompt_tokens + a.gen_tokens, runs_dir)
            try:
                for c in concurrencies:
                    w = Workload(c, a.requests, a.prompt_tokens, a.gen_tokens, seed=1000 * c)
                    runs = alternate(server.url, served, model, tokenizer, python, w, a.rounds, runs_dir)
                    (runs_dir / f"c{c}.json").write_text(json.dumps(runs))
                    rows.append((name, c, summarize(runs)))
                    print(table(rows[-1:]), file=sys.stderr)
            finally:
                server.stop()
    except (BenchError, RuntimeError) as e:  # a client that failed, or lost requests run after run
        print(f"error: {str(e).splitlines()[0]} (levels done: {len(rows)}; raw runs in {out})", file=sys.stderr)
        return 1
    print(f"model {ModelSpec.open(model).name}, {a.requests} requests, {a.prompt_tokens}-token prompts, "
          f"{a.gen_tokens} forced output tokens, medians of {a.rounds} alternations (raw runs in {out})")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
