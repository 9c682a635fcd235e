"""The Llama-family forward pass (llama, qwen2, qwen3, gemma2, gemma3), written once against a small ops protocol.

numpy, torch, MLX, tinygrad and the hybrid backend each implement `LlamaOps` with their own
fastest primitives and wrap `forward` in their own JIT; the arithmetic and its order live here.
Activations are (batch, tokens, dim): `batch` independent sequences, each with its own KV cache,
all at the same positions, so one step reads the weights once for every sequence. Arrays only
need `.reshape` and `[:, -1]`; everything else goes through the ops. Architectures
differ only in data the config carries (`cfg.arch`: biases, Q/K norms, post-norms, activation,
embedding scale, soft-caps; per layer: attention window and RoPE frequencies), never in a copy of
this code.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

from engine.model.spec import LlamaConfig, LlamaWeights

Array = Any


class LlamaOps(Protocol):
    def embed(self, table: Array, tokens: Array) -> Array: ...  # (B, T) -> (B, T, dim)
    def rms_norm(self, x: Array, weight: Array) -> Array: ...
    def linear(self, x: Array, weight: Array) -> Array: ...  # x @ weight.T
    def rope(self, x: Array, start: Any, layer: int) -> Array: ...  # (B, T, heads, head_dim), rotate-half,
    # ^ with layer's frequencies (rope_frequencies(cfg, layer))
    def attend(self, layer: int, q: Array, k: Array, v: Array, start: Any) -> Array: ...
    # ^ q (B, T, heads, hd), k and v (B, T, kv_heads, hd): writes k, v to sequence b's KV cache at
    #   [start, start+T), attends causally (within cfg.window(layer) when it is not 0) with scale
    #   cfg.scale, scores soft-capped when cfg.attn_softcap, returns (B, T, heads*head_dim)
    def silu_mul(self, gate: Array, up: Array) -> Array: ...
    def gelu_mul(self, gate: Array, up: Array) -> Array: ...  # GELU, tanh approximation
    def add_bias(self, x: Array, bias: Array) -> Array: ...
    def scale(self, x: Array, factor: float) -> Array: ...
    def residual(self, x: Array, delta: Array) -> Array: ...  # x + delta: where lazy frameworks materialise
    def softcap(self, x: Array, cap: float) -> Array: ...  # cap * tanh(x / cap)
    def moe(self, x: Array, layer: Any) -> Array: ...
    # ^ mixture of experts, x (B, T, dim): each token's router softmax (layer.router), its top
    #   cfg.n_experts_used experts with their probabilities renormalised to sum 1, the weighted sum
    #   of those experts' SiLU-gated feed-forwards (layer.gate_exps/up_exps/down_exps, stacked)
    def project(self, layer: int, kind: str, x: Array, weights: tuple) -> tuple: ...
    # ^ several linears of one input ("qkv", "gate_up"); a framework may run them as one fused matmul


class ElementwiseDefaults:
    """`add_bias` and `scale` through the arrays' own operators: every framework here has them."""

    def add_bias(self, x: Array, bias: Array) -> Array:
        return x + bias

    def scale(self, x: Array, factor: float) -> Array:
        return x * factor


class SeparateProjections(ElementwiseDefaults):
    """`project` as one `linear` per weight: for ops tables without fused weights."""

    def project(self, layer: int, kind: str, x: Array, weights: tuple) -> tuple:
        return tuple(self.linear(x, w) for w in weights)


FUSED_PROJECTIONS = (("qkv", ("wq", "wk", "wv")), ("gate_up", ("w_gate", "w_up")))  # gate_up: dense layers only


class FusedProjections(ElementwiseDefaults):
    """`project` as one matmul over concatenated weights (one GEMV instead of three and two).

    `fuse(layers)` concatenates each layer's Q/K/V and gate/up rows and makes the separate weights
    views into the fused matrix, so there is still one copy in memory. The framework supplies
    `concat_rows`, `split_rows` and `split_last`."""

    def fuse(self, layers: Sequence[Any]) -> None:
        self.fused: dict[str, list] = {kind: [] for kind, _ in FUSED_PROJECTIONS}
        for layer in layers:
            for kind, names in FUSED_PROJECTIONS:
                parts = [getattr(layer, n) for n in names]
                if parts[0] is None:  # experts instead of a dense feed-forward
                    self.fused[kind].append(None)
                    continue
                sizes = [int(p.shape[0]) for p in parts]
                fused = self.concat_rows(parts)
                for name, view in zip(names, self.split_rows(fused, sizes)):
                    setattr(layer, name, view)
                self.fused[kind].append((fused, sizes))

    def project(self, layer: int, kind: str, x: Array, weights: tuple) -> tuple:
        fused, sizes = self.fused[kind][layer]
        return tuple(self.split_last(self.linear(x, fused), sizes))


ACTIVATIONS = {"silu": "silu_mul", "gelu_tanh": "gelu_mul"}  # cfg.arch.activation -> the gated op


def block(ops: LlamaOps, i: int, layer: Any, cfg: LlamaConfig, x: Array, start: Any, batch: int,
          n_tokens: int) -> Array:
    """Transformer block `i`: attention then a gated feed-forward, each with a pre-norm (and, where
    the architecture has them, a post-norm) and a residual."""
    arch, hd = cfg.arch, cfg.head_dim
    h = ops.rms_norm(x, layer.attn_norm)
    q, k, v = ops.project(i, "qkv", h, (layer.wq, layer.wk, layer.wv))
    if arch.qkv_bias:
        q, k, v = ops.add_bias(q, layer.bq), ops.add_bias(k, layer.bk), ops.add_bias(v, layer.bv)
    q, k = q.reshape(batch, n_tokens, cfg.n_heads, hd), k.reshape(batch, n_tokens, cfg.n_kv_heads, hd)
    if arch.qk_norm:  # one RMSNorm over each head's vector
        q, k = ops.rms_norm(q, layer.q_norm), ops.rms_norm(k, layer.k_norm)
    q, k = ops.rope(q, start, i), ops.rope(k, start, i)
    a = ops.linear(ops.attend(i, q, k, v.reshape(batch, n_tokens, cfg.n_kv_heads, hd), start), layer.wo)
    x = ops.residual(x, ops.rms_norm(a, layer.post_attn_norm) if arch.post_norms else a)
    h = ops.rms_norm(x, layer.ffn_norm)
    if cfg.n_experts:
        f = ops.moe(h, layer)
    else:
        gate, up = ops.project(i, "gate_up", h, (layer.w_gate, layer.w_up))
        f = ops.linear(getattr(ops, ACTIVATIONS[arch.activation])(gate, up), layer.w_down)
    return ops.residual(x, ops.rms_norm(f, layer.post_ffn_norm) if arch.post_norms else f)


def head(ops: LlamaOps, w: LlamaWeights, cfg: LlamaConfig, x: Array, every_position: bool = False) -> Array:
    """Logits of each sequence's last position, shape (B, vocab) (of every position, (B, T, vocab),
    with `every_position`), soft-capped where the architecture caps them."""
    logits = ops.linear(ops.rms_norm(x if every_position else x[:, -1], w.output_norm), w.output)
    return ops.softcap(logits, cfg.final_softcap) if cfg.final_softcap else logits


def embed(ops: LlamaOps, w: LlamaWeights, cfg: LlamaConfig, tokens: Array) -> Array:
    x = ops.embed(w.tok_embd, tokens)
    return ops.scale(x, cfg.embed_scale) if cfg.arch.embed_scale else x


def forward(ops: LlamaOps, w: LlamaWeights, cfg: LlamaConfig, tokens: Array, start: Any, batch: int,
            n_tokens: int, every_position: bool = False) -> Array:
    """Logits (B, vocab) of each sequence's last position, for `tokens` (B, T) placed at `start`
    (of every position, (B, T, vocab), with `every_position`)."""
    x = embed(ops, w, cfg, tokens)
    for i, layer in enumerate(w.layers):
        x = block(ops, i, layer, cfg, x, start, batch, n_tokens)
    return head(ops, w, cfg, x, every_position)


def rope_frequencies(cfg: LlamaConfig, layer: int) -> np.ndarray:
    """Radians per position of each rotated pair of layer `layer` (head_dim / 2, float64): the
    base's frequencies times the layer's position scale, divided by the file's per-pair factors
    (Llama 3.x's rope_freqs) where the layer is global."""
    base, position_scale = cfg.rope(layer)
    inv_freq = position_scale / base ** (np.arange(cfg.head_dim // 2, dtype=np.float64) * 2 / cfg.head_dim)
    if cfg.rope_freq_factors and not cfg.window(layer):
        inv_freq = inv_freq / np.asarray(cfg.rope_freq_factors, dtype=np.float64)
    return inv_freq


def rope_tables(inv_freq: np.ndarray, max_seq: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape (max_seq, head_dim): rotate-half layout, float32."""
    angles = np.outer(np.arange(max_seq, dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def layer_rope_tables(cfg: LlamaConfig, max_seq: int, convert=lambda a: a) -> list[tuple[Any, Any]]:
    """(cos, sin) for every layer, through `convert`; layers with the same RoPE share one pair."""
    made: dict[bytes, tuple[Any, Any]] = {}
    out = []
    for i in range(cfg.n_layers):
        inv_freq = rope_frequencies(cfg, i)
        key = inv_freq.tobytes()
        if key not in made:
            made[key] = tuple(convert(t) for t in rope_tables(inv_freq, max_seq))
        out.append(made[key])
    return out


def check_batch(prompts: Sequence[Sequence[int]], start: int, batch: int, max_batch: int, max_seq: int,
                vocab: int) -> None:
    """Prompts appended to a batch of sequences: as many as the batch holds (any number up to
    `max_batch` when starting at 0), all of one length, each in range."""
    from engine.errors import InputError

    if not prompts:
        raise InputError("empty batch: at least one sequence is needed")
    if len(prompts) > max_batch:
        raise InputError(f"batch of {len(prompts)} sequences exceeds the {max_batch} this model was loaded for")
    if start and len(prompts) != batch:
        raise InputError(f"batch of {len(prompts)} sequences appended to a batch of {batch}")
    if len({len(p) for p in prompts}) > 1:
        raise InputError(f"sequences of a batch must have one length, got {sorted({len(p) for p in prompts})}")
    for p in prompts:
        check_tokens(p, start, max_seq, vocab)


def check_tokens(tokens: Sequence[int], start: int, max_seq: int, vocab: int) -> None:
    from engine.errors import InputError

    if not tokens:
        raise InputError("empty prompt: at least one token is needed")
    if start + len(tokens) > max_seq:
        raise InputError(f"sequence of {start + len(tokens)} tokens exceeds the context of {max_seq}")
    if (min(tokens) < 0 or max(tokens) >= vocab):
        raise InputError(f"token id out of range for a vocabulary of {vocab}")
