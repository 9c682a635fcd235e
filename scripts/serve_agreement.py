"""Start one server and compare `vllm bench serve` with `bench serve --url` on it: `--rounds`
back-to-back alternations per concurrency, then a markdown table of the medians.

    PYTHONPATH=src python scripts/serve_agreement.py -s llama-server [-s vllm] [-m default]
        [-c 1 -c 4] [--requests 16] [--prompt-tokens 64] [-n 32] [--rounds 3] [--out DIR]

Each server is started once (`--parallel` = the highest concurrency for llama-server), every run
gets prompts no other run used, and the server is stopped (its whole process group) at the end.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from engine.model.catalog import resolve_model  # noqa: E402
from engine.model.spec import ModelSpec  # noqa: E402
from engine.serve.agreement import Workload, alternate, medians, table, vllm_python  # noqa: E402
from engine.serve.export import export_checkpoint  # noqa: E402
from engine.serve.process import ManagedServer  # noqa: E402
from engine.serve.servers import server_kind  # noqa: E402


def start(name: str, model: str, top: int, w: Workload, log_dir: Path) -> tuple[ManagedServer, str]:
    kind = server_kind(name)
    reason = kind.availability()
    if reason:
        sys.exit(f"{name}: {reason}")
    kind.prepare()
    weights = str(export_checkpoint(model)) if kind.checkpoint else model
    context = w.prompt_tokens + w.gen_tokens + 64  # both clients' prompts, with room for re-tokenized text
    server = ManagedServer(name, kind.argv(weights, 0, context, top), log_dir / f"{name}.log", kind.health_path,
                           kind.env())
    print(f"{name}: starting {' '.join(server.argv)}", file=sys.stderr)
    server.start(900)
    return server, kind.model_name(weights)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("-s", "--server", action="append", required=True)
    p.add_argument("-m", "--model", default="default")
    p.add_argument("-c", "--concurrency", type=int, action="append")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("-n", "--gen-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="")
    a = p.parse_args()
    model = resolve_model(a.model)
    out = Path(a.out or tempfile.mkdtemp(prefix="serve-agreement-"))
    out.mkdir(parents=True, exist_ok=True)
    python, tokenizer = vllm_python(), str(export_checkpoint(model))
    concurrencies = a.concurrency or [1, 4]
    rows = []
    for name in a.server:
        server, served = start(name, model, max(concurrencies), Workload(prompt_tokens=a.prompt_tokens,
                                                                          gen_tokens=a.gen_tokens), out)
        try:
            for c in concurrencies:
                w = Workload(c, a.requests, a.prompt_tokens, a.gen_tokens, seed=1000 * c)
                runs = alternate(server.url, served, model, tokenizer, python, w, a.rounds, out)
                (out / f"{name}-c{c}.json").write_text(json.dumps(runs))
                rows.append((name, c, medians(runs)))
                print(table(rows[-1:]), file=sys.stderr)
        finally:
            server.stop()
    print(f"model {ModelSpec.open(model).name}, {a.requests} requests, {a.prompt_tokens}-token prompts, "
          f"{a.gen_tokens} forced output tokens, medians of {a.rounds} alternations (raw runs in {out})")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
