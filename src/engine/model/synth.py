"""Synthetic GGUF files with random weights, of every supported architecture (llama, qwen2, qwen3,
gemma3) and a tokenizer of the matching kind: tiny ones for tests, real shapes for scaling.

Weights are scaled to keep activations O(1), so logits are peaked and greedy tokens are stable
across float implementations. Q/K are written as they come (random), which a converter's RoPE
permutation maps onto itself in distribution; every reader applies the same un-permutation.
"""

from __future__ import annotations

import os
from dataclasses import replace
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
    "gemma": ((("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2), ("<start_of_turn>", 3), ("<end_of_turn>", 3)),
              (3, 2, 1)),
}
# tokenizer name -> (ggml model, pre-tokenizer or SentencePiece flavour)
TOKENIZERS = {"gpt2": ("gpt2", "default"), "qwen2": ("gpt2", "qwen2"), "llama": ("llama", "llama"),
              "gemma": ("llama", "gemma")}
ARCH_TOKENIZER = {"llama": "gpt2", "qwen2": "qwen2", "qwen3": "qwen2", "gemma3": "gemma"}


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


def arch_shape(shape: LlamaConfig, architecture: str) -> LlamaConfig:
    """`shape` as a model of `architecture`; tiny shapes get the features worth testing (a head
    size other than dim/heads, a window shorter than the test prompts, local and global layers)."""
    if architecture not in ARCHITECTURES:
        return shape  # written anyway, for tests of the unsupported-architecture error
    arch = ARCHITECTURES[architecture]
    tiny = shape.dim <= 128
    extra: dict = {"arch": arch}
    if arch.qk_norm and tiny:
        extra["key_length"] = 2 * shape.dim // shape.n_heads
    if arch.sliding_window:
        n_layers = max(shape.n_layers, arch.window_pattern) if tiny else shape.n_layers
        extra.update(n_layers=n_layers, sliding_window=4 if tiny else 512, rope_base_local=arch.rope_base_local,
                     local_layers=tuple((i + 1) % arch.window_pattern != 0 for i in range(n_layers)))
    if architecture != "llama":
        extra["rope_base"] = 1e6
    return replace(shape, **extra)


def write_synthetic(path: str | os.PathLike, shape: LlamaConfig | str = "tiny", qtype: str = "f32", seed: int = 0,
                    tied: bool = True, architecture: str = "llama", tokenizer: str | None = None) -> Path:
    import gguf

    if isinstance(shape, str):
        if shape not in SHAPES:
            raise InputError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
        shape = SHAPES[shape]
    if qtype not in QTYPES:
        raise InputError(f"unknown qtype {qtype!r} (known: {', '.join(QTYPES)})")
    tokenizer = tokenizer or ARCH_TOKENIZER.get(architecture, "gpt2")
    if tokenizer not in TOKENIZERS:
        raise InputError(f"unknown tokenizer {tokenizer!r} (known: {', '.join(TOKENIZERS)})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    s = arch_shape(shape, architecture)
    hd = s.head_dim
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name(f"synthetic-{architecture}-{s.n_layers}x{s.dim}")
    w.add_block_count(s.n_layers)
    w.add_context_length(s.context_length)
    w.add_embedding_length(s.dim)
    w.add_feed_forward_length(s.ffn_dim)
    w.add_head_count(s.n_heads)
    w.add_head_count_kv(s.n_kv_heads)
    if s.key_length:
        w.add_key_length(hd)
        w.add_value_length(hd)
    if s.sliding_window:
        w.add_sliding_window(s.sliding_window)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(s.rope_base)
    w.add_layer_norm_rms_eps(s.rms_eps)
    w.add_vocab_size(s.vocab_size)
    file_type = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2, "q4_1": 3}[qtype]
    w.add_file_type(file_type)
    _write_tokenizer(w, tokenizer, s.vocab_size)

    def matrix(rows: int, cols: int, scale: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    def add(name: str, arr: np.ndarray, quantize: bool = True) -> None:
        if not quantize or qtype == "f32":
            w.add_tensor(name, arr)
        elif qtype == "f16":
            w.add_tensor(name, arr.astype(np.float16))
        else:
            q = getattr(gguf.GGMLQuantizationType, qtype.upper())
            w.add_tensor(name, gguf.quants.quantize(arr, q), raw_dtype=q)

    def norm(n: int) -> np.ndarray:
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    q_dim, kv_dim = s.n_heads * hd, s.n_kv_heads * hd
    shapes = {  # suffix -> (array maker, quantized)
        "attn_norm.weight": (lambda: norm(s.dim), False),
        "attn_q.weight": (lambda: matrix(q_dim, s.dim, s.dim**-0.5), True),
        "attn_k.weight": (lambda: matrix(kv_dim, s.dim, s.dim**-0.5), True),
        "attn_v.weight": (lambda: matrix(kv_dim, s.dim, s.dim**-0.5), True),
        "attn_output.weight": (lambda: matrix(s.dim, q_dim, 0.5 * q_dim**-0.5), True),
        "ffn_norm.weight": (lambda: norm(s.dim), False),
        "ffn_gate.weight": (lambda: matrix(s.ffn_dim, s.dim, s.dim**-0.5), True),
        "ffn_up.weight": (lambda: matrix(s.ffn_dim, s.dim, s.dim**-0.5), True),
        "ffn_down.weight": (lambda: matrix(s.dim, s.ffn_dim, 0.5 * s.ffn_dim**-0.5), True),
        "attn_q.bias": (lambda: (0.1 * rng.standard_normal(q_dim)).astype(np.float32), False),
        "attn_k.bias": (lambda: (0.1 * rng.standard_normal(kv_dim)).astype(np.float32), False),
        "attn_v.bias": (lambda: (0.1 * rng.standard_normal(kv_dim)).astype(np.float32), False),
        "attn_q_norm.weight": (lambda: norm(hd), False),
        "attn_k_norm.weight": (lambda: norm(hd), False),
        "post_attention_norm.weight": (lambda: norm(s.dim), False),
        "post_ffw_norm.weight": (lambda: norm(s.dim), False),
    }
    add("token_embd.weight", matrix(s.vocab_size, s.dim, 1.0))
    add("output_norm.weight", np.ones(s.dim, np.float32), quantize=False)
    if not tied:
        add("output.weight", matrix(s.vocab_size, s.dim, s.dim**-0.5))
    for i in range(s.n_layers):
        for suffix in layer_tensors(s.arch):
            make, quantize = shapes[suffix]
            add(f"blk.{i}.{suffix}", make(), quantize=quantize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


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
