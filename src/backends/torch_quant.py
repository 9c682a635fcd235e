"""torch on the GGUF's own blocks: 4-bit matrices (Q4_0, Q4_1, Q4_K) run through torch's weight-only
int4 kernel (`_weight_int4pack_mm_for_cpu`), converted once at load, the values never re-quantized.

The kernel computes with w = (n - 8) * scale + zero per group of 32 along a row, n a nibble, which
holds every 4-bit affine group (engine.model.kquant: w = s * u + b) with scale s and zero b + 8s.
Its f32 path is a scalar loop (930 us for a 1536x576 GEMV here, against 69 us for an f32 GEMV)
while its bf16 path is vectorised (28 us), so activations, scales and zeros go in as bf16: the
loss that costs shows in the row's `kld_mean`.

The other matrices of a file (Q5_0/Q6_K/Q8_0 in a Q4_K_M file) run as the `rest` option says:
`f32` (the dequantized values, exact) or `bf16` (rounded to bf16, with bf16 activations). Measured
here (2 threads): a GEMV of Gemma 3's 262144x640 head takes 113 ms in f32, 32 ms in bf16, 15 ms
in int4 and 32 ms through `_weight_int8pack_mm` (per-row scales, so a re-quantization), and
splitting an 8-bit group into two int4 matrices (u = 16 hi + lo) would cost 2 x 15 ms: no faster
than bf16, so neither is offered. Under rest=f32 a tied output head and the embedding share one
f32 table; otherwise the embedding stays in the file's blocks (`FileRows`: a lookup dequantizes
the rows it reads, the values the reference uses) and the head is converted as its type says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.model.kquant import AFFINE_BITS, GROUP, AffineGroups

INT4_TYPES = ("q4_0", "q4_1")  # file types whose native mode predates `rest` (it is f32 there)
KQUANT_FILES = ("q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s")  # file types mostly of K-quant blocks
RESTS = ("f32", "bf16")


class PackedWeight:
    """A matrix torch holds in a form other than one float tensor: `matmul(x)` is x @ w.T, and
    `nbytes` what it holds."""


@dataclass
class Int4Weight(PackedWeight):
    packed: Any  # torch uint8, the kernel's packed layout of (rows, cols) nibbles
    scales_zeros: Any  # torch bfloat16 (cols / 32, rows, 2)
    rows: int
    cols: int

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_zeros.numel() * 2

    def matmul(self, x):
        return int4_linear(x, self)


@dataclass
class Bf16Weight(PackedWeight):
    """A bf16 matrix in an f32 model: activations are rounded to bf16 for its product."""

    weight: Any

    @property
    def rows(self) -> int:
        return self.weight.shape[0]

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * 2

    def matmul(self, x):
        import torch

        return torch.nn.functional.linear(x.to(torch.bfloat16), self.weight).float()


@dataclass
class FileRows:
    """An embedding table left in the file (its mmap): a lookup dequantizes only the rows it reads,
    with the gguf package's own routine, so it holds no copy of the table."""

    raw: Any  # the tensor's blocks, one row of the table per row
    kind: Any  # its gguf.GGMLQuantizationType

    def lookup(self, tokens):
        import gguf
        import torch

        ids = tokens.reshape(-1).cpu().numpy()
        rows = np.asarray(gguf.quants.dequantize(self.raw[ids], self.kind), dtype=np.float32)
        return torch.from_numpy(rows).reshape(*tokens.shape, -1)


def int4_parts(g: AffineGroups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 4-bit group's (nibbles, scale, zero) in the kernel's (n - 8) * scale + zero form."""
    assert g.bits == 4, g.bits
    return g.u, g.scale, g.bias + 8 * g.scale


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


def runs_on_int4(spec, name: str) -> bool:
    """Whether the native mode holds tensor `name` as an Int4Weight: a matrix of 4-bit groups."""
    return len(spec.raw_tensor(name).shape) == 2 and AFFINE_BITS.get(spec.tensor_type(name)) == 4


def native_matrix(spec, name: str, rest: str):
    """Tensor `name` as the native mode holds it: a PackedWeight, or an f32 torch tensor."""
    import torch

    if runs_on_int4(spec, name):
        return int4_weight(*(spec.hf_rows(name, a) for a in int4_parts(spec.affine_groups(name))))
    values = torch.from_numpy(spec.hf_tensor(name))
    return Bf16Weight(values.to(torch.bfloat16)) if values.dim() == 2 and rest != "f32" else values


def load_native_weights(spec, rest: str = "f32"):
    """The model's weights as `native_matrix` holds each (Q/K rows in the rotate-half order the
    shared forward uses): a tied head shares the f32 table under rest=f32, else is its own and the
    embedding FileRows."""
    import torch

    shared = spec.tied_embeddings and rest == "f32"

    def read(name: str):
        if name != "token_embd.weight":
            return native_matrix(spec, name, rest)
        if shared:
            return torch.from_numpy(spec.hf_tensor(name))
        t = spec.raw_tensor(name)
        return FileRows(t.data, t.tensor_type)

    weights = spec.load_weights(lambda w: w, tensor=read)
    if spec.tied_embeddings and not shared:
        weights.output = native_matrix(spec, "token_embd.weight", rest)
    return weights


def held_bytes(w) -> int:
    """Bytes a weight holds in memory (FileRows: none, its rows are read from the file's pages)."""
    if isinstance(w, FileRows):
        return 0
    return w.nbytes if isinstance(w, PackedWeight) else w.numel() * w.element_size()


def native_counts(weights) -> dict[str, int]:
    """How many layer matrices each form holds (int4, bf16, f32)."""
    layers = [w for layer in weights.layers for w in vars(layer).values() if w is not None]  # None: absent in this arch
    count = lambda kind: sum(isinstance(w, kind) for w in layers)  # noqa: E731
    return {"int4_matrices": count(Int4Weight), "bf16_matrices": count(Bf16Weight),
            "float_matrices": sum(not isinstance(w, PackedWeight) and w.dim() == 2 for w in layers)}


def native_need(spec, rest: str, positions: int, sequences: int, runtime: int):
    """What `load_native_weights` holds: 4-bit matrices packed (half a byte an element, a bf16 scale
    and zero per group), the rest f32 or bf16 as `rest` says, an embedding that is not shared with
    the head left in the file (FileRows; a tied head is then its own copy); a matrix being packed
    holds its nibbles as uint8 and int32 beside the unpacked groups (about 7 bytes an element)."""
    from engine.model.footprint import MemoryNeed, conversion_peak, dequantized_bytes, elements, kv_bytes

    in_file = not (spec.tied_embeddings and rest == "f32")

    def converted(name: str) -> int:
        n = elements(spec, name)
        if runs_on_int4(spec, name):
            return n // 2 + n // GROUP * 4
        return n * (2 if rest == "bf16" and len(spec.raw_tensor(name).shape) == 2 else 4)

    def held(name: str) -> int:
        return 0 if name == "token_embd.weight" and in_file else converted(name)

    floats = dequantized_bytes(spec, copies=1 if rest == "bf16" else 0)  # bf16 is cast from the f32 array
    staged = lambda name: 7 * elements(spec, name) if runs_on_int4(spec, name) else floats(name)  # noqa: E731
    tied_head = converted("token_embd.weight") if spec.tied_embeddings and in_file else 0
    transient = conversion_peak(spec, held, staged)
    if tied_head:  # converted last, with every other weight already held
        transient = max(transient, staged("token_embd.weight"))
    return MemoryNeed(weights=sum(held(n) for n in spec.load_order()) + tied_head,
                      kv=kv_bytes(spec, positions, sequences, 4), transient=transient, runtime=runtime)
