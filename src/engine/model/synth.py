"""Synthetic Llama GGUF files with random weights: tiny ones for tests, real shapes for scaling.

Weights are scaled to keep activations O(1), so logits are peaked and greedy tokens are stable
across float implementations. Q/K are written as they come (random), which a converter's RoPE
permutation maps onto itself in distribution; every reader applies the same un-permutation.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from engine.errors import InputError
from engine.model.spec import LlamaConfig


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


def _spm_vocab(size: int) -> tuple[list[str], list[int], list[float]]:
    """A SentencePiece vocab as llama.cpp stores it: <unk>, <s>, </s>, 256 byte tokens, pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(SPM_PIECES)
    if size < len(tokens):
        raise InputError(f"vocab_size must be at least {len(tokens)}")
    tokens += [f"[extra_{i}]" for i in range(size - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (size - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(size - 259)]
    return tokens, types, scores


def _vocab(size: int) -> tuple[list[str], list[int], list[str]]:
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = list(SPECIALS) + sorted(ByteLevel.alphabet()) + ["".join(m) for m in MERGES]
    if size < len(tokens):
        raise InputError(f"vocab_size must be at least {len(tokens)}")
    tokens += [f"[extra_{i}]" for i in range(size - len(tokens))]
    types = [3] * len(SPECIALS) + [1] * (size - len(SPECIALS))
    return tokens, types, [" ".join(m) for m in MERGES]


def write_synthetic(path: str | os.PathLike, shape: LlamaConfig | str = "tiny", qtype: str = "f32", seed: int = 0,
                    tied: bool = True, architecture: str = "llama", tokenizer: str = "gpt2") -> Path:
    import gguf

    if isinstance(shape, str):
        if shape not in SHAPES:
            raise InputError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
        shape = SHAPES[shape]
    if qtype not in QTYPES:
        raise InputError(f"unknown qtype {qtype!r} (known: {', '.join(QTYPES)})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    s = shape
    hd = s.dim // s.n_heads
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name(f"synthetic-{s.n_layers}x{s.dim}")
    w.add_block_count(s.n_layers)
    w.add_context_length(s.context_length)
    w.add_embedding_length(s.dim)
    w.add_feed_forward_length(s.ffn_dim)
    w.add_head_count(s.n_heads)
    w.add_head_count_kv(s.n_kv_heads)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(s.rope_base)
    w.add_layer_norm_rms_eps(s.rms_eps)
    w.add_vocab_size(s.vocab_size)
    file_type = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2, "q4_1": 3}[qtype]
    w.add_file_type(file_type)
    if tokenizer == "llama":  # SentencePiece, as Llama 1/2 and TinyLlama files carry
        tokens, types, scores = _spm_vocab(s.vocab_size)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_scores(scores)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
    else:
        tokens, types, merges = _vocab(s.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_add_bos_token(False)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

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

    add("token_embd.weight", matrix(s.vocab_size, s.dim, 1.0))
    add("output_norm.weight", np.ones(s.dim, np.float32), quantize=False)
    if not tied:
        add("output.weight", matrix(s.vocab_size, s.dim, s.dim**-0.5))
    for i in range(s.n_layers):
        add(f"blk.{i}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(s.dim)).astype(np.float32), quantize=False)
        add(f"blk.{i}.attn_q.weight", matrix(s.dim, s.dim, s.dim**-0.5))
        add(f"blk.{i}.attn_k.weight", matrix(s.n_kv_heads * hd, s.dim, s.dim**-0.5))
        add(f"blk.{i}.attn_v.weight", matrix(s.n_kv_heads * hd, s.dim, s.dim**-0.5))
        add(f"blk.{i}.attn_output.weight", matrix(s.dim, s.dim, 0.5 * s.dim**-0.5))
        add(f"blk.{i}.ffn_norm.weight", (1 + 0.1 * rng.standard_normal(s.dim)).astype(np.float32), quantize=False)
        add(f"blk.{i}.ffn_gate.weight", matrix(s.ffn_dim, s.dim, s.dim**-0.5))
        add(f"blk.{i}.ffn_up.weight", matrix(s.ffn_dim, s.dim, s.dim**-0.5))
        add(f"blk.{i}.ffn_down.weight", matrix(s.dim, s.ffn_dim, 0.5 * s.ffn_dim**-0.5))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
