"""A model file's content digest (sha256), the key of everything cached per model (the
reference's answers, fidelity passes, exported checkpoints). Keyed by content, not by path, so a
fresh clone or a reinstall that puts the same bytes at a new path finds what was computed before.

Hashing reads the whole file (about 1 s a GB), so the digest is kept under the cache directory per
(path, size, mtime): each file is read once until it changes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

from engine.paths import cache_dir


def _hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=64)
def _sha256_of(real: str, size: int, mtime_ns: int) -> str:
    key = hashlib.sha1(json.dumps([real, size, mtime_ns]).encode()).hexdigest()[:20]
    memo = cache_dir() / "digests" / f"{key}.txt"
    if memo.exists():
        return memo.read_text().strip()
    digest = _hash(real)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
    tmp.write_text(digest + "\n")
    os.replace(tmp, memo)  # a concurrent reader sees the whole digest or none
    return digest


def file_sha256(path: str | os.PathLike) -> str:
    """The file's sha256 (hex), read once per path, size and mtime."""
    st = os.stat(path)
    return _sha256_of(os.path.realpath(path), st.st_size, st.st_mtime_ns)


def content_identity(path: str | os.PathLike) -> list:
    """[size, sha256]: equal for byte-identical files wherever they lie."""
    return [os.stat(path).st_size, file_sha256(path)]
