"""Dequantizing a GGUF tensor with bounded memory: a chunk of rows at a time into the one float32
result, then the tensor's pages of the memory-mapped file out of the resident set. Whole, the
dequantizer's temporaries are several times its output (an 8B model's embedding would take ~8 GB
on top of its 2 GB of floats).

The group-32 types (Q4_0 ... Q8_0, Q4_K, Q5_K) go through `kquant`'s affine form, which rebuilds
the `gguf` package's values bit for bit several times faster (what a streamed 8B reference pays
for every layer of every step); the others through the `gguf` package itself."""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np

from engine.errors import ModelError
from engine.model.kquant import AFFINE_BITS, affine_groups

CHUNK_BYTES = 64 << 20  # f32 output of one dequantizer call


def dequantize(t: Any, path: str) -> np.ndarray:
    """The gguf ReaderTensor `t` as a float32 array in numpy layout (its GGUF shape reversed)."""
    import gguf

    arr = np.empty(tuple(int(n) for n in reversed(t.shape)), np.float32)
    rows, out = t.data.reshape(-1, t.data.shape[-1]), arr.reshape(-1, arr.shape[-1])
    step = max(1, CHUNK_BYTES // (4 * out.shape[1]))
    qtype = t.tensor_type.name.lower()
    try:
        for i in range(0, out.shape[0], step):
            chunk = rows[i:i + step]
            if qtype in AFFINE_BITS:
                affine_groups(chunk, qtype, len(chunk), out.shape[1]).dequantize_into(out[i:i + step])
            else:
                out[i:i + step] = gguf.quants.dequantize(chunk, t.tensor_type).reshape(-1, out.shape[1])
    except NotImplementedError as e:
        raise ModelError(f"{path}: tensor type {t.tensor_type.name} cannot be dequantized") from e
    return arr


def dequantize_rows(t: Any, path: str, index: np.ndarray) -> np.ndarray:
    """Rows `index` (any integer array) of a 2D tensor, float32, shape index.shape + (columns,):
    an embedding lookup that reads a few rows of blocks, not the table."""
    import gguf

    flat = np.asarray(index).reshape(-1)
    try:
        rows = gguf.quants.dequantize(t.data[flat], t.tensor_type)
    except NotImplementedError as e:
        raise ModelError(f"{path}: tensor type {t.tensor_type.name} cannot be dequantized") from e
    return np.asarray(rows, np.float32).reshape(*np.shape(index), -1)


def drop_pages(data: np.ndarray, t: Any) -> None:
    """The file's pages under tensor `t` out of this process's resident set (the page cache keeps
    them): a mapped file counts in RSS as it is read, the whole file by the end of a load. Views
    of the tensor stay valid (read back on access). `data` is the reader's map of the file."""
    mapped = getattr(data, "_mmap", None)
    if mapped is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = t.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
    end = min(-(-(t.data_offset + t.n_bytes) // mmap.PAGESIZE) * mmap.PAGESIZE, len(mapped))
    try:
        mapped.madvise(mmap.MADV_DONTNEED, start, end - start)
    except (OSError, ValueError):  # a platform that refuses it: the pages stay counted
        pass
