"""Whether a load fits, decided before it is made: the backend's own estimate of its need
(`Backend.estimate_bytes`) against what the measuring process may use, the smaller of the cell's
`--memory-limit-mb` and this host's available memory less a margin. A mode that would not fit is
refused with the bytes it needs and the limit (an `oom` row), never loaded into the kernel's OOM
killer. A cell's limit is enforced as the process's address-space limit (RLIMIT_AS) from its
first admitted load on, so an allocation beyond it is a MemoryError (an `oom` row too)."""

from __future__ import annotations

import resource
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import psutil

from engine.errors import OutOfMemoryError
from engine.generate.backend import Backend, LoadOptions
from engine.model.footprint import MemoryNeed, mb

if TYPE_CHECKING:
    from engine.model.spec import ModelSpec

MARGIN_SHARE, MARGIN_MIN = 0.05, 512 * 2**20  # of the host's memory, kept free for everything else


class MemoryShortfall(OutOfMemoryError):
    """A load refused before it began: `fields` are the row's memory columns."""

    def __init__(self, message: str, needed: int, limit: int):
        super().__init__(message)
        self.fields = {"memory_needed_bytes": needed, "memory_limit_bytes": limit}


@dataclass(frozen=True)
class Budget:
    bytes: int  # what this process may reach in all, what it holds now included
    what: str


@dataclass(frozen=True)
class Fit:
    opts: LoadOptions  # the options to load with (their memory budget set)
    need: MemoryNeed
    needed_bytes: int  # the process's expected peak: what it holds now plus the load's need
    limit_bytes: int


def host_budget(rss: int) -> Budget:
    vm = psutil.virtual_memory()
    margin = max(MARGIN_MIN, int(vm.total * MARGIN_SHARE))
    return Budget(rss + vm.available - margin, f"this host's available memory ({mb(vm.available)}, "
                                               f"less a margin of {mb(margin)})")


def budget(limit_mb: int, rss: int) -> Budget:
    host = host_budget(rss)
    limit = limit_mb * 2**20
    return Budget(limit, f"the memory limit of {limit_mb} MB") if limit_mb and limit <= host.bytes else host


def admit(cls: type[Backend], spec: "ModelSpec", opts: LoadOptions, limit_mb: int = 0) -> Fit:
    """The load `opts` of framework `cls`, admitted (its budget in the options) or refused."""
    rss = psutil.Process().memory_info().rss
    room = budget(limit_mb, rss)
    opts = replace(opts, memory_budget_bytes=max(room.bytes - rss, 0))
    need = cls.estimate_bytes(spec, opts)
    needed = rss + need.total
    if needed > room.bytes:
        raise MemoryShortfall(f"{cls.name} {opts.precision} on {spec.name} needs {mb(needed)} ({need.describe()}, "
                              f"beside {mb(rss)} in use), beyond {room.what}", needed, room.bytes)
    limit_address_space(limit_mb)
    return Fit(opts, need, needed, room.bytes)


def limit_address_space(limit_mb: int) -> None:
    if limit_mb:
        limit = limit_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
