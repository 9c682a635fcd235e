"""Memory of a measured process: the kernel's high-water mark of its own address space (read by
the process itself, reset at each cell where the kernel allows) and RSS/USS sampled from outside
by the parent, so no sampler thread competes with the measured loop for the GIL or a core."""

from __future__ import annotations

import resource
import sys
import time

import psutil

CLEAR_REFS = "/proc/self/clear_refs"


class PeakRss:
    """The peak resident memory of this process since `scope` began.

    Linux: `VmHWM` of /proc/self/status, the high-water mark of this process's own mm (never
    `ru_maxrss`, which a child inherits over fork+exec from whoever spawned it). `reset()` writes
    "5" to /proc/self/clear_refs, which sets VmHWM to the current RSS (Linux 4.0+): the scope is
    then `cell`. Where that write is refused, or off Linux, the scope stays `process` (since the
    process started). macOS: `ru_maxrss` in bytes, the process's peak resident size; it cannot be
    reset."""

    def __init__(self, clear_refs: str = CLEAR_REFS) -> None:
        self.clear_refs, self.scope = clear_refs, "process"

    def reset(self) -> None:
        try:
            with open(self.clear_refs, "w") as f:
                f.write("5")
            self.scope = "cell"
        except OSError:  # not Linux, an old kernel, or a sandbox that forbids it
            self.scope = "process"

    def bytes(self) -> int:
        if sys.platform == "linux":
            with open("/proc/self/status") as f:
                kib = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
            return int(kib) * 1024
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024  # macOS reports bytes, the BSDs KiB


class ProcessSampler:
    """Peak RSS and USS of another process, sampled whenever `sample()` is called. RSS is one read
    of statm. USS walks every page of the process (/proc/PID/smaps: 2 ms for a 100 MB process,
    0.1-0.2 s for a 19 GB one, CPU taken from a measured child on a small host), so a USS read
    waits until the reads so far have cost at most `uss_cpu_share` of one core."""

    def __init__(self, pid: int, uss_cpu_share: float = 0.01):
        self._proc = psutil.Process(pid)
        self.uss_cpu_share = uss_cpu_share
        self.rss_peak = self.uss_peak = 0
        self._uss_due = 0.0  # monotonic time of the next USS read

    def reset(self) -> None:
        self.rss_peak = self.uss_peak = 0
        self._uss_due = 0.0

    def sample(self) -> None:
        try:
            self.rss_peak = max(self.rss_peak, self._proc.memory_info().rss)
            now = time.monotonic()
            if self.uss_cpu_share and now >= self._uss_due:
                self.uss_peak = max(self.uss_peak, self._proc.memory_full_info().uss)
                self._uss_due = now + (time.monotonic() - now) / self.uss_cpu_share
        except psutil.AccessDenied:  # USS needs /proc/PID/smaps; absent on some hosts
            self.uss_cpu_share = 0.0
        except (psutil.Error, OSError):  # the process is gone: keep what was seen
            pass
