"""Backends, one module per framework, found by name.

Every module in this package that defines a `Backend` subclass with a `name` is a framework;
adding one is adding a file. Modules import their framework lazily (inside methods), so listing
them and `bench --help` work with no framework installed. Out-of-tree backends load from the
modules named in BENCH_BACKEND_MODULES (comma-separated), which child processes inherit.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import time
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Callable, Mapping

from engine.errors import InputError, UnavailableError
from engine.generate.backend import Backend, LoadInfo, LoadOptions

if TYPE_CHECKING:
    from engine.model.spec import ModelSpec


def registry() -> dict[str, type[Backend]]:
    """Every backend by name: this package's modules and those BENCH_BACKEND_MODULES names now."""
    return _registry(os.environ.get("BENCH_BACKEND_MODULES", ""))


@cache
def _registry(extra_modules: str) -> dict[str, type[Backend]]:
    found: dict[str, type[Backend]] = {}
    modules = [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__)
               if m.name != "base" and not m.name.startswith("_")]
    modules += [m.strip() for m in extra_modules.split(",") if m.strip()]
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            raise InputError(f"cannot import backend module {name}: {e}") from e
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, Backend) and obj.__module__ == module.__name__
                    and getattr(obj, "name", None)):
                found[obj.name] = obj
    return dict(sorted(found.items(), key=lambda kv: (not kv[1].is_reference, kv[0])))


def names() -> list[str]:
    return list(registry())


def get(name: str) -> type[Backend]:
    known = registry()
    if name not in known:
        lines = []
        for n, cls in known.items():
            a = cls.availability()
            lines.append(n if a.ok else f"{n} (unavailable: {a.reason})")
        raise InputError(f"unknown framework {name!r}; known: {'; '.join(lines)}")
    return known[name]


def available() -> list[str]:
    return [n for n, cls in registry().items() if cls.availability().ok]


def reference() -> type[Backend]:
    return next(cls for cls in registry().values() if cls.is_reference)


def parse_options(frameworks: list[str], options: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each framework's share of `--option KEY=VALUE`, typed. A key goes to every framework that
    declares it; a key no selected framework declares is an error naming the options they have."""
    classes = {name: get(name) for name in frameworks}
    for key in options:
        if not any(key in {o.name for o in cls.options} for cls in classes.values()):
            have = sorted({f"{o.name} ({n})" for n, cls in classes.items() for o in cls.options})
            raise InputError(f"unknown option {key!r} for framework(s) {', '.join(frameworks)} "
                             f"(their options: {', '.join(have) or 'none'})")
    return {name: cls.parse_options({k: v for k, v in options.items() if k in {o.name for o in cls.options}})
            for name, cls in classes.items()}


@dataclass
class Opened:
    """A loaded backend and what its loading decided and cost."""

    backend: Backend
    info: LoadInfo
    precision: str
    version: str
    load_s: float
    opts: LoadOptions  # what it was loaded with (resolved precision and device, capacity)


def load_options(name: str, spec: "ModelSpec", precision: str = "auto", device: str = "auto", *,
                 threads: int | None = None, max_seq_len: int = 512, max_batch: int = 1, compile: bool = False,
                 options: Mapping[str, Any] | None = None,
                 memory_budget_bytes: int = 0) -> tuple[type[Backend], LoadOptions, str]:
    """The framework's class, what it would be loaded with (precision and device resolved, options
    typed) and its version; UnavailableError when it cannot run here."""
    cls = get(name)
    avail = cls.availability()
    if not avail.ok:
        raise UnavailableError(f"framework {name} is unavailable: {avail.reason}")
    opts = LoadOptions(precision=cls.resolve_precision(spec, precision), device=cls.resolve_device(device),
                       threads=threads or None, max_seq_len=max_seq_len, max_batch=max_batch, compile=compile,
                       options=cls.parse_options(options or {}), memory_budget_bytes=memory_budget_bytes)
    return cls, opts, avail.version


def open_backend(name: str, spec: "ModelSpec", precision: str = "auto", device: str = "auto",
                 admit: Callable[[type[Backend], LoadOptions], LoadOptions] | None = None, **load: Any) -> Opened:
    """Check availability, resolve precision and device, load, time the load: the one sequence
    every caller (measurement, chat, tests, scripts) uses. `load`: load_options' keywords; `admit`
    sees the class and options before the load and returns the options to load with, or raises
    (the harness's memory check)."""
    cls, opts, version = load_options(name, spec, precision, device, **load)
    if admit is not None:
        opts = admit(cls, opts)
    backend = cls()
    t = time.perf_counter()
    info = backend.load(spec, opts)
    return Opened(backend, info, opts.precision, version, time.perf_counter() - t, opts)
