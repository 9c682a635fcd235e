"""torch on the GGUF's own 4-bit blocks: Q4_0 and Q4_1 matrices run through torch's weight-only
int4 kernel (`_weight_int4pack_mm_for_cpu`), converted once at load, the nibbles never re-quantized.

The kernel computes with w = (q - 8) * scale + zero per group of 32 along a row, which holds both
GGUF block types: Q4_0 is d * (q - 8) (scale d, zero 0) and Q4_1 is d * q + m (scale d, zero
m + 8d). Its f32 path is a scalar loop (930 us for a 1536x576 GEMV here, against 69 us for an f32
GEMV) while its bf16 path is vectorised (28 us), so activations, scales and zeros go in as bf16:
the loss that costs shows in the row's `kld_mean`. Other block types (Q8_0 has per-block
scales, which torch's int8 kernel lacks) and the embedding table stay f32; a tied output head
shares the embedding's one float copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

GROUP = 32
INT4_TYPES = ("q4_0", "q4_1")
_BLOCK_BYTES = {"q4_0": 18, "q4_1": 20}  # f16 d (+ f16 m), then 16 bytes of 32 nibbles


@dataclass
class Int4Weight:
    packed: Any  # torch uint8, the kernel's packed layout of (rows, cols) nibbles
    scales_zeros: Any  # torch bfloat16 (cols / 32, rows, 2)
    rows: int
    cols: int

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_zeros.numel() * 2


def unpack_blocks(raw: np.ndarray, qtype: str, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGUF Q4_0/Q4_1 blocks -> (nibbles uint8 (rows, cols), scale f32, zero f32 (rows, cols/32))."""
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // GROUP, _BLOCK_BYTES[qtype])
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if qtype == "q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs, zero = blocks[..., 4:], m + 8 * d
    else:
        qs, zero = blocks[..., 2:], np.zeros_like(d)
    nibbles = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # element j in the low nibble, j + 16 in the high
    return nibbles.reshape(rows, cols), d, zero


def int4_weight(nibbles: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> Int4Weight:
    import torch

    rows, cols = nibbles.shape
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(nibbles.astype(np.int32)), 1)
    sz = torch.from_numpy(np.stack([scale.T, zero.T], axis=-1).astype(np.float32)).to(torch.bfloat16).contiguous()
    return Int4Weight(packed, sz, rows, cols)


def int4_linear(x, w: Int4Weight):
    """x @ w.T for float32 activations of shape (..., cols), computed with bf16 activations. The
    kernel takes 2D input: every sequence's tokens go through as the rows of one call."""
    import torch

    rows = x.reshape(-1, w.cols).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, w.packed, GROUP, w.scales_zeros)
    return y.float().reshape(*x.shape[:-1], w.rows)


def load_int4_weights(spec, to_float):
    """The model's weights with every Q4_0/Q4_1 matrix as an Int4Weight (Q/K rows moved to the
    rotate-half order the shared forward uses) and everything else through `to_float`."""

    def read(name: str):
        qtype = spec.tensor_type(name)
        if qtype not in INT4_TYPES or name == "token_embd.weight":
            return to_float(spec.hf_tensor(name))
        cols, rows = (int(n) for n in spec.raw_tensor(name).shape)  # GGUF lists the row length first
        parts = unpack_blocks(spec.raw_tensor(name).data, qtype, rows, cols)
        return int4_weight(*(spec.hf_rows(name, p) for p in parts))

    return spec.load_weights(lambda w: w, tensor=read)


def int4_counts(weights) -> dict[str, int]:
    layers = [w for layer in weights.layers for w in vars(layer).values() if w is not None]  # None: absent in this arch
    return {"int4_matrices": sum(isinstance(w, Int4Weight) for w in layers),
            "float_matrices": sum(not isinstance(w, Int4Weight) and w.dim() == 2 for w in layers)}


def int4_need(spec, positions: int, sequences: int, runtime: int):
    """What `load_int4_weights` holds: Q4 matrices packed (half a byte an element, with a bf16 scale
    and zero per group), the rest f32 (wrapping the dequantized array); a matrix being packed holds
    its nibbles as uint8 and int32 beside the unpacked blocks (about 7 bytes an element)."""
    from engine.model.footprint import MemoryNeed, conversion_peak, dequantized_bytes, elements, kv_bytes

    def packed(name: str) -> bool:
        return spec.tensor_type(name) in INT4_TYPES and name != "token_embd.weight"

    def held(name: str) -> int:
        n = elements(spec, name)
        return n // 2 + n // GROUP * 4 if packed(name) else n * 4

    floats = dequantized_bytes(spec, copies=0)
    staged = lambda name: 7 * elements(spec, name) if packed(name) else floats(name)  # noqa: E731
    return MemoryNeed(weights=sum(held(n) for n in spec.load_order()), kv=kv_bytes(spec, positions, sequences, 4),
                      transient=conversion_peak(spec, held, staged), runtime=runtime)
