"""The reference: an f32 Llama-family model (llama, qwen2, qwen3, gemma2, gemma3) in plain numpy. It defines correct output for every other backend."""

from __future__ import annotations

import numpy as np

from backends.base import ArrayLlamaBackend, LoadInfo, LoadOptions, float_load_info
from engine.model.forward import SeparateProjections, forward, layer_rope_tables


GELU_C = float(np.sqrt(2.0 / np.pi))


def attention_mask(start: int, t: int, end: int, window: int) -> np.ndarray:
    """(t, end) True where query start+i must not see key j: the future, and keys `window` or
    more positions back when the layer is windowed."""
    dist = (start + np.arange(t))[:, None] - np.arange(end)[None, :]
    return (dist < 0) | (dist >= window) if window else dist < 0


class NumpyOps(SeparateProjections):
    def __init__(self, cfg, max_seq: int, max_batch: int):
        self.cfg = cfg
        self.rope_tables = layer_rope_tables(cfg, max_seq)
        shape = (cfg.n_layers, max_batch, max_seq, cfg.n_kv_heads, cfg.head_dim)
        self.k_cache = np.zeros(shape, np.float32)
        self.v_cache = np.zeros(shape, np.float32)

    def embed(self, table, tokens):
        return table[np.asarray(tokens)]

    def rms_norm(self, x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.cfg.rms_eps) * weight

    def linear(self, x, weight):
        # one GEMM over every sequence's tokens (a stacked (B, T, dim) matmul would call BLAS once per
        # sequence and read the weights B times), weight-major: OpenBLAS runs a few-row product ~1.7x
        # faster this way round (8 rows of a 1536x576 matrix: 186 us against 322 us for x @ w.T)
        return (weight @ x.reshape(-1, x.shape[-1]).T).T.reshape(*x.shape[:-1], weight.shape[0])

    def rope(self, x, start, layer):
        t, half = x.shape[1], x.shape[-1] // 2
        cos, sin = self.rope_tables[layer]
        cos, sin = cos[start:start + t, None, :], sin[start:start + t, None, :]
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def attend(self, layer, q, k, v, start):
        b, t, n_heads, hd = q.shape
        kv = self.cfg.n_kv_heads
        end = start + t
        self.k_cache[layer, :b, start:end], self.v_cache[layer, :b, start:end] = k, v
        keys, values = self.k_cache[layer, :b, :end], self.v_cache[layer, :b, :end]  # (B, S, kv, hd)
        qg = q.reshape(b, t, kv, n_heads // kv, hd)
        scores = np.einsum("btkgd,bskd->bkgts", qg, keys) * self.cfg.scale  # a Python float keeps float32
        if self.cfg.attn_softcap:
            scores = self.softcap(scores, self.cfg.attn_softcap)
        scores = np.where(attention_mask(start, t, end, self.cfg.window(layer)), -np.inf, scores)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        return np.einsum("bkgts,bskd->btkgd", scores, values).reshape(b, t, n_heads * hd)

    def silu_mul(self, gate, up):
        return gate / (1.0 + np.exp(-gate)) * up

    def gelu_mul(self, gate, up):
        return 0.5 * gate * (1.0 + np.tanh(GELU_C * (gate + 0.044715 * gate**3))) * up

    def residual(self, x, delta):
        return x + delta

    def softcap(self, x, cap):
        return np.tanh(x / cap) * cap

    def moe(self, x, layer):
        """Each token through the experts it is routed to, one expert's tokens at a time."""
        flat = x.reshape(-1, x.shape[-1])
        probs = self.linear(flat, layer.router)
        probs = np.exp(probs - probs.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :self.cfg.n_experts_used]  # (N, k)
        weights = np.take_along_axis(probs, top, axis=-1)
        weights /= weights.sum(axis=-1, keepdims=True)
        out = np.zeros_like(flat)
        for e in np.unique(top):
            rows, slot = np.nonzero(top == e)
            h = flat[rows]
            y = self.linear(self.silu_mul(self.linear(h, layer.gate_exps[e]), self.linear(h, layer.up_exps[e])),
                            layer.down_exps[e])
            np.add.at(out, rows, y * weights[rows, slot, None])
        return out.reshape(x.shape)


class NumpyBackend(ArrayLlamaBackend):
    name = "numpy"
    description = "pure-numpy f32 reference (defines correct output)"
    is_reference = True

    @classmethod
    def precisions(cls, spec):
        return ("f32",)

    def build(self, spec, opts: LoadOptions) -> LoadInfo:
        self.weights = spec.load_weights(lambda a: a)
        self.ops = NumpyOps(spec.config, opts.max_seq_len, opts.max_batch)
        return float_load_info(spec, "f32", "cpu")

    def threads_used(self) -> tuple[int, str]:
        from threadpoolctl import threadpool_info

        blas = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
        return (max(blas), "") if blas else (1, "numpy found no BLAS library: its matmuls run on one thread")

    def step(self, tokens: list[list[int]], start: int) -> np.ndarray:
        logits = forward(self.ops, self.weights, self.config, np.asarray(tokens), start, len(tokens), len(tokens[0]))
        return np.asarray(logits, dtype=np.float32)
