"""tinygrad's compile caches, as the tinygrad and hybrid backends open and close them.

tinygrad keeps compiled binaries and BEAM choices in its sqlite cache (CACHEDB, which the harness
points under the project's cache directory), yet every new process still lowers and renders each
kernel from its AST before that cache can answer: measured 6.8 s of a 19.6 s warm-up of
SmolLM2-135M (prompt 32, 32 tokens). Its in-process table of finished programs
(`tinygrad.codegen.to_program_cache`, keyed by the kernel AST's content hash, the renderer and the
codegen settings) pickles, as tinygrad's own worker pool pickles it; this module keeps it in a file
beside CACHEDB, restored when a backend loads and merged back when it closes. The file is per
tinygrad version and CPU instruction set, since the CPU renderer compiles with `-march=native`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pickle
import platform
import sys
from importlib.metadata import version
from pathlib import Path

CACHE_SUBDIR = "tinygrad"  # under the project's compile caches: CACHEDB and the programs file
_known: set = set()  # program keys the file held (restored) or was given (saved) by this process


def programs_path() -> Path:
    """Beside CACHEDB (where the harness put it, else tinygrad's default)."""
    from tinygrad.helpers import CACHEDB

    return Path(CACHEDB).parent / f"programs-{version('tinygrad')}-{instruction_set()}.pkl"


def instruction_set() -> str:
    """A digest of the CPU's feature flags: what code built with `-march=native` may use."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:8]


def _program_table() -> dict | None:
    """tinygrad's table of finished programs; None when it has none or caching is off (CACHELEVEL=0)."""
    from tinygrad.helpers import CACHELEVEL

    if CACHELEVEL.value < 1:
        return None
    try:
        from tinygrad.codegen import to_program_cache
    except ImportError:  # a tinygrad without the table: nothing to keep
        return None
    return to_program_cache


def _read(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            saved = pickle.load(f)
        return saved if isinstance(saved, dict) else {}
    except FileNotFoundError:
        return {}
    except Exception as e:  # a truncated or foreign file: compile afresh, the close rewrites it
        print(f"warning: ignoring tinygrad's saved programs {path} ({type(e).__name__}: {e})", file=sys.stderr)
        return {}


def restore_programs() -> int:
    """Put the saved programs into tinygrad's table (those it lacks); how many it was given."""
    table = _program_table()
    if table is None:
        return 0
    saved = _read(programs_path())
    _known.update(saved)
    fresh = {k: v for k, v in saved.items() if k not in table}
    table.update(fresh)
    return len(fresh)


def save_programs() -> int:
    """Merge the programs this process lowered into the file (under a lock, written whole and
    renamed, so concurrent lanes and a killed writer leave a readable file); how many were new."""
    table = _program_table()
    new = {k: v for k, v in (table or {}).items() if k not in _known}
    if not new:
        return 0
    path = programs_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = {**_read(path), **new}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                pickle.dump(merged, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
        except (OSError, pickle.PicklingError, TypeError, AttributeError) as e:
            tmp.unlink(missing_ok=True)
            print(f"warning: could not save tinygrad's programs to {path} ({type(e).__name__}: {e})", file=sys.stderr)
            return 0
    _known.update(new)
    return len(new)


def cache_entries() -> int | None:
    """Rows in tinygrad's on-disk cache: it adds one for each kernel it compiles or BEAM-searches
    itself and reads the rest back. None when caching is off (CACHELEVEL=0)."""
    from tinygrad.helpers import CACHELEVEL, db_connection

    if CACHELEVEL.value < 1:
        return None
    db = db_connection()
    tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return sum(db.execute(f"SELECT count(*) FROM '{name}'").fetchone()[0] for name in tables)
