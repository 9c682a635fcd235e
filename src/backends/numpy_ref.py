"""The reference: an f32 Llama-family model (llama, qwen2, qwen3, gemma2, gemma3) in plain numpy. It defines correct output for every other backend.

It runs any model whose file fits: when the f32 copy of every weight would not fit the load's
memory budget, the output head and as many leading layers as fit are held in f32 and the other
layers are dequantized from the file's memory-mapped blocks each time a step reaches them (and
dropped after), the embedding read row by row from its blocks. The arithmetic is the same, so are
the logits, bit for bit; only slower (the reference runs outside the timed runs).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from backends.base import ArrayLlamaBackend, LoadInfo, LoadOptions, float_load_info
from engine.model.footprint import MemoryNeed, elements, float_need
from engine.model.forward import SeparateProjections, check_batch, forward, layer_rope_tables
from engine.model.spec import LlamaWeights


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

    @classmethod
    def estimate_bytes(cls, spec, opts: LoadOptions) -> MemoryNeed:
        """Every weight in f32, or (beyond the budget) what the streamed plan holds."""
        plan = Streaming.plan(spec, opts)
        return plan.need if plan else float_need(spec, "f32", opts.max_seq_len, opts.max_batch, cls.runtime_bytes)

    def build(self, spec, opts: LoadOptions) -> LoadInfo:
        plan = Streaming.plan(spec, opts)
        self.streamed = plan is not None
        self.weights = plan.load(spec) if plan else spec.load_weights(lambda a: a)
        self.ops = NumpyOps(spec.config, opts.max_seq_len, opts.max_batch)
        if plan is None:
            return float_load_info(spec, "f32", "cpu")
        return float_load_info(spec, "f32", "cpu", resident_layers=plan.resident,
                               streamed_layers=spec.config.n_layers - plan.resident)

    def threads_used(self) -> tuple[int, str]:
        from threadpoolctl import threadpool_info

        blas = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
        return (max(blas), "") if blas else (1, "numpy found no BLAS library: its matmuls run on one thread")

    def every_position_logits(self, tokens):
        """Offered when streaming: one pass over the dequantized layers per window of the fidelity
        pass instead of one per position (a GEMM's sums, not a GEMV's: equal to rounding)."""
        if not getattr(self, "streamed", False):
            return None
        check_batch([tokens], 0, 1, self.max_batch, self.max_seq, self.config.vocab_size)
        self.pos, self.batch = 0, 1
        logits = forward(self.ops, self.weights, self.config, np.asarray([tokens]), 0, 1, len(tokens), every_position=True)
        self.pos = len(tokens)
        return np.asarray(logits[0], dtype=np.float32)

    def step(self, tokens: list[list[int]], start: int) -> np.ndarray:
        logits = forward(self.ops, self.weights, self.config, np.asarray(tokens), start, len(tokens), len(tokens[0]))
        return np.asarray(logits, dtype=np.float32)


@dataclass(frozen=True)
class Streaming:
    """The reference's plan when its f32 weights would not fit `opts.memory_budget_bytes`: the head
    and the first `resident` layers held, the rest dequantized per step. `need` is what it holds."""

    resident: int
    need: MemoryNeed

    @classmethod
    def plan(cls, spec, opts: LoadOptions) -> "Streaming | None":
        """None when everything fits in f32 (or no budget was given)."""
        full = float_need(spec, "f32", opts.max_seq_len, opts.max_batch, NumpyBackend.runtime_bytes)
        budget = opts.memory_budget_bytes
        if not budget or full.total <= budget:
            return None
        c = spec.config
        layer = [sum(elements(spec, f"blk.{i}.{s}") * 4 for s in spec.layer_tensors) for i in range(c.n_layers)]
        head = ["output_norm.weight"] + (["token_embd.weight"] if spec.tied_embeddings else ["output.weight"])
        # a streamed layer is built while the previous one is still referenced: two at most, with
        # the dequantizer's temporaries (the full plan's transient covers those)
        fixed = replace(full, weights=sum(elements(spec, n) * 4 for n in head),
                        transient=full.transient + 2 * max(layer))
        resident, held = 0, 0
        while resident < c.n_layers and fixed.total + held + layer[resident] <= budget:
            held += layer[resident]
            resident += 1
        return cls(resident, replace(fixed, weights=fixed.weights + held))

    def load(self, spec) -> LlamaWeights:
        keep = lambda a: a  # noqa: E731  (the reference holds the dequantized arrays themselves)
        output = spec.tensor("output.weight") if not spec.tied_embeddings else spec.tensor("token_embd.weight")
        embedding = output if spec.tied_embeddings else EmbeddingRows(spec)
        return LlamaWeights(tok_embd=embedding, output_norm=spec.tensor("output_norm.weight"), output=output,
                            layers=StreamedLayers(spec, [spec.layer_weights(i, keep) for i in range(self.resident)]))


class StreamedLayers(Sequence):
    """The layers of a streamed reference: the held ones, then each other layer's weights
    dequantized from the file whenever it is read (the forward reads each once per step)."""

    def __init__(self, spec, held: list):
        self.spec, self.held = spec, held

    def __len__(self) -> int:
        return self.spec.config.n_layers

    def __getitem__(self, i: Any):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self.held[i] if i < len(self.held) else self.spec.layer_weights(i, lambda a: a)


class EmbeddingRows:
    """The embedding table looked up on the file's blocks: the rows of the tokens asked for."""

    def __init__(self, spec):
        self.spec = spec

    def __getitem__(self, tokens: np.ndarray) -> np.ndarray:
        return self.spec.rows("token_embd.weight", tokens)
