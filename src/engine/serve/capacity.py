"""The client's own capacity: how many requests/s and streamed chunks/s `engine.serve.load` can
time on this host, measured once against the zero-delay mock (`engine.serve.mock`, its own
process) and cached per host, Python, aiohttp and harness version. Every `bench serve` row carries
the two figures: a level near either measures the client, not the server.
"""

from __future__ import annotations

import json
import platform
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from engine import __version__
from engine.paths import cache_dir

RPS_REQUESTS, RPS_CONCURRENCY = 400, 16  # one-chunk requests
CHUNK_STREAMS, CHUNKS_PER_STREAM = 4, 1000


def cache_file() -> Path:
    return cache_dir() / "serve-client-capacity.json"


def _key() -> str:
    import aiohttp

    return (f"{socket.gethostname()}|python {platform.python_version()}|aiohttp {aiohttp.__version__} "
            f"(connections kept alive)|bench {__version__}")


def measure() -> dict[str, float]:
    """Start the mock, drive it at full speed twice (one-chunk requests, long streams), stop it."""
    from engine.serve.load import Level, LoadSpec, run_level
    from engine.serve.process import ManagedServer

    log = Path(tempfile.gettempdir()) / "llm-bench-capacity-mock.log"
    mock = ManagedServer("capacity-mock", [sys.executable, str(Path(__file__).with_name("mock.py")), "--port",
                                           "{port}"], log)
    mock.start(timeout_s=30)
    try:
        def body(n: int):
            return lambda i: (0, {"model": "mock", "prompt": "x", "max_tokens": n, "stream": True})

        short = run_level(mock.url, Level("concurrency", RPS_CONCURRENCY), LoadSpec(RPS_REQUESTS, warmup=RPS_CONCURRENCY),
                          body(1))
        long = run_level(mock.url, Level("concurrency", CHUNK_STREAMS), LoadSpec(CHUNK_STREAMS, warmup=1),
                         body(CHUNKS_PER_STREAM))
    finally:
        mock.stop()
    if not all(r.ok for r in short.records + long.records):
        raise RuntimeError("the capacity mock failed a request: " + next(r.error for r in short.records + long.records
                                                                         if not r.ok))
    chunks = sum(len(r.chunks) for r in long.records)
    return {"client_capacity_rps": len(short.records) / short.duration_s,
            "client_capacity_chunks_per_s": chunks / long.duration_s}


def client_capacity(recalibrate: bool = False, on_status: Callable[[str], None] = lambda s: None) -> dict[str, float]:
    """The cached figures for this host and client, measured first where there are none (or on
    `recalibrate`)."""
    path, key = cache_file(), _key()
    cached: dict[str, Any] = {}
    if path.exists():
        try:
            cached = json.loads(path.read_text())
        except ValueError:
            cached = {}  # a torn file: measure again
    if key in cached and not recalibrate:
        return cached[key]
    on_status(f"calibrating the client against a local mock (cached in {path})")
    cached[key] = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cached, indent=1))
    tmp.replace(path)
    return cached[key]
