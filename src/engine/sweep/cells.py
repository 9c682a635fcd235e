"""Sweep cells: the product of axes, deduplicated and ordered so cells sharing a load are adjacent."""

from __future__ import annotations

import itertools
import os
import tomllib
from pathlib import Path
from dataclasses import replace
from typing import Any, Callable, Iterable, Mapping

from engine.errors import InputError
from engine.measure.cell import CELL_FIELDS, Cell


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


def apply_options(cells: list[Cell], parse: Callable[[list[str], dict[str, Any]], dict[str, dict[str, Any]]]) -> list[Cell]:
    """Give each cell only the backend options its framework declares, typed by `parse` (the
    registry's `parse_options`, which refuses a key no framework of the sweep knows). Each cell's
    own values are kept: modes give cells of one framework different values of one option."""
    frameworks = sorted({c.framework for c in cells})
    return dedupe(replace(c, options=tuple(sorted(parse(frameworks, dict(c.options))[c.framework].items())))
                  if c.options else c for c in cells)


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
