"""The Llama forward pass, written once against a small ops protocol.

numpy, torch, MLX, tinygrad and the hybrid backend each implement `LlamaOps` with their own
fastest primitives and wrap `forward` in their own JIT; the arithmetic and its order live here.
Arrays only need `.reshape` and `[-1:]`; everything else goes through the ops.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

from engine.model.spec import LlamaConfig, LlamaWeights

Array = Any


class LlamaOps(Protocol):
    def embed(self, table: Array, tokens: Array) -> Array: ...  # (T,) -> (T, dim)
    def rms_norm(self, x: Array, weight: Array) -> Array: ...
    def linear(self, x: Array, weight: Array) -> Array: ...  # x @ weight.T
    def rope(self, x: Array, start: Any) -> Array: ...  # (T, heads, head_dim), rotate-half
    def attend(self, layer: int, q: Array, k: Array, v: Array, start: Any) -> Array: ...
    # ^ writes k, v to the KV cache at [start, start+T), attends causally, returns (T, heads*head_dim)
    def silu_mul(self, gate: Array, up: Array) -> Array: ...
    def residual(self, x: Array, delta: Array) -> Array: ...  # x + delta: where lazy frameworks materialise
    def project(self, layer: int, kind: str, x: Array, weights: tuple) -> tuple: ...
    # ^ several linears of one input ("qkv", "gate_up"); a framework may run them as one fused matmul


class SeparateProjections:
    """`project` as one `linear` per weight: for ops tables without fused weights."""

    def project(self, layer: int, kind: str, x: Array, weights: tuple) -> tuple:
        return tuple(self.linear(x, w) for w in weights)


FUSED_PROJECTIONS = (("qkv", ("wq", "wk", "wv")), ("gate_up", ("w_gate", "w_up")))


class FusedProjections:
    """`project` as one matmul over concatenated weights (one GEMV instead of three and two).

    `fuse(layers)` concatenates each layer's Q/K/V and gate/up rows and makes the separate weights
    views into the fused matrix, so there is still one copy in memory. The framework supplies
    `concat_rows`, `split_rows` and `split_last`."""

    def fuse(self, layers: Sequence[Any]) -> None:
        self.fused: dict[str, list] = {kind: [] for kind, _ in FUSED_PROJECTIONS}
        for layer in layers:
            for kind, names in FUSED_PROJECTIONS:
                parts = [getattr(layer, n) for n in names]
                sizes = [int(p.shape[0]) for p in parts]
                fused = self.concat_rows(parts)
                for name, view in zip(names, self.split_rows(fused, sizes)):
                    setattr(layer, name, view)
                self.fused[kind].append((fused, sizes))

    def project(self, layer: int, kind: str, x: Array, weights: tuple) -> tuple:
        fused, sizes = self.fused[kind][layer]
        return tuple(self.split_last(self.linear(x, fused), sizes))


def block(ops: LlamaOps, i: int, layer: Any, cfg: LlamaConfig, x: Array, start: Any, n_tokens: int) -> Array:
    """Transformer block `i`: attention then SwiGLU feed-forward, each with a pre-norm and residual."""
    hd = cfg.head_dim
    h = ops.rms_norm(x, layer.attn_norm)
    q, k, v = ops.project(i, "qkv", h, (layer.wq, layer.wk, layer.wv))
    q = ops.rope(q.reshape(n_tokens, cfg.n_heads, hd), start)
    k = ops.rope(k.reshape(n_tokens, cfg.n_kv_heads, hd), start)
    x = ops.residual(x, ops.linear(ops.attend(i, q, k, v.reshape(n_tokens, cfg.n_kv_heads, hd), start), layer.wo))
    h = ops.rms_norm(x, layer.ffn_norm)
    gate, up = ops.project(i, "gate_up", h, (layer.w_gate, layer.w_up))
    return ops.residual(x, ops.linear(ops.silu_mul(gate, up), layer.w_down))


def head(ops: LlamaOps, w: LlamaWeights, x: Array) -> Array:
    """Logits of the last position, shape (1, vocab)."""
    return ops.linear(ops.rms_norm(x[-1:], w.output_norm), w.output)


def forward(ops: LlamaOps, w: LlamaWeights, cfg: LlamaConfig, tokens: Array, start: Any, n_tokens: int) -> Array:
    """Logits of the last position, shape (1, vocab), for `n_tokens` tokens placed at `start`."""
    x = ops.embed(w.tok_embd, tokens)
    for i, layer in enumerate(w.layers):
        x = block(ops, i, layer, cfg, x, start, n_tokens)
    return head(ops, w, x)


def rope_tables(cfg: LlamaConfig, max_seq: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape (max_seq, head_dim): rotate-half layout, float32."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_base ** (np.arange(half, dtype=np.float64) * 2 / cfg.head_dim))
    angles = np.outer(np.arange(max_seq, dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def check_tokens(tokens: Sequence[int], start: int, max_seq: int, vocab: int) -> None:
    from engine.errors import InputError

    if not tokens:
        raise InputError("empty prompt: at least one token is needed")
    if start + len(tokens) > max_seq:
        raise InputError(f"sequence of {start + len(tokens)} tokens exceeds the context of {max_seq}")
    if (min(tokens) < 0 or max(tokens) >= vocab):
        raise InputError(f"token id out of range for a vocabulary of {vocab}")
