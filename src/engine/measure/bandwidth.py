"""Host memory-bandwidth probe: the roof that decode (a memory-bound matrix-vector chain) hits.

Measured once per host and CPU and cached (a host name can come back on another CPU: the VMs
this runs on do); `bench doctor --remeasure` measures again. The figure is the
best of a multi-threaded read (numpy sums over slices of a buffer far larger than the caches,
one slice per core) and an f32 matrix-vector product (the decode kernel itself).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine.paths import cache_dir
from engine.results.rows import host_cpu

BUFFER_BYTES = 512 * 2**20


def cache_name() -> str:
    cpu = hashlib.sha1(host_cpu().encode()).hexdigest()[:8]
    return f"bandwidth-{platform.node() or 'host'}-{cpu}.json"


def cache_path() -> Path:
    return cache_dir() / cache_name()


def _best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure(repeats: int = 5) -> dict[str, Any]:
    n = BUFFER_BYTES // 4
    buf = np.ones(n, dtype=np.float32)
    workers = os.cpu_count() or 1
    chunks = np.array_split(buf, workers)

    def threaded_read() -> None:  # numpy releases the GIL inside reductions
        threads = [threading.Thread(target=np.add.reduce, args=(c,)) for c in chunks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    mat = buf.reshape(-1, 4096)
    vec = np.ones(4096, dtype=np.float32)
    read_gbps = BUFFER_BYTES / _best_seconds(threaded_read, repeats) / 1e9
    gemv_gbps = BUFFER_BYTES / _best_seconds(lambda: mat @ vec, repeats) / 1e9
    return {"read_gbps": read_gbps, "gemv_gbps": gemv_gbps, "host_gbps": max(read_gbps, gemv_gbps),
            "measured_at": time.time(), "cpu": host_cpu()}


def host_bandwidth(remeasure: bool = False) -> dict[str, Any]:
    """The cached figure for this host, measuring it on first use."""
    path = cache_path()
    if not remeasure and path.exists():
        try:
            data = json.loads(path.read_text())
            if data.get("host_gbps", 0) > 0:
                return data
        except (OSError, ValueError):
            pass
    data = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
    except OSError:
        pass  # an unwritable cache costs a re-measure next time, nothing more
    return data
