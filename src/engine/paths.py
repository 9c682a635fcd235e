"""Where the harness keeps what it makes once and reuses: bandwidth figures, synthetic models,
exported checkpoints. `BENCH_CACHE_DIR` moves it (tests point it at a temporary folder)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("BENCH_CACHE_DIR") or Path.home() / ".cache" / "llm-bench")
