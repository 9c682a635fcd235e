"""Where the harness keeps what it makes once and reuses: bandwidth figures, synthetic models,
exported checkpoints. `BENCH_CACHE_DIR` moves it (tests point it at a temporary folder). And where
llama.cpp's own tools are, which the set-up builds outside that cache (tests keep them)."""

from __future__ import annotations

import glob
import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("BENCH_CACHE_DIR") or Path.home() / ".cache" / "llm-bench")


def compile_cache_dir() -> Path:
    """Where the frameworks' compile caches live (Backend.compile_caches names paths under it)."""
    return cache_dir() / "compile"


LLAMA_CPP_VERSION = "0.3.36"  # the llama-cpp-python sdist whose vendored llama.cpp scripts/setup.sh builds


def llama_tools_dir() -> Path | None:
    """Where llama.cpp's own tools (llama-server, llama-quantize, llama-bench) are: $BENCH_LLAMA_TOOLS_DIR,
    else the build scripts/setup.sh keeps per version and build flags in ~/.cache/llm-bench/llama-tools."""
    if os.environ.get("BENCH_LLAMA_TOOLS_DIR"):
        return Path(os.environ["BENCH_LLAMA_TOOLS_DIR"])
    builds = sorted(glob.glob(str(Path.home() / ".cache" / "llm-bench" / "llama-tools" /
                                  f"llama-cpp-{LLAMA_CPP_VERSION}-*" / "llama-server")))
    return Path(builds[-1]).parent if builds else None

