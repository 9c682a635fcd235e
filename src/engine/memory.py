"""MemoryTracker: RSS/USS sampled on a thread, the kernel's high-water mark, and the backend's
own allocator figures. One run per process makes the high-water mark that run's own."""

from __future__ import annotations

import os
import resource
import sys
import threading
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class MemorySummary:
    peak_rss_bytes: int  # kernel high-water mark of this process (VmHWM / ru_maxrss)
    sampled_rss_peak_bytes: int
    sampled_uss_peak_bytes: int  # memory unique to this process (excludes shared pages)


def high_water_mark_bytes() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024  # macOS reports bytes, Linux KiB


class MemoryTracker:
    """Samples RSS every `interval` s and USS every `uss_every` samples. USS reads all of smaps,
    which costs milliseconds of CPU: sampled rarely so the tracker does not slow the run it measures."""

    def __init__(self, interval: float = 0.02, uss_every: int = 50):
        self.interval, self.uss_every = interval, uss_every
        self._proc = psutil.Process(os.getpid())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rss_peak = self.uss_peak = 0

    def _sample(self, with_uss: bool) -> None:
        try:
            self.rss_peak = max(self.rss_peak, self._proc.memory_info().rss)
            if with_uss:
                self.uss_peak = max(self.uss_peak, self._proc.memory_full_info().uss)
        except (psutil.Error, OSError):  # USS needs /proc/PID/smaps; absent on some hosts
            self.uss_every = 0

    def _loop(self) -> None:
        i = 0
        while not self._stop.wait(self.interval):
            i += 1
            self._sample(bool(self.uss_every) and i % self.uss_every == 0)

    def __enter__(self) -> "MemoryTracker":
        self._sample(True)
        self._thread = threading.Thread(target=self._loop, name="memory-tracker", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample(bool(self.uss_every))

    def summary(self) -> MemorySummary:
        return MemorySummary(high_water_mark_bytes(), self.rss_peak, self.uss_peak)
