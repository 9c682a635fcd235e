"""Quantizing a GGUF with llama.cpp's own `llama-quantize` (the gguf package cannot write K-quants).

Used for synthetic files in the types people ship (Q4_K_M, Q8_0, ...): the output is written next to
its final name and renamed when complete, so an interrupted run never leaves a truncated file.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from engine.errors import BenchError, UnavailableError
from engine.paths import llama_tools_dir

# llama-quantize's type names for the file types the harness asks for
QUANT_TYPES = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q8_0": "Q8_0", "q4_k_m": "Q4_K_M",
               "q4_k_s": "Q4_K_S", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K", "f16": "F16"}


def llama_tool(name: str) -> Path:
    """The path of one of llama.cpp's tools, or UnavailableError saying how to build it."""
    where = llama_tools_dir()
    if where is None or not (where / name).is_file():
        raise UnavailableError(f"llama.cpp's {name} is not built here: run scripts/setup.sh "
                               "(or point BENCH_LLAMA_TOOLS_DIR at a build)")
    return where / name


def llama_quantize(source: str | os.PathLike, dest: str | os.PathLike, qtype: str, threads: int | None = None) -> Path:
    """Writes `dest`, `source` quantized to `qtype` (a key of QUANT_TYPES), and returns its path."""
    if qtype not in QUANT_TYPES:
        raise BenchError(f"llama-quantize: no file type {qtype!r} (known: {', '.join(QUANT_TYPES)})")
    dest = Path(dest)
    partial = dest.with_name(dest.name + ".partial")
    cmd = [str(llama_tool("llama-quantize")), str(source), str(partial), QUANT_TYPES[qtype],
           str(threads or os.cpu_count() or 1)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BenchError(f"llama-quantize {QUANT_TYPES[qtype]} of {source} failed: {tail[0]}")
    partial.replace(dest)
    return dest
