"""Memory of a measured process: the kernel's high-water mark (read by the process itself) and
RSS/USS sampled from outside by the parent, so no sampler thread competes with the measured loop
for the GIL or a core."""

from __future__ import annotations

import resource
import sys

import psutil


def high_water_mark_bytes() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024  # macOS reports bytes, Linux KiB


class ProcessSampler:
    """Peak RSS and USS of another process, sampled whenever `sample()` is called. USS reads all
    of smaps (milliseconds of the sampler's CPU), so it is taken every `uss_every` samples."""

    def __init__(self, pid: int, uss_every: int = 20):
        self._proc = psutil.Process(pid)
        self.uss_every, self._n = uss_every, 0
        self.rss_peak = self.uss_peak = 0

    def reset(self) -> None:
        self.rss_peak = self.uss_peak = 0
        self._n = 0

    def sample(self) -> None:
        try:
            self.rss_peak = max(self.rss_peak, self._proc.memory_info().rss)
            if self.uss_every and self._n % self.uss_every == 0:
                self.uss_peak = max(self.uss_peak, self._proc.memory_full_info().uss)
        except psutil.AccessDenied:  # USS needs /proc/PID/smaps; absent on some hosts
            self.uss_every = 0
        except (psutil.Error, OSError):  # the process is gone: keep what was seen
            pass
        self._n += 1
