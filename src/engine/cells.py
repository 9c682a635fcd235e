"""Cells: one benchmark configuration each, expanded from sweep axes and ordered to group loads."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

from engine.errors import InputError


@dataclass(frozen=True)
class Cell:
    framework: str
    model: str
    precision: str = "auto"
    device: str = "auto"
    prompt_tokens: int = 32
    prompt_text: str = ""
    gen_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    min_time_s: float = 0.0
    threads: int = 0  # 0: the framework's default
    compile: bool = False
    seed: int = 0
    memory_limit_mb: int = 0  # RLIMIT_AS of the child process; 0: none
    options: tuple[tuple[str, Any], ...] = ()  # backend-specific (e.g. beam=2)
    timeout_s: float = 900.0
    noise_threshold: float = 0.05  # CoV of decode tok/s above which a cell is flagged `noisy`

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "gen_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "threads", "memory_limit_mb"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.timeout_s <= 0:
            raise InputError(f"timeout must be > 0 seconds, got {self.timeout_s}")

    @property
    def cell_id(self) -> str:
        """Stable across runs and machines: what was measured, not how long it may take."""
        key = {k: v for k, v in asdict(self).items() if k not in ("timeout_s", "noise_threshold")}
        key["model"] = os.path.basename(self.model)
        return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def load_key(self) -> tuple:
        """Cells with equal keys can share one loaded model in one child process."""
        return (self.model, self.framework, self.precision, self.device, self.threads, self.compile,
                self.memory_limit_mb, self.options)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Cell":
        d = dict(d)
        d["options"] = tuple(tuple(kv) for kv in d.get("options", ()))
        return cls(**d)


CELL_FIELDS = {f.name for f in fields(Cell)}


def expand(axes: Mapping[str, Any], fixed: Mapping[str, Any]) -> list[Cell]:
    """The cartesian product of list-valued `axes`, with `fixed` settings for every cell,
    ordered so cells sharing a loaded model are adjacent."""
    unknown = set(axes) | set(fixed)
    unknown -= CELL_FIELDS
    if unknown:
        raise InputError(f"unknown sweep setting(s): {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted(CELL_FIELDS))})")
    names = list(axes)
    lists = [v if isinstance(v, list) else [v] for v in axes.values()]
    cells = []
    for combo in itertools.product(*lists):
        cells.append(Cell(**{**fixed, **dict(zip(names, combo))}))
    return order(dedupe(cells))


def dedupe(cells: Iterable[Cell]) -> list[Cell]:
    seen, out = set(), []
    for c in cells:
        if c.cell_id not in seen:
            seen.add(c.cell_id)
            out.append(c)
    return out


def order(cells: list[Cell]) -> list[Cell]:
    """Group by load key (first-seen order), keeping the axis order inside each group."""
    first: dict[tuple, int] = {}
    for i, c in enumerate(cells):
        first.setdefault(c.load_key, i)
    return sorted(cells, key=lambda c: first[c.load_key])


def load_config(path: str | os.PathLike, model_default: str, overrides: Mapping[str, Any] | None = None,
                resolve_model=lambda m: m) -> list[Cell]:
    """Cells from a TOML sweep file: a [sweep] table of settings; lists are axes."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"sweep config not found: {p}")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: not valid TOML ({e})") from e
    sweep = data.get("sweep")
    if not isinstance(sweep, dict):
        raise InputError(f"{p}: needs a [sweep] table")
    sweep = {**sweep, **(overrides or {})}
    sweep.setdefault("model", model_default)
    sweep["model"] = [resolve_model(m) for m in sweep["model"]] if isinstance(sweep["model"], list) \
        else resolve_model(sweep["model"])
    if isinstance(sweep.get("options"), dict):
        sweep["options"] = tuple(sorted(sweep["options"].items()))
    axes = {k: v for k, v in sweep.items() if isinstance(v, list)}
    fixed = {k: v for k, v in sweep.items() if not isinstance(v, list)}
    return expand(axes, fixed)
