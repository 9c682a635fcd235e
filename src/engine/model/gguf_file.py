"""A GGUF file's metadata and tensor table, read in one pass over the header's bytes.

The `gguf` package's reader builds a numpy view per element of every metadata array: 5 s for
SmolLM2's 49k-token vocabulary and merges, 25 s for Gemma 3's 262k tokens, paid by every process
that opens the model (each measuring child of a sweep). Here the header is decoded with `struct`
and `np.frombuffer` (well under a second for either); tensors are the package's own `ReaderTensor`s
over one read-only memory map, shaped as its reader shapes them, so the rest of the code (and the
package's dequantization) sees the same objects.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# GGUF value types: 0-7 and 10-12 fixed-size scalars (struct code), 8 string, 9 array
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
# tensor types stored an element at a time (every other type is in quantization blocks)
UNBLOCKED = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
             "I32": np.int32, "I64": np.int64}


class GGUFFile:
    """`values`: metadata key -> Python value (str, int, float, bool, or a list of them);
    `tensors`: gguf ReaderTensors in file order; `data`: the file's read-only memory map.
    Raises ValueError on anything that is not a well-formed little-endian GGUF v2/v3 header."""

    def __init__(self, path: str):
        self.data = np.memmap(path, mode="r")
        self._buf = memoryview(self.data)
        self._pos = 0
        if bytes(self._take(4)) != MAGIC:
            raise ValueError("GGUF magic invalid")
        version = self._scalar("I")
        if version not in VERSIONS:
            raise ValueError(f"GGUF version {version} (big-endian?) is not one of {VERSIONS}")
        n_tensors, n_kv = self._scalar("Q"), self._scalar("Q")
        self.values: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            if key in self.values:
                raise ValueError(f"duplicate metadata key {key}")
            self.values[key] = self._value(self._scalar("I"))
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = self.values.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"invalid general.alignment {alignment!r}")
        self.data_offset = -(-self._pos // alignment) * alignment
        self.tensors = self._tensors(infos)
        del self._buf  # nothing keeps a view of the map but the tensors

    def _take(self, n: int) -> memoryview:
        end = self._pos + n
        if n < 0 or end > len(self._buf):
            raise ValueError(f"truncated header (needs {end} bytes, the file has {len(self._buf)})")
        view, self._pos = self._buf[self._pos:end], end
        return view

    def _scalar(self, code: str) -> Any:
        return struct.unpack("<" + code, self._take(struct.calcsize(code)))[0]

    def _string(self) -> str:
        return str(self._take(self._scalar("Q")), "utf-8")

    def _value(self, vtype: int) -> Any:
        if vtype in SCALARS:
            return self._scalar(SCALARS[vtype])
        if vtype == STRING:
            return self._string()
        if vtype != ARRAY:
            raise ValueError(f"unknown metadata value type {vtype}")
        itype, count = self._scalar("I"), self._scalar("Q")
        if itype == STRING:
            return [self._string() for _ in range(count)]
        if itype in SCALARS:
            code = "<" + SCALARS[itype]
            return np.frombuffer(self._take(count * struct.calcsize(code)), dtype=np.dtype(code)).tolist()
        return [self._value(itype) for _ in range(count)]  # nested arrays

    def _tensor_info(self) -> tuple[str, list[int], int, int]:
        name = self._string()
        n_dims = self._scalar("I")
        dims = [self._scalar("Q") for _ in range(n_dims)]
        return name, dims, self._scalar("I"), self._scalar("Q")

    def _tensors(self, infos: list[tuple[str, list[int], int, int]]) -> list[Any]:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, ReaderField, ReaderTensor
        from gguf.quants import quant_shape_to_byte_shape

        tensors, seen = [], set()
        for name, dims, raw_type, offset in infos:
            if name in seen:
                raise ValueError(f"duplicate tensor {name}")
            seen.add(name)
            qtype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_elements = int(np.prod(dims, dtype=np.int64))  # 1 for a scalar (no dims)
            n_bytes = n_elements * type_size // block
            start = self.data_offset + offset
            shape = tuple(reversed(dims))  # numpy order: the row length (GGUF's first dimension) last
            dtype = UNBLOCKED.get(qtype.name)
            if dtype is None:
                dtype, count, shape = np.uint8, n_bytes, quant_shape_to_byte_shape(shape, qtype)
            else:
                count = n_elements
            item = np.dtype(dtype).itemsize  # a tensor past the end of the file is cut short: ModelSpec says so
            end = start + min(count, max(len(self.data) - start, 0) // item) * item
            data = self.data[start:end].view(dtype)
            data = data.reshape(shape) if data.size == count else data
            tensors.append(ReaderTensor(name=name, tensor_type=qtype, shape=np.array(dims, dtype=np.uint64),
                                        n_elements=n_elements, n_bytes=n_bytes, data_offset=start, data=data,
                                        field=ReaderField(0, name)))
        return tensors
