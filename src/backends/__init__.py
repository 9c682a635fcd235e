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
from functools import cache

from backends.base import Backend
from engine.errors import InputError


@cache
def registry() -> dict[str, type[Backend]]:
    found: dict[str, type[Backend]] = {}
    modules = [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__)
               if m.name != "base" and not m.name.startswith("_")]
    modules += [m.strip() for m in os.environ.get("BENCH_BACKEND_MODULES", "").split(",") if m.strip()]
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
