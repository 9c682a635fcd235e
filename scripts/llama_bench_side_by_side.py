"""llama.cpp's own llama-bench beside `bench run -f llamacpp` on the same files, threads and lengths:

    python scripts/llama_bench_side_by_side.py MODEL... [-t 2] [-p 32] [-n 16] [-r 3] [--rounds 2]

MODEL is anything `bench run -m` takes (a path, `default`, `synth:llama-3.1-8b:q4_k_m`). Prints a
markdown table of llama-bench's tg tok/s, bench's decode tok/s and their ratio (medians of the rounds).
"""

import argparse
import sys

from engine.errors import BenchError
from engine.measure.llama_bench import markdown, side_by_side
from engine.model.catalog import resolve_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-p", "--prompt-tokens", type=int, default=32)
    ap.add_argument("-n", "--gen-tokens", type=int, default=16)
    ap.add_argument("-r", "--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="llama-bench then bench, this many times (A B A B)")
    a = ap.parse_args()
    try:
        results = [side_by_side(resolve_model(m), a.threads, a.prompt_tokens, a.gen_tokens, a.repeats, a.rounds)
                   for m in a.models]
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
