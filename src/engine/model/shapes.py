"""Synthetic files at the sizes people ship: the dimensions, RoPE scaling and vocabularies of Llama
3.2 1B/3B, Llama 3.1 8B, Qwen2.5 1.5B and a reduced Qwen3-MoE, with seeded random weights.

They measure speed and memory, not text quality. Each is written once as F16, streamed tensor by
tensor (an 8B file is 16 GB), and quantized from it by llama.cpp's own llama-quantize (Q4_K_M,
Q8_0, ...: the gguf package cannot write K-quants); all are cached under cache_dir()/synth.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from engine.errors import InputError
from engine.model.arch import ARCHITECTURES, LlamaConfig
from engine.model.quantize import QUANT_TYPES, llama_quantize
from engine.model.synth import ARCH_TOKENIZER, FastMaker, Llama3Rope, tensor_plan, write_gguf


@dataclass(frozen=True)
class RealShape:
    config: LlamaConfig  # every feature set (RoPE factors, experts, head size)
    architecture: str  # the synthetic architecture name (`llama3`: llama with rope_freqs)
    tied: bool  # output head shares the token embeddings

    def params(self) -> int:
        """Weights the file holds, as the model card counts them (rope_freqs is not a weight)."""
        return sum(int(np.prod(shape)) for name, shape, _, _ in tensor_plan(self.config, FastMaker(None), self.tied)
                   if name != "rope_freqs.weight")


def _llama3(n_layers: int, dim: int, n_heads: int, ffn_dim: int, factor: float, tied: bool) -> RealShape:
    """Llama 3.x: 8 KV heads, 128k vocabulary, RoPE base 500k with `llama3` scaling from 8k."""
    rope = Llama3Rope(factor, 1.0, 4.0, 8192)
    factors = tuple(float(f) for f in rope.factors(dim // n_heads, 500000.0))
    cfg = LlamaConfig(n_layers, dim, n_heads, 8, ffn_dim, 128256, 131072, 500000.0, 1e-5, ARCHITECTURES["llama"],
                      rope_freq_factors=factors)
    return RealShape(cfg, "llama3", tied)


def _qwen(arch: str, n_layers: int, dim: int, n_heads: int, n_kv: int, ffn_dim: int, context: int, tied: bool,
          **extra) -> RealShape:
    """Qwen2.5 / Qwen3: 152k vocabulary, RoPE base 1M, no scaling."""
    cfg = LlamaConfig(n_layers, dim, n_heads, n_kv, ffn_dim, 151936, context, 1e6, 1e-6, ARCHITECTURES[arch])
    return RealShape(replace(cfg, **extra), arch, tied)


REAL_SHAPES = {
    "llama-3.2-1b": _llama3(16, 2048, 32, 8192, 32.0, tied=True),
    "llama-3.2-3b": _llama3(28, 3072, 24, 8192, 32.0, tied=True),
    "llama-3.1-8b": _llama3(32, 4096, 32, 14336, 8.0, tied=False),
    "qwen2.5-1.5b": _qwen("qwen2", 28, 1536, 12, 2, 8960, 32768, tied=True),
    # Qwen3-30B-A3B's layer (head size 128, 768-wide experts, 8 routed) with 16 layers of 32 experts:
    # 3.3B weights, 0.9B read per token
    "qwen3-moe-3b": _qwen("qwen3moe", 16, 2048, 32, 4, 6144, 40960, tied=False, key_length=128, n_experts=32,
                          n_experts_used=8, expert_ffn_dim=768),
}
REAL_QTYPES = tuple(QUANT_TYPES)  # f16 as written, the rest quantized from it
DEFAULT_REAL_QTYPE = "q4_k_m"


def real_synthetic(name: str, qtype: str, where: Path) -> Path:
    """The cached file of shape `name` in `qtype`, written (and quantized) the first time."""
    if name not in REAL_SHAPES:
        raise InputError(f"unknown shape {name!r} (known: {', '.join(REAL_SHAPES)})")
    if qtype not in REAL_QTYPES:
        raise InputError(f"synth:{name} comes in {', '.join(REAL_QTYPES)}, not {qtype!r}")
    path = where / f"{name}-{qtype}.gguf"
    if path.exists():
        return path
    f16 = where / f"{name}-f16.gguf"
    if not f16.exists():
        write_real_shape(name, f16)
    return path if qtype == "f16" else llama_quantize(f16, path, qtype)


def write_real_shape(name: str, dest: Path, seed: int = 0) -> Path:
    """Shape `name` as an F16 file at `dest`, through a .partial renamed when complete."""
    shape = REAL_SHAPES[name]
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f"{dest.name}.{os.getpid()}.partial")  # two processes never share one
    try:
        write_gguf(partial, shape.config, "f16", FastMaker(np.random.default_rng(seed)), shape.tied,
                   shape.architecture, ARCH_TOKENIZER[shape.architecture])
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, dest)
    return dest
