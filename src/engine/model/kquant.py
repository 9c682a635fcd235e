"""GGUF blocks as affine groups of 32: w = scale * u + bias, u an unsigned `bits`-bit integer.

Every GGUF type whose scales apply to 32 consecutive values of a row fits this form exactly:
Q4_0 d*(u-8), Q4_1 d*u+m, Q5_0 d*(u-16), Q5_1 d*u+m, Q8_0 d*(u-128) (u = q+128), and the
K-quants Q4_K and Q5_K, whose super-blocks of 256 hold 8 sub-blocks of 32, each with 6-bit scale
and min indices sc, m: w = (d*sc)*u - dmin*m. The products d*sc and dmin*m are exact in float32,
so scale*u + bias rebuilds the gguf package's dequantization bit for bit. torch's int4 kernel
(scales and zero points) and MLX's quantized matrices (scales and biases) both run this form;
Q6_K (scales per 16) and the other types do not fit and stay float in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUP = 32
AFFINE_BITS = {"q4_0": 4, "q4_1": 4, "q4_k": 4, "q5_0": 5, "q5_1": 5, "q5_k": 5, "q8_0": 8}
_BLOCK = {"q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24), "q8_0": (32, 34),
          "q4_k": (256, 144), "q5_k": (256, 176)}  # (values, bytes) per block


@dataclass
class AffineGroups:
    u: np.ndarray  # uint8 (rows, cols), each below 2**bits
    scale: np.ndarray  # float32 (rows, cols / 32)
    bias: np.ndarray  # float32 (rows, cols / 32)
    bits: int

    def dequantize(self) -> np.ndarray:
        out = np.empty(self.u.shape, np.float32)
        self.dequantize_into(out)
        return out

    def dequantize_into(self, out: np.ndarray) -> None:
        """scale * u + bias into `out` (float32, u's shape), group by group without repeating the scales."""
        rows, groups = self.scale.shape
        grouped = out.reshape(rows, groups, GROUP)
        np.multiply(self.u.reshape(rows, groups, GROUP), self.scale[..., None], out=grouped, dtype=np.float32)
        grouped += self.bias[..., None]


def affine_groups(raw: np.ndarray, qtype: str, rows: int, cols: int) -> AffineGroups:
    """The blocks of a (rows, cols) GGUF matrix of type `qtype` (a key of AFFINE_BITS)."""
    values, nbytes = _BLOCK[qtype]
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(rows * cols // values, nbytes)
    u, scale, bias = (_k_quant if qtype.endswith("_k") else _simple)(blocks, qtype)
    return AffineGroups(u.reshape(rows, cols), scale.reshape(rows, cols // GROUP).astype(np.float32),
                        bias.reshape(rows, cols // GROUP).astype(np.float32), AFFINE_BITS[qtype])


def _f16(b: np.ndarray) -> np.ndarray:
    """Two bytes per entry (last axis) read as float16, returned as float32."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 values: element j in the low nibble of byte j, j + 16 in its high nibble."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 4 bytes of fifth bits (little-endian uint32, bit j for element j) -> 32 values."""
    word = np.ascontiguousarray(qh).view("<u4")[..., 0]
    return ((word[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _simple(blocks: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """32-value blocks: f16 d, then (f16 m,) (4 bytes of fifth bits,) then the values."""
    d = _f16(blocks[:, 0:2])
    if qtype == "q8_0":
        return (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), d, -128 * d
    m = _f16(blocks[:, 2:4]) if qtype.endswith("_1") else None
    at = 4 if m is not None else 2
    if qtype.startswith("q5"):
        u = _nibbles(blocks[:, at + 4:]) | (_high_bits(blocks[:, at:at + 4]) << 4)
    else:
        u = _nibbles(blocks[:, at:])
    offset = 1 << (AFFINE_BITS[qtype] - 1)  # Q4_0 and Q5_0 are centred: d * (u - 8) or d * (u - 16)
    return u, d, (m if m is not None else -offset * d)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 bytes of a Q4_K/Q5_K super-block -> 6-bit (scale, min) indices of its 8 sub-blocks:
    sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); 4-7 from the nibbles
    of bytes 8-11 with their top two bits in the top bits of bytes 0-3 and 4-7."""
    p = packed.astype(np.uint8)
    lo_sc, lo_m, hi = p[:, 0:4], p[:, 4:8], p[:, 8:12]
    sc = np.concatenate([lo_sc & 63, (hi & 0x0F) | ((lo_sc >> 6) << 4)], axis=1)
    m = np.concatenate([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], axis=1)
    return sc.astype(np.float32), m.astype(np.float32)


def _k_quant(blocks: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Super-blocks of 256: f16 d, f16 dmin, 12 bytes of scales, (32 bytes of fifth bits,) 128 of
    nibbles. Each 32 bytes of nibbles hold two sub-blocks: 2c in the low nibbles, 2c+1 in the high."""
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, m = _k_scales(blocks[:, 4:16])
    qs = blocks[:, -128:].reshape(n, 4, 1, 32)
    u = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)  # sub-block j = 2c + (high nibble)
    if qtype == "q5_k":
        qh = blocks[:, 16:48]  # bit j of byte i: the fifth bit of element i of sub-block j
        u = u | ((((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1)) << 4)
    return u.reshape(n, 256), d[:, None] * sc, -(dmin[:, None] * m)
