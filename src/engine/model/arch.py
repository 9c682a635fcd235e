"""Architectures as data: what the shared forward does differently for llama (and Mixtral), qwen2,
qwen3, qwen3moe, phi3, gemma2, gemma3.

`Architecture` names the structural choices of a family (biases on Q/K/V, per-head Q/K RMSNorm,
norms after attention and feed-forward, the gated activation, embedding scale, sliding windows);
`read_config` reads the numbers from a GGUF's metadata into one `LlamaConfig`. Anything in the
file this code does not implement (a RoPE scaling type, logit soft-capping, experts) is a
ModelError naming the key, never silently different output. Llama 3.x's RoPE scaling comes as
data too: the converter bakes its `llama3` parameters into per-pair frequency divisors (the
`rope_freqs.weight` tensor; GGUF has no keys for them), which `read_config` takes as
`rope_freq_factors`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from engine.errors import ModelError


@dataclass(frozen=True)
class Architecture:
    name: str
    qkv_bias: bool = False  # attn_q/k/v.bias (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head of Q and K before RoPE (Qwen3, Gemma 3)
    post_norms: bool = False  # RMSNorm on the attention and feed-forward outputs (Gemma 3)
    activation: str = "silu"  # the feed-forward gate: "silu" or "gelu_tanh"
    embed_scale: bool = False  # embeddings times sqrt(dim) (Gemma)
    permuted_qk: bool = False  # the converter permuted Q/K rows for interleaved RoPE (llama only)
    sliding_window: bool = False  # local layers attend to a window (Gemma 3)
    window_pattern: int = 0  # every Nth layer is global when the file names no pattern
    rope_base_local: float = 10000.0  # RoPE base of the local layers (0: the global base)
    rope_freqs: bool = False  # reads rope_freqs.weight, per-pair frequency divisors (Llama 3.x)
    softcap: bool = False  # cap * tanh(x / cap) on attention scores and final logits (Gemma 2)
    wide_scale_layers: int = 0  # the model with this many layers scales queries by 1/sqrt(dim/heads) (27B)
    fused: bool = False  # Q/K/V in one attn_qkv, gate and up in one ffn_up (Phi-3): split at load
    experts: bool = False  # feed-forward may be a mixture of experts (expert_count > 0: Mixtral)
    moe_only: bool = False  # ... and always is (Qwen3-MoE)


ARCHITECTURES = {
    "llama": Architecture("llama", permuted_qk=True, rope_freqs=True, experts=True),
    "qwen2": Architecture("qwen2", qkv_bias=True),
    "qwen3": Architecture("qwen3", qk_norm=True),
    "qwen3moe": Architecture("qwen3moe", qk_norm=True, experts=True, moe_only=True),
    "phi3": Architecture("phi3", fused=True),
    "gemma2": Architecture("gemma2", post_norms=True, activation="gelu_tanh", embed_scale=True, sliding_window=True,
                           window_pattern=2, rope_base_local=0.0, softcap=True, wide_scale_layers=46),
    "gemma3": Architecture("gemma3", qk_norm=True, post_norms=True, activation="gelu_tanh", embed_scale=True,
                           sliding_window=True, window_pattern=6, wide_scale_layers=62),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)

# GGUF tensor suffix (after blk.N.) -> LayerWeights field; OPTIONAL_LAYER_TENSORS by the flag that needs them
LAYER_TENSORS = {
    "attn_norm.weight": "attn_norm", "attn_q.weight": "wq", "attn_k.weight": "wk", "attn_v.weight": "wv",
    "attn_output.weight": "wo", "ffn_norm.weight": "ffn_norm", "ffn_gate.weight": "w_gate",
    "ffn_up.weight": "w_up", "ffn_down.weight": "w_down",
}
OPTIONAL_LAYER_TENSORS = {
    "qkv_bias": {"attn_q.bias": "bq", "attn_k.bias": "bk", "attn_v.bias": "bv"},
    "qk_norm": {"attn_q_norm.weight": "q_norm", "attn_k_norm.weight": "k_norm"},
    "post_norms": {"post_attention_norm.weight": "post_attn_norm", "post_ffw_norm.weight": "post_ffn_norm"},
}


# a mixture-of-experts feed-forward: the router and each expert's matrices stacked (experts, rows, cols)
EXPERT_TENSORS = {"ffn_gate_inp.weight": "router", "ffn_gate_exps.weight": "gate_exps",
                  "ffn_up_exps.weight": "up_exps", "ffn_down_exps.weight": "down_exps"}
DENSE_FFN = ("w_gate", "w_up", "w_down")
# fused GGUF tensor -> the LayerWeights fields its row blocks are, in order (Phi-3)
FUSED_LAYER_TENSORS = {"attn_qkv.weight": ("wq", "wk", "wv"), "ffn_up.weight": ("w_gate", "w_up")}


def layer_tensors(arch: Architecture, moe: bool = False) -> dict[str, str | tuple[str, ...]]:
    """Every per-layer tensor this architecture needs (with experts when `moe`), suffix ->
    LayerWeights field (a tuple of fields for a fused tensor whose row blocks they are)."""
    out: dict[str, str | tuple[str, ...]] = dict(LAYER_TENSORS)
    if moe:
        out = {k: v for k, v in out.items() if v not in DENSE_FFN} | EXPERT_TENSORS
    if arch.fused:
        for parts in FUSED_LAYER_TENSORS.values():
            out = {k: v for k, v in out.items() if v not in parts}
        out.update(FUSED_LAYER_TENSORS)
    for flag, names in OPTIONAL_LAYER_TENSORS.items():
        if getattr(arch, flag):
            out.update(names)
    return out


@dataclass(frozen=True)
class LlamaConfig:
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    rope_base: float
    rms_eps: float
    arch: Architecture = ARCHITECTURES["llama"]
    key_length: int = 0  # head size when the file gives one (Gemma 3, Qwen3); else dim / heads
    attn_scale: float = 0.0  # 0: 1/sqrt(head_dim)
    sliding_window: int = 0  # keys a local layer sees, the query's own included; 0: no local layers
    local_layers: tuple[bool, ...] = ()  # per layer: True where attention is windowed
    rope_base_local: float = 0.0  # RoPE base of the local layers
    rope_linear_factor: float = 1.0  # linear RoPE scaling of the global layers
    rope_freq_factors: tuple[float, ...] = ()  # per rotated pair, divides its frequency (llama.cpp's freq_factors)
    attn_softcap: float = 0.0  # attention scores capped to (-cap, cap) by cap * tanh(s / cap); 0: none
    n_experts: int = 0  # experts per mixture-of-experts layer; 0: dense feed-forward
    n_experts_used: int = 0  # experts each token is routed to (top-k of the router's softmax, renormalised)
    expert_ffn_dim: int = 0  # hidden size of each expert
    final_softcap: float = 0.0  # the same on the output logits

    @property
    def head_dim(self) -> int:
        return self.key_length or self.dim // self.n_heads

    @property
    def scale(self) -> float:
        return self.attn_scale or self.head_dim ** -0.5

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.dim) if self.arch.embed_scale else 1.0

    def window(self, layer: int) -> int:
        """Keys layer `layer` attends to (the query's own position included); 0 for all of them."""
        return self.sliding_window if self.local_layers and self.local_layers[layer] else 0

    def rope(self, layer: int) -> tuple[float, float]:
        """(base, position scale) of layer `layer`'s RoPE."""
        if self.window(layer):
            return self.rope_base_local, 1.0
        return self.rope_base, 1.0 / self.rope_linear_factor

    def kv_bytes_per_token(self, element_bytes: int) -> int:
        """KV-cache bytes one position adds: K and V, every layer."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * element_bytes

    def __post_init__(self) -> None:
        if (not self.key_length and self.dim % self.n_heads) or self.n_heads % self.n_kv_heads:
            raise ModelError(
                f"inconsistent heads: dim={self.dim} heads={self.n_heads} kv_heads={self.n_kv_heads}"
            )


def read_config(arch_name: str, field: Callable[[str, Any], Any], positive: Callable[..., int],
                vocab_from_tensor: int, rope_freq_factors: tuple[float, ...] = ()) -> LlamaConfig:
    """The config of a GGUF whose general.architecture is `arch_name`, from its metadata.

    `field(key, default)` reads a key; `positive(key, default=None)` reads a whole number >= 1;
    `rope_freq_factors` are the values of the file's rope_freqs.weight, if it has one."""
    if arch_name not in ARCHITECTURES:
        raise ModelError(f"unsupported architecture {arch_name!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    arch = ARCHITECTURES[arch_name]
    a = arch_name
    _reject_unsupported(arch, field)
    n_heads = positive(f"{a}.attention.head_count")
    n_layers = positive(f"{a}.block_count")
    key_length = int(field(f"{a}.attention.key_length", 0) or 0)
    value_length = int(field(f"{a}.attention.value_length", 0) or 0)
    head_dim = key_length or positive(f"{a}.embedding_length") // n_heads
    if value_length and value_length != head_dim:
        raise ModelError(f"{a}.attention.value_length {value_length} differs from the key length: not supported")
    rotated = int(field(f"{a}.rope.dimension_count", head_dim) or head_dim)
    if rotated != head_dim:
        raise ModelError(f"metadata {a}.rope.dimension_count = {rotated}: RoPE over part of the {head_dim}-wide head "
                         "is not supported")
    scaling = str(field(f"{a}.rope.scaling.type", "none") or "none")
    factor = float(field(f"{a}.rope.scaling.factor", 1.0) or 1.0) if scaling == "linear" else 1.0
    rope_base = float(field(f"{a}.rope.freq_base", 10000.0))
    cfg = dict(
        n_layers=n_layers,
        dim=positive(f"{a}.embedding_length"),
        n_heads=n_heads,
        n_kv_heads=positive(f"{a}.attention.head_count_kv", n_heads),
        ffn_dim=positive(f"{a}.feed_forward_length"),
        vocab_size=int(field(f"{a}.vocab_size", 0) or vocab_from_tensor),
        context_length=int(field(f"{a}.context_length", 2048)),
        rope_base=rope_base,
        rms_eps=float(field(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        arch=arch, key_length=key_length,
        rope_base_local=float(field(f"{a}.rope.freq_base_swa", arch.rope_base_local or rope_base)),
        rope_linear_factor=factor, rope_freq_factors=tuple(rope_freq_factors),
        **_windows_and_caps(arch, field, positive, n_layers), **_experts(arch, field, positive),
    )
    cfg["attn_scale"] = float(field(f"{a}.attention.scale", 0.0) or 0.0) or _wide_scale(arch, cfg)
    config = LlamaConfig(**cfg)
    _check_freq_factors(config)
    return config


def _check_freq_factors(cfg: LlamaConfig) -> None:
    """rope_freqs.weight: one positive divisor per rotated pair, on an architecture that reads it."""
    factors = cfg.rope_freq_factors
    if not factors:
        return
    if not cfg.arch.rope_freqs:
        raise ModelError(f"tensor rope_freqs.weight (RoPE frequency factors) is not supported for {cfg.arch.name}")
    if len(factors) != cfg.head_dim // 2 or min(factors) <= 0:
        raise ModelError(f"tensor rope_freqs.weight must hold {cfg.head_dim // 2} positive factors (one per rotated "
                         f"pair), got {len(factors)} with minimum {min(factors)}")


def _windows_and_caps(arch: Architecture, field: Callable[[str, Any], Any], positive: Callable[..., int],
                      n_layers: int) -> dict:
    """Sliding-window layers and soft-caps (llama.cpp's Gemma 2 defaults: 50 and 30) where the
    architecture has them."""
    a, out = arch.name, {}
    if arch.sliding_window:
        out.update(sliding_window=positive(f"{a}.attention.sliding_window"),
                   local_layers=_local_layers(a, field, n_layers, arch.window_pattern))
    if arch.softcap:
        out.update(attn_softcap=float(field(f"{a}.attn_logit_softcapping", 50.0)),
                   final_softcap=float(field(f"{a}.final_logit_softcapping", 30.0)))
    return out


def _experts(arch: Architecture, field: Callable[[str, Any], Any], positive: Callable[..., int]) -> dict:
    """Expert counts where the file has experts (llama.cpp's build_moe_ffn for llama and qwen3moe:
    softmax, top-k, renormalised; an `expert_weights_scale` other than 1 is not implemented)."""
    a = arch.name
    if not arch.experts or not field(f"{a}.expert_count", 0):
        if arch.moe_only:
            raise ModelError(f"metadata {a}.expert_count is missing: {a} is a mixture of experts")
        return {}
    for key in ("expert_weights_scale", "expert_shared_count"):
        value = field(f"{a}.{key}", None)
        if value is not None and float(value) not in (0.0, 1.0 if key == "expert_weights_scale" else 0.0):
            raise ModelError(f"metadata {a}.{key} = {value} is not supported")
    n, used = positive(f"{a}.expert_count"), positive(f"{a}.expert_used_count")
    if used > n:
        raise ModelError(f"metadata {a}.expert_used_count = {used} exceeds expert_count = {n}")
    ffn = positive(f"{a}.expert_feed_forward_length", positive(f"{a}.feed_forward_length"))
    return dict(n_experts=n, n_experts_used=used, expert_ffn_dim=ffn)


def _wide_scale(arch: Architecture, cfg: dict) -> float:
    """Gemma 2 and 3 27B scale queries by 1/sqrt(dim/heads), the others by 1/sqrt(head size), as
    llama.cpp decides by the layer count (the file has no key for it)."""
    return (cfg["dim"] / cfg["n_heads"]) ** -0.5 if cfg["n_layers"] == arch.wide_scale_layers else 0.0


# keys whose presence changes the arithmetic in ways not implemented here -> what they mean
_UNSUPPORTED_KEYS = {
    "final_logit_softcapping": "logit soft-capping",
    "attn_logit_softcapping": "attention logit soft-capping",
    "expert_count": "a mixture of experts",
    "rope.scaling.attn_factor": "RoPE attention factor",
}
_NEUTRAL = {"rope.scaling.attn_factor": 1.0}  # values that change nothing
ROPE_SCALING_TYPES = ("none", "linear")


_SOFTCAP_KEYS = ("final_logit_softcapping", "attn_logit_softcapping")


def _reject_unsupported(arch: Architecture, field: Callable[[str, Any], Any]) -> None:
    a = arch.name
    for key, what in _UNSUPPORTED_KEYS.items():
        if (arch.softcap and key in _SOFTCAP_KEYS) or (arch.experts and key == "expert_count"):
            continue
        value = field(f"{a}.{key}", None)
        if value is not None and float(value) != _NEUTRAL.get(key, 0.0):
            raise ModelError(f"metadata {a}.{key} = {value}: {what} is not supported")
    scaling = field(f"{a}.rope.scaling.type", None)
    if scaling is not None and str(scaling) not in ROPE_SCALING_TYPES:
        raise ModelError(f"metadata {a}.rope.scaling.type = {scaling!r} is not supported "
                         f"(supported: {', '.join(ROPE_SCALING_TYPES)})")


def _local_layers(a: str, field: Callable[[str, Any], Any], n_layers: int, default_pattern: int) -> tuple[bool, ...]:
    """Which layers use the sliding window: `{arch}.attention.sliding_window_pattern` as a period
    (every Nth layer global, as llama.cpp and transformers default to 6 for Gemma 3) or per layer."""
    pattern = field(f"{a}.attention.sliding_window_pattern", default_pattern)
    if isinstance(pattern, (list, tuple)):
        if len(pattern) != n_layers:
            raise ModelError(f"metadata {a}.attention.sliding_window_pattern has {len(pattern)} entries "
                             f"for {n_layers} layers")
        return tuple(bool(p) for p in pattern)
    period = int(pattern)
    if period < 1:
        raise ModelError(f"metadata {a}.attention.sliding_window_pattern must be at least 1, got {period}")
    return tuple((i + 1) % period != 0 for i in range(n_layers))
