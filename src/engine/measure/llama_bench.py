"""llama.cpp's own `llama-bench` beside `bench run -f llamacpp`: the outside oracle for the llamacpp
backend's decode speed, on the same file, threads and lengths.

llama-bench's `tg` test decodes `-n` tokens one at a time after a context of `-d` tokens, which is
what a bench cell's decode does after its prompt; its `avg_ts` is tokens over the whole `tg` time,
as bench's decode_tps. Both run without flash attention (the llamacpp backend's setting). The two
run one after the other, A B A B, so drift hits both alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from engine.errors import BenchError
from engine.model.quantize import llama_tool


@dataclass(frozen=True)
class SideBySide:
    model: str
    threads: int
    prompt_tokens: int
    gen_tokens: int
    llama_bench_tps: list[float]  # llama-bench's tg tok/s, one per round
    bench_tps: list[float]  # bench's decode tok/s (mean over its repeats), one per round
    flash_attn: str  # what llama-bench ran with

    @property
    def ratio(self) -> float:
        """bench over llama-bench, medians of the rounds."""
        return _median(self.bench_tps) / _median(self.llama_bench_tps)


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2


def llama_bench_tg(model: str, threads: int, prompt_tokens: int, gen_tokens: int, repeats: int) -> tuple[float, str]:
    """llama-bench's decode tok/s after `prompt_tokens` of context, and its flash-attention setting."""
    # flash attention off, as the llamacpp backend runs it (llama-bench's default, auto, turns it on here)
    cmd = [str(llama_tool("llama-bench")), "-m", model, "-t", str(threads), "-p", "0", "-n", str(gen_tokens),
           "-d", str(prompt_tokens), "-r", str(repeats), "-fa", "off", "-o", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BenchError(f"llama-bench on {model} failed: {tail[0]}")
    tests = [t for t in json.loads(done.stdout) if t["n_gen"] == gen_tokens and t["n_prompt"] == 0]
    if not tests:
        raise BenchError(f"llama-bench on {model} reported no tg{gen_tokens} test")
    return float(tests[0]["avg_ts"]), str(tests[0].get("flash_attn", "?"))


def bench_decode_tps(model: str, threads: int, prompt_tokens: int, gen_tokens: int, repeats: int) -> float:
    """`bench run -f llamacpp` on the file (a subprocess, as a user runs it): mean decode tok/s."""
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.csv"
        cmd = [sys.executable, "-m", "engine", "run", "-f", "llamacpp", "-m", model, "--threads", str(threads),
               "--prompt-tokens", str(prompt_tokens), "-n", str(gen_tokens), "-r", str(repeats), "--warmup", "1",
               "--no-check", "-O", str(out), "--format", "csv"]
        src = str(Path(__file__).resolve().parents[2])  # this checkout's engine and backends, first
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
            raise BenchError(f"bench run -f llamacpp on {model} failed: {tail[0]}")
        df = pd.read_csv(out)
    return float(df.decode_tps.mean())


def side_by_side(model: str, threads: int, prompt_tokens: int, gen_tokens: int, repeats: int = 3,
                 rounds: int = 2) -> SideBySide:
    ours, theirs, fa = [], [], "?"
    for _ in range(rounds):
        tps, fa = llama_bench_tg(model, threads, prompt_tokens, gen_tokens, repeats)
        theirs.append(tps)
        ours.append(bench_decode_tps(model, threads, prompt_tokens, gen_tokens, repeats))
    return SideBySide(model, threads, prompt_tokens, gen_tokens, theirs, ours, fa)


def markdown(results: list[SideBySide]) -> str:
    lines = ["| model | threads | prompt | gen | llama-bench flash attn | llama-bench tg tok/s | "
             "bench llamacpp decode tok/s | rounds (llama-bench; bench) | ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rounds = f"{', '.join(f'{x:.2f}' for x in r.llama_bench_tps)}; {', '.join(f'{x:.2f}' for x in r.bench_tps)}"
        lines.append(f"| {Path(r.model).name} | {r.threads} | {r.prompt_tokens} | {r.gen_tokens} | "
                     f"{r.flash_attn} | {_median(r.llama_bench_tps):.2f} | {_median(r.bench_tps):.2f} | {rounds} | "
                     f"{r.ratio:.3f} |")
    return "\n".join(lines)
