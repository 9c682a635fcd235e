"""What a loaded model will hold in memory, estimated before it is loaded: the arithmetic every
backend's `estimate_bytes` shares. A need is the weights in the form the framework holds them,
its KV caches for the capacity it is loaded for, the load's transient peak above those (a tensor
being converted), and the framework's own runtime (its libraries, compute buffers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from engine.model.dequant import CHUNK_BYTES

if TYPE_CHECKING:
    from engine.model.spec import ModelSpec

BYTES_PER_ELEMENT = {"f32": 4, "bf16": 2, "f16": 2}
# the dequantizer's temporaries per chunk of f32 output, at most (measured on Q4_K, Q6_K: ~3x)
DEQUANT_TEMPORARIES = 4 * CHUNK_BYTES

HeldBytes = Callable[[str], int]  # a tensor's name -> bytes the framework holds it in


@dataclass(frozen=True)
class MemoryNeed:
    weights: int
    kv: int
    transient: int  # above weights and KV caches at the load's worst moment
    runtime: int  # the framework's own footprint beside the model

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.transient + self.runtime

    def describe(self) -> str:
        parts = (("weights", self.weights), ("KV cache", self.kv), ("load peak", self.transient),
                 ("runtime", self.runtime))
        return " + ".join(f"{what} {mb(n)}" for what, n in parts if n)


def mb(n: int) -> str:
    return f"{n / 2**20:.0f} MB"


def elements(spec: "ModelSpec", name: str) -> int:
    return int(np.prod(spec.raw_tensor(name).shape))


def float_bytes(spec: "ModelSpec", precision: str) -> HeldBytes:
    """Held as floats of `precision` (f32, bf16, f16)."""
    per = BYTES_PER_ELEMENT[precision]
    return lambda name: elements(spec, name) * per


def kv_bytes(spec: "ModelSpec", positions: int, sequences: int, per_element: int) -> int:
    """KV caches of `sequences` x `positions` at `per_element` bytes (K and V, every layer)."""
    return sequences * positions * spec.config.kv_bytes_per_token(per_element)


def weight_bytes(spec: "ModelSpec", held: HeldBytes) -> int:
    return sum(held(n) for n in spec.load_order())


def conversion_peak(spec: "ModelSpec", held: HeldBytes, staged: HeldBytes) -> int:
    """How far a tensor-by-tensor load rises above its final weights: walking the load order, the
    weights held so far plus the tensor being converted as `staged` holds it meanwhile (its f32
    dequantization, ...), less the final total. The largest tensors (embedding, output head) come
    first, so the peak is often there."""
    so_far, peak = 0, 0
    for name in spec.load_order():
        so_far += held(name)
        peak = max(peak, so_far + staged(name))
    return max(0, peak - so_far)


def dequantized_bytes(spec: "ModelSpec", copies: float) -> HeldBytes:
    """A tensor while it is converted, beside its held form: `copies` f32 copies of it (0 where the
    framework holds the dequantized array itself), the dequantizer's temporaries (none for stored
    floats) and, for Q/K rows moved to rotate-half order, the moved copy."""
    def staged(name: str) -> int:
        f32 = elements(spec, name) * 4
        temps = 0 if spec.tensor_type(name) in ("f32", "f16", "bf16") else min(DEQUANT_TEMPORARIES, 4 * f32)
        reordered = f32 if spec.permuted_heads(name) else 0
        return int(temps + reordered + copies * f32)
    return staged


def float_need(spec: "ModelSpec", precision: str, positions: int, sequences: int, runtime: int,
               copies: float | None = None, kv_per_element: int | None = None) -> MemoryNeed:
    """A backend holding every weight as floats of `precision`, each converted from its f32
    dequantization (`copies` f32 copies alive meanwhile: by default none at f32, where the
    framework wraps the array, and one otherwise), with KV caches of that precision (or
    `kv_per_element` bytes)."""
    held = float_bytes(spec, precision)
    copies = (0 if precision == "f32" else 1) if copies is None else copies
    per = BYTES_PER_ELEMENT[precision] if kv_per_element is None else kv_per_element
    return MemoryNeed(weights=weight_bytes(spec, held), kv=kv_bytes(spec, positions, sequences, per),
                      transient=conversion_peak(spec, held, dequantized_bytes(spec, copies)), runtime=runtime)


def fused_rows_bytes(spec: "ModelSpec", held: HeldBytes) -> int:
    """The largest layer's Q/K/V and gate/up weights: what concatenating them into fused matrices
    holds twice for a moment (the parts become views into the fused copy)."""
    fused = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "ffn_gate.weight", "ffn_up.weight")
    layers = range(spec.config.n_layers)
    return max((sum(held(f"blk.{i}.{s}") for s in fused if f"blk.{i}.{s}" in spec.tensor_names) for i in layers),
               default=0)
