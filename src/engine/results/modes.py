"""How a framework ran a cell, as one label for every table, figure and comparison.

A mode is the precision, `compiled` when the step was compiled, then the backend options in key
order: `f32`, `f32 compiled`, `f32 beam=2`. Two rows of one framework and precision that differ
in compile or options are different modes and are never pooled or shown alike.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping


def mode_label(precision: Any, optimization_level: Any = "", options: Any = None) -> str:
    """`options` as a row holds it (a dict) or as the CSV does (JSON text, empty or NaN when none)."""
    if isinstance(options, str):
        options = json.loads(options) if options.strip() else {}
    elif not isinstance(options, Mapping):  # None, or pandas' NaN for an empty CSV cell
        options = {}
    if isinstance(precision, float) and math.isnan(precision):
        precision = "?"
    compiled = ["compiled"] if optimization_level == "compile" else []
    return " ".join([str(precision), *compiled, *(f"{k}={v}" for k, v in sorted(options.items()))])


def row_mode(row: Any) -> str:
    """The mode of a typed row, a pandas row (itertuples or Series) or anything with those fields."""
    return mode_label(row.precision, getattr(row, "optimization_level", ""), getattr(row, "options", None))


def full_mode(row: Any) -> str:
    """Framework and mode: what figures and comparisons key a line or a bar by."""
    return f"{row.framework} {row_mode(row)}"
