"""Synthetic GGUF files with random weights, of every supported architecture (llama, qwen2, qwen3,
qwen3moe, phi3, gemma2, gemma3; `llama3`: llama with Llama 3.x's RoPE factors; `mixtral`: llama
with experts) and a tokenizer of the matching kind:
tiny ones for tests, real shapes for scaling.

Weights are scaled to keep activations O(1), so logits are peaked and greedy tokens are stable
across float implementations. Q/K are written as they come (random), which a converter's RoPE
permutation maps onto itself in distribution; every reader applies the same un-permutation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from engine.errors import InputError
from engine.model.arch import ARCHITECTURES, LlamaConfig, layer_tensors


def _shape(n_layers, dim, n_heads, n_kv_heads, ffn_dim, vocab_size, context_length, rope_base=10000.0):
    return LlamaConfig(n_layers, dim, n_heads, n_kv_heads, ffn_dim, vocab_size, context_length, rope_base, 1e-5)


SHAPES = {
    "tiny": _shape(2, 64, 4, 2, 128, 384, 256),
    "small": _shape(4, 128, 8, 2, 256, 512, 512),
    "135m": _shape(30, 576, 9, 3, 1536, 49152, 8192, 100000.0),  # SmolLM2-135M
    "360m": _shape(32, 960, 15, 5, 2560, 49152, 8192, 100000.0),  # SmolLM2-360M
    "1b": _shape(16, 2048, 32, 8, 8192, 128256, 8192, 500000.0),  # Llama-3.2-1B
}
QTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = (("Ġ", "t"), ("h", "e"), ("i", "n"), ("t", "h"), ("Ġt", "he"))


SPM_PIECES = ("▁", *"abcdefghijklmnopqrstuvwxyz", "▁t", "he", "▁the", "in", "▁a", "er", "▁s", "on", "an", "▁th",
              "▁w", "re", "▁i", "▁in", "at", "en", "▁o", "is", "▁is", "it", "▁it", "or", "ll", "▁c", "▁he", "▁hel",
              "▁hello", "lo", "▁wor", "ld", "▁world")


# specials of each SentencePiece flavour (llama.cpp token types: 2 unknown, 3 control) and the
# ids of (unknown, bos, eos)
SPM_SPECIALS = {
    "llama": ((("<unk>", 2), ("<s>", 3), ("</s>", 3)), (0, 1, 2)),
    # Phi-3's SentencePiece vocab has <|endoftext|> too (llama.cpp looks it up in files named phi3)
    "phi3": ((("<unk>", 2), ("<s>", 3), ("</s>", 3), ("<|endoftext|>", 3)), (0, 1, 2)),
    "gemma": ((("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2), ("<start_of_turn>", 3), ("<end_of_turn>", 3)),
              (3, 2, 1)),
}
# tokenizer name -> (ggml model, pre-tokenizer or SentencePiece flavour)
TOKENIZERS = {"gpt2": ("gpt2", "default"), "qwen2": ("gpt2", "qwen2"), "llama": ("llama", "llama"), "phi3": ("llama", "phi3"),
              "gemma": ("llama", "gemma")}
ARCH_TOKENIZER = {"llama": "gpt2", "llama3": "gpt2", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen2",
                  "qwen3moe": "qwen2", "phi3": "phi3", "gemma2": "gemma", "gemma3": "gemma"}


def _spm_vocab(size: int, flavour: str = "llama") -> tuple[list[str], list[int], list[float]]:
    """A SentencePiece vocab as llama.cpp stores it: specials, 256 byte tokens, pieces."""
    specials = SPM_SPECIALS[flavour][0]
    tokens = [t for t, _ in specials] + [f"<0x{b:02X}>" for b in range(256)] + list(SPM_PIECES)
    if size < len(tokens):
        raise InputError(f"vocab_size must be at least {len(tokens)}")
    tokens += [f"[extra_{i}]" for i in range(size - len(tokens))]
    n = len(specials) + 256
    types = [t for _, t in specials] + [6] * 256 + [1] * (size - n)
    scores = [0.0] * n + [-float(i) for i in range(size - n)]
    return tokens, types, scores


def _vocab(size: int) -> tuple[list[str], list[int], list[str]]:
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = list(SPECIALS) + sorted(ByteLevel.alphabet()) + ["".join(m) for m in MERGES]
    if size < len(tokens):
        raise InputError(f"vocab_size must be at least {len(tokens)}")
    tokens += [f"[extra_{i}]" for i in range(size - len(tokens))]
    types = [3] * len(SPECIALS) + [1] * (size - len(SPECIALS))
    return tokens, types, [" ".join(m) for m in MERGES]


@dataclass(frozen=True)
class Llama3Rope:
    """Llama 3.x's RoPE scaling parameters (transformers' rope_type "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_context: int

    def factors(self, head_dim: int, base: float) -> np.ndarray:
        """Each rotated pair's frequency divisor, as convert_hf_to_gguf bakes them into rope_freqs."""
        wavelen = 2 * np.pi * base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        smooth = (self.original_context / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        blended = 1 / ((1 - smooth) / self.factor + smooth)
        short, long = wavelen < self.original_context / self.high_freq_factor, wavelen > self.original_context / self.low_freq_factor
        return np.where(short, 1.0, np.where(long, self.factor, blended)).astype(np.float32)

    def hf_parameters(self, base: float) -> dict:
        return {"rope_type": "llama3", "rope_theta": base, "factor": self.factor, "low_freq_factor": self.low_freq_factor,
                "high_freq_factor": self.high_freq_factor, "original_max_position_embeddings": self.original_context}


LLAMA3_BASE = 500000.0


def llama3_rope(shape: LlamaConfig) -> Llama3Rope:
    """Llama 3.2's scaling; tiny shapes get an original context of 64, so tests run past it and
    the 8 pairs of a 16-wide head fall in all three bands (kept, blended, divided by the factor)."""
    return Llama3Rope(8.0, 1.0, 4.0, 64) if shape.dim <= 128 else Llama3Rope(32.0, 1.0, 4.0, 8192)


# synthetic architecture names that are variants of a GGUF architecture
VARIANTS = {"llama3": "llama", "mixtral": "llama"}  # Llama 3.x: llama with rope_freqs; Mixtral: with experts


SYNTH_ARCHITECTURES = (*ARCHITECTURES, *VARIANTS)


def gguf_architecture(name: str) -> str:
    return VARIANTS.get(name, name)


def arch_shape(shape: LlamaConfig, architecture: str) -> LlamaConfig:
    """`shape` as a model of `architecture`; tiny shapes get the features worth testing (a head
    size other than dim/heads, a window shorter than the test prompts, local and global layers)."""
    if gguf_architecture(architecture) not in ARCHITECTURES:
        return shape  # written anyway, for tests of the unsupported-architecture error
    arch = ARCHITECTURES[gguf_architecture(architecture)]
    tiny = shape.dim <= 128
    extra: dict = {"arch": arch}
    if arch.qk_norm and tiny:
        extra["key_length"] = 2 * shape.dim // shape.n_heads
    if architecture == "llama3":
        factors = llama3_rope(shape).factors(shape.head_dim, LLAMA3_BASE)
        extra.update(rope_base=LLAMA3_BASE, rope_freq_factors=tuple(float(f) for f in factors))
    elif architecture != "llama":
        extra["rope_base"] = 1e6
    if arch.sliding_window:
        n_layers = max(shape.n_layers, arch.window_pattern) if tiny else shape.n_layers
        extra.update(n_layers=n_layers, sliding_window=4 if tiny else 512,
                     rope_base_local=arch.rope_base_local or extra["rope_base"],
                     local_layers=tuple((i + 1) % arch.window_pattern != 0 for i in range(n_layers)))
    if arch.softcap:  # tiny: caps that bite on O(1) activations (scores ~1, logits ~10)
        extra.update(attn_softcap=2.0 if tiny else 50.0, final_softcap=10.0 if tiny else 30.0)
    if arch.moe_only or architecture == "mixtral":  # tiny: 4 experts, 2 a token; real: Qwen3-30B-A3B's, Mixtral's
        experts = (4, 2, 32) if tiny else (128, 8, 768) if arch.moe_only else (8, 2, shape.ffn_dim)
        extra.update(n_experts=experts[0], n_experts_used=experts[1],
                     expert_ffn_dim=experts[2] if arch.moe_only else shape.ffn_dim)
    return replace(shape, **extra)


FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2, "q4_1": 3}


def write_synthetic(path: str | os.PathLike, shape: LlamaConfig | str = "tiny", qtype: str = "f32", seed: int = 0,
                    tied: bool = True, architecture: str = "llama", tokenizer: str | None = None) -> Path:
    shape, tokenizer = _checked(shape, qtype, architecture, tokenizer)
    s = arch_shape(shape, architecture)
    return write_gguf(path, s, qtype, _Maker(np.random.default_rng(seed)), tied, architecture, tokenizer)


def write_gguf(path: str | os.PathLike, s: LlamaConfig, qtype: str, make: "_Maker", tied: bool, architecture: str,
               tokenizer: str) -> Path:
    """`s` exactly as given (its architecture's features already set), weights from `make`."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), gguf_architecture(architecture))
    w.add_name(f"synthetic-{architecture}-{s.n_layers}x{s.dim}")
    _write_hparams(w, s)
    w.add_file_type(FILE_TYPES[qtype])
    _write_tokenizer(w, tokenizer, s.vocab_size)
    _write_tensors(w, s, qtype, make, tied)
    w.close()
    return path


def _checked(shape: LlamaConfig | str, qtype: str, architecture: str, tokenizer: str | None) -> tuple[LlamaConfig, str]:
    """The shape and tokenizer to write, or an InputError naming what is unknown."""
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise InputError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
        shape = SHAPES[shape]
    if qtype not in QTYPES:
        raise InputError(f"unknown qtype {qtype!r} (known: {', '.join(QTYPES)})")
    tokenizer = tokenizer or ARCH_TOKENIZER.get(architecture, "gpt2")
    if tokenizer not in TOKENIZERS:
        raise InputError(f"unknown tokenizer {tokenizer!r} (known: {', '.join(TOKENIZERS)})")
    return shape, tokenizer


def _write_hparams(w, s: LlamaConfig) -> None:
    w.add_block_count(s.n_layers)
    w.add_context_length(s.context_length)
    w.add_embedding_length(s.dim)
    w.add_feed_forward_length(s.ffn_dim)
    w.add_head_count(s.n_heads)
    w.add_head_count_kv(s.n_kv_heads)
    if s.key_length:
        w.add_key_length(s.head_dim)
        w.add_value_length(s.head_dim)
    if s.sliding_window:
        w.add_sliding_window(s.sliding_window)
    if s.attn_softcap:
        w.add_attn_logit_softcapping(s.attn_softcap)
        w.add_final_logit_softcapping(s.final_softcap)
    if s.n_experts:
        w.add_expert_count(s.n_experts)
        w.add_expert_used_count(s.n_experts_used)
        if s.expert_ffn_dim != s.ffn_dim:
            w.add_expert_feed_forward_length(s.expert_ffn_dim)
    w.add_rope_dimension_count(s.head_dim)
    w.add_rope_freq_base(s.rope_base)
    w.add_layer_norm_rms_eps(s.rms_eps)
    w.add_vocab_size(s.vocab_size)


def _write_tensors(w, s: LlamaConfig, qtype: str, make: "_Maker", tied: bool) -> None:
    """Every tensor of `s`'s architecture, matrices in `qtype`, norms, biases and RoPE factors in
    f32, streamed: the tensor table first, then each tensor made, written and dropped in turn, so
    an 8B file never sits in memory whole."""
    plan = list(tensor_plan(s, make, tied))
    for name, shape, _, quantize in plan:
        raw = _raw_type(qtype if quantize else "f32")
        w.add_tensor_info(name, shape, np.float32, _stored_bytes(shape, raw), raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, _, produce, quantize in plan:
        w.write_tensor_data(_stored(produce(), qtype if quantize else "f32"))


def _raw_type(qtype: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, qtype.upper())


def _stored_bytes(shape: tuple[int, ...], raw) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[raw]
    return int(np.prod(shape)) // block * size


def _stored(arr: np.ndarray, qtype: str) -> np.ndarray:
    import gguf

    if qtype == "f32":
        return arr.astype(np.float32, copy=False)
    if qtype == "f16":
        return arr.astype(np.float16, copy=False)
    return gguf.quants.quantize(arr, _raw_type(qtype))


def tensor_plan(s: LlamaConfig, make: "_Maker", tied: bool):
    """(name, shape, maker, quantized) of every tensor, in file order."""
    yield "token_embd.weight", (s.vocab_size, s.dim), lambda: make.matrix(s.vocab_size, s.dim, 1.0), True
    yield "output_norm.weight", (s.dim,), lambda: np.ones(s.dim, np.float32), False
    if not tied:
        yield "output.weight", (s.vocab_size, s.dim), lambda: make.matrix(s.vocab_size, s.dim, s.dim**-0.5), True
    if s.rope_freq_factors:
        yield "rope_freqs.weight", (len(s.rope_freq_factors),), lambda: np.asarray(s.rope_freq_factors, np.float32), False
    layer = _layer_tensors(s, make)
    for i in range(s.n_layers):
        for suffix, fields in layer_tensors(s.arch, moe=bool(s.n_experts)).items():
            parts = [layer[f] for f in (fields if isinstance(fields, tuple) else (fields,))]
            shapes = [shape for _, shape, _ in parts]
            shape = (sum(sh[0] for sh in shapes), *shapes[0][1:])
            yield (f"blk.{i}.{suffix}", shape,
                   lambda parts=parts: np.concatenate([maker() for maker, _, _ in parts]), parts[0][2])


class _Maker:
    """Random weights scaled to keep activations O(1)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def matrix(self, rows: int, cols: int, scale: float) -> np.ndarray:
        return (self.rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    def norm(self, n: int) -> np.ndarray:
        return (1 + 0.1 * self.rng.standard_normal(n)).astype(np.float32)

    def experts(self, n: int, rows: int, cols: int, scale: float) -> np.ndarray:
        return self.matrix(n * rows, cols, scale).reshape(n, rows, cols)

    def bias(self, n: int) -> np.ndarray:
        return (0.1 * self.rng.standard_normal(n)).astype(np.float32)


class FastMaker(_Maker):
    """The same distributions for files of billions of weights: float32 draws in chunks of rows,
    stored straight into `dtype` (f16 for an F16 file), never a float64 or whole-f32 copy."""

    CHUNK = 1 << 22  # elements per draw

    def __init__(self, rng: np.random.Generator, dtype=np.float16):
        super().__init__(rng)
        self.dtype = dtype

    def matrix(self, rows: int, cols: int, scale: float) -> np.ndarray:
        out = np.empty((rows, cols), self.dtype)
        step = max(1, self.CHUNK // cols)
        for r in range(0, rows, step):
            n = min(step, rows - r)
            out[r:r + n] = self.rng.standard_normal((n, cols), dtype=np.float32) * np.float32(scale)
        return out


def _layer_tensors(s: LlamaConfig, make: _Maker) -> dict:
    """LayerWeights field -> (array maker, shape, quantized); a fused tensor concatenates its fields' rows."""
    hd, q_dim, kv_dim, dim, ffn = s.head_dim, s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.dim, s.ffn_dim
    n, e_ffn = s.n_experts, s.expert_ffn_dim
    return {
        "attn_norm": (lambda: make.norm(dim), (dim,), False),
        "wq": (lambda: make.matrix(q_dim, dim, dim**-0.5), (q_dim, dim), True),
        "wk": (lambda: make.matrix(kv_dim, dim, dim**-0.5), (kv_dim, dim), True),
        "wv": (lambda: make.matrix(kv_dim, dim, dim**-0.5), (kv_dim, dim), True),
        "wo": (lambda: make.matrix(dim, q_dim, 0.5 * q_dim**-0.5), (dim, q_dim), True),
        "ffn_norm": (lambda: make.norm(dim), (dim,), False),
        "w_gate": (lambda: make.matrix(ffn, dim, dim**-0.5), (ffn, dim), True),
        "w_up": (lambda: make.matrix(ffn, dim, dim**-0.5), (ffn, dim), True),
        "w_down": (lambda: make.matrix(dim, ffn, 0.5 * ffn**-0.5), (dim, ffn), True),
        "bq": (lambda: make.bias(q_dim), (q_dim,), False),
        "bk": (lambda: make.bias(kv_dim), (kv_dim,), False),
        "bv": (lambda: make.bias(kv_dim), (kv_dim,), False),
        "q_norm": (lambda: make.norm(hd), (hd,), False),
        "k_norm": (lambda: make.norm(hd), (hd,), False),
        "post_attn_norm": (lambda: make.norm(dim), (dim,), False),
        "post_ffn_norm": (lambda: make.norm(dim), (dim,), False),
        # decisive routing; f32 as converters keep it
        "router": (lambda: make.matrix(n, dim, 3 * dim**-0.5).astype(np.float32), (n, dim), False),
        "gate_exps": (lambda: make.experts(n, e_ffn, dim, dim**-0.5), (n, e_ffn, dim), True),
        "up_exps": (lambda: make.experts(n, e_ffn, dim, dim**-0.5), (n, e_ffn, dim), True),
        "down_exps": (lambda: make.experts(n, dim, e_ffn, 0.5 * e_ffn**-0.5), (n, dim, e_ffn), True),
    }


def _write_tokenizer(w, tokenizer: str, vocab_size: int) -> None:
    model, flavour = TOKENIZERS[tokenizer]
    w.add_tokenizer_model(model)
    if model == "llama":  # SentencePiece, as Llama 1/2, TinyLlama and Gemma files carry
        tokens, types, scores = _spm_vocab(vocab_size, flavour)
        unk, bos, eos = SPM_SPECIALS[flavour][1]
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_scores(scores)
        w.add_unk_token_id(unk)
        w.add_add_bos_token(True)
        if flavour == "gemma":
            w.add_tokenizer_pre("default")
            w.add_add_space_prefix(False)
    else:
        tokens, types, merges = _vocab(vocab_size)
        w.add_tokenizer_pre(flavour)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_add_bos_token(False)
        bos, eos = 1, 2
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
