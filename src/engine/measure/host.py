"""Host state around a measurement, read by the parent: the CPU frequency governor, the load
average before a cell, and how much of the host's CPU other processes took during it. A cell
that shared the machine is flagged `contended`, so a slow number can be told from a slow host."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

CONTENDED_SHARE = 0.10  # other processes' share of the host's CPU capacity that flags a cell


def cpu_governor() -> str:
    try:
        return Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor").read_text().strip()
    except OSError:
        return ""  # not exposed (virtual machines, macOS)


@dataclass(frozen=True)
class HostState:
    cpu_governor: str
    load_avg_1m: float  # before the cell
    other_cpu_frac: float  # other processes' CPU time / (wall time x cores) during the cell

    @property
    def contended(self) -> bool:
        return self.other_cpu_frac > CONTENDED_SHARE


class HostMonitor:
    """Accounts the host's busy CPU time while a cell runs (`resume` ... `pause`, repeatedly when
    its repeats are interleaved with other cells'), minus what the measuring process tree and
    this (parent) process used."""

    def __init__(self, pid: int):
        self._child = psutil.Process(pid)
        self._me = psutil.Process()
        self._load = os.getloadavg()[0]
        self.wall = self.busy = self.own = 0.0
        self.resume()

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def _own(self) -> float:
        total = 0.0
        for p in (self._child, self._me):
            try:
                c = p.cpu_times()
                total += c.user + c.system + c.children_user + c.children_system
            except psutil.Error:  # the child is gone: its time is lost, which only lowers `own`
                pass
        return total

    def resume(self) -> None:
        self._t, self._busy0, self._own0 = time.monotonic(), self._busy(), self._own()

    def pause(self) -> float:
        """Stop accounting; the wall seconds since `resume`."""
        wall = time.monotonic() - self._t
        self.wall += wall
        self.busy += self._busy() - self._busy0
        self.own += self._own() - self._own0
        return wall

    def state(self) -> HostState:
        other = max(0.0, self.busy - self.own) / (max(self.wall, 1e-9) * (os.cpu_count() or 1))
        return HostState(cpu_governor(), self._load, other)
