"""`mlx`: the shared Llama-family forward on MLX arrays, float or natively quantized.

At the file's own quantization (Q4_0, Q4_1, Q8_0) the weights load through `mx.load` on the .gguf
as MLX quantized matrices (packed values, scales, biases) and run with `mx.quantized_matmul`: the
very blocks llama.cpp runs, not a re-quantized copy. K-quant files (Q4_K_M, ...) load through
engine.model.kquant: every group-32 block type (Q4_K, Q5_K, Q5_0, Q8_0, ...) becomes a 4-, 5- or 8-bit
matrix of scales d*sc and biases -dmin*m, exact; Q6_K (scales per 16, finer than MLX's groups of
32 at least) runs as the `q6_k` option says: f32 (exact) or q8 (re-quantized to 8-bit groups). MLX is lazy: `step` evaluates everything
before the host reads logits, so nothing unevaluated is timed as done.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends.base import (FLOAT_PRECISIONS, ArrayLlamaBackend, BackendOption, LoadInfo, LoadOptions, Mode,
                           Requirement, float_load_info, pip_extra)
from backends.mlx_blas import BLAS_CHOICES, blas_threads, bound_blas, import_mlx
from engine.model.kquant import AFFINE_BITS
from engine.errors import UnavailableError
from engine.model.footprint import MemoryNeed, conversion_peak, elements, float_need, kv_bytes, weight_bytes
from engine.model.forward import SeparateProjections, forward, rope_frequencies

MLX = Requirement("mlx", "mlx", pip_extra("mlx"))
NATIVE_QUANT = {"q4_0": 4, "q4_1": 4, "q8_0": 8}  # GGUF types MLX loads as quantized matrices
KQUANT_FILES = ("q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s")  # file types engine.model.kquant loads
Q6K_MODES = ("f32", "q8")
PACK_ROWS = 4096  # rows packed at a time (the packing's uint64 temporaries are 8 bytes a value)
GROUP_SIZE = 32
MLX_RUNTIME = 60 * 2**20  # MLX's library and allocator beside the model (measured)
# bytes MLX holds per byte of the GGUF's blocks: 4- or 8-bit values, an f16 scale and bias per 32
NATIVE_BYTES = {"q4_0": 20 / 18, "q4_1": 1.0, "q8_0": 36 / 34}
GELU_C = (2.0 / np.pi) ** 0.5


@dataclass
class QuantizedMatrix:
    weight: Any  # packed uint32
    scales: Any
    biases: Any
    bits: int

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.scales.nbytes + self.biases.nbytes


class MlxOps(SeparateProjections):
    def __init__(self, cfg, max_seq: int, max_batch: int, dtype):
        mx = import_mlx()

        self.mx, self.cfg, self.dtype = mx, cfg, dtype
        self.rope_periods = [mx.array((1.0 / rope_frequencies(cfg, i)).astype(np.float32)) for i in range(cfg.n_layers)]
        shape = (max_batch, cfg.n_kv_heads, max_seq, cfg.head_dim)
        self.k_cache = [mx.zeros(shape, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v_cache = [mx.zeros(shape, dtype=dtype) for _ in range(cfg.n_layers)]

    def embed(self, table, tokens):
        if isinstance(table, QuantizedMatrix):  # dequantize only the looked-up rows
            return self.mx.dequantize(table.weight[tokens], table.scales[tokens], table.biases[tokens],
                                      group_size=GROUP_SIZE, bits=table.bits).astype(self.dtype)
        return table[tokens]

    def rms_norm(self, x, weight):
        return self.mx.fast.rms_norm(x, weight, self.cfg.rms_eps)

    def linear(self, x, weight):
        # x (B, T, dim) against a 2D weight: MLX folds B*T into the rows of one matmul (mx.matmul
        # flattens; Metal's quantized kernel takes contiguous x as B*T rows), so no per-sequence loop
        if isinstance(weight, QuantizedMatrix):
            return self.mx.quantized_matmul(x, weight.weight, weight.scales, weight.biases, transpose=True,
                                            group_size=GROUP_SIZE, bits=weight.bits)
        return x @ weight.T

    def rope(self, x, start, layer):
        # (B, T, H, D) -> (B, H, T, D): mx.fast.rope rotates along the second-to-last axis; its
        # `freqs` are periods (radians per position = 1 / freqs), base and position scale folded in
        rotated = self.mx.fast.rope(x.transpose(0, 2, 1, 3), self.cfg.head_dim, traditional=False,
                                    base=None, scale=1.0, offset=start, freqs=self.rope_periods[layer])
        return rotated.transpose(0, 2, 1, 3)

    def attend(self, layer, q, k, v, start):
        b, t = q.shape[:2]
        end = start + t
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        kc[:b, :, start:end, :] = k.transpose(0, 2, 1, 3)
        vc[:b, :, start:end, :] = v.transpose(0, 2, 1, 3)
        window, q, keys, values = self.cfg.window(layer), q.transpose(0, 2, 1, 3), kc[:b, :, :end, :], vc[:b, :, :end, :]
        if self.cfg.attn_softcap:
            out = self._capped_attention(q, keys, values, start, window)
        else:
            if window and end > window:  # keys (start+i-window, start+i] for query i
                mask = self._keep(start, end, window)
            else:
                mask = "causal" if t > 1 else None  # causal aligned to the end of the keys
            out = self.mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.cfg.scale, mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(b, t, -1)

    def _keep(self, start, end, window):
        """(T, S) True where query start+i sees key j: causal, within `window` when not 0."""
        qpos, kpos = self.mx.arange(start, end)[:, None], self.mx.arange(end)[None, :]
        return (kpos <= qpos) & (kpos > qpos - window) if window else kpos <= qpos

    def _capped_attention(self, q, k, v, start, window):
        """Attention with soft-capped scores (Gemma 2), which the fused kernel cannot do."""
        mx = self.mx
        group = q.shape[1] // k.shape[1]
        k, v = mx.repeat(k, group, axis=1), mx.repeat(v, group, axis=1)
        scores = self.softcap((q @ k.transpose(0, 1, 3, 2)) * self.cfg.scale, self.cfg.attn_softcap)
        scores = mx.where(self._keep(start, start + q.shape[2], window), scores, -float("inf"))
        return mx.softmax(scores, axis=-1) @ v

    def silu_mul(self, gate, up):
        return gate * self.mx.sigmoid(gate) * up

    def gelu_mul(self, gate, up):
        return 0.5 * gate * (1.0 + self.mx.tanh(GELU_C * (gate + 0.044715 * gate * gate * gate))) * up

    def residual(self, x, delta):
        return x + delta

    def softcap(self, x, cap):
        return self.mx.tanh(x / cap) * cap

    def moe(self, x, layer):
        """Routing as the reference; each token's experts through `mx.gather_mm` (as mlx-lm's
        SwitchGLU: the stacked matrices indexed, not copied)."""
        mx = self.mx
        flat = x.reshape(-1, x.shape[-1])
        probs = mx.softmax(self.linear(flat, layer.router).astype(mx.float32), axis=-1)
        top = mx.argpartition(-probs, kth=self.cfg.n_experts_used - 1, axis=-1)[:, :self.cfg.n_experts_used]
        weights = mx.take_along_axis(probs, top, axis=-1)
        weights = (weights / weights.sum(axis=-1, keepdims=True)).astype(x.dtype)
        h = flat[:, None, None, :]  # (N, 1, 1, dim): one row against each of the token's k experts

        def experts(a, stacked):
            return mx.gather_mm(a, stacked.swapaxes(-1, -2), rhs_indices=top)  # (N, k, 1, rows)

        y = experts(self.silu_mul(experts(h, layer.gate_exps), experts(h, layer.up_exps)), layer.down_exps)
        return (y[:, :, 0, :] * weights[..., None]).sum(axis=1).reshape(x.shape)


class MlxBackend(ArrayLlamaBackend):
    name = "mlx"
    description = "MLX Llama: float, or the GGUF's own blocks (Q4_0/Q4_1/Q8_0, K-quants) run natively"
    requires = (MLX,)
    devices = ("gpu", "cpu")
    options = (BackendOption("q6_k", str, "K-quant files: how Q6_K matrices (any type without groups of 32) "
                             "run: f32, or q8 (re-quantized to 8-bit groups of 32)", choices=Q6K_MODES),
               BackendOption("blas", str, "the BLAS of float matmuls on CPU: openblas (the host's, as a source build "
                             "links; the default where installed) or bundled (the Linux wheel's reference BLAS)",
                             choices=BLAS_CHOICES))
    runtime_bytes = MLX_RUNTIME

    @classmethod
    def precisions(cls, spec):
        native = (spec.file_type,) if spec.file_type in NATIVE_QUANT or spec.file_type in KQUANT_FILES else ()
        return FLOAT_PRECISIONS + native

    @classmethod
    def estimate_bytes(cls, spec, opts):
        """Floats: an MLX array copies the numpy one, a cast to bf16/f16 is one more f32 array
        meanwhile. Native: `mx.load` reads every tensor of the file at once; the Q/K matrices are
        copied twice more while their rows are moved."""
        if opts.precision in KQUANT_FILES:
            return _affine_need(spec, opts.options.get("q6_k", "f32"), opts.max_seq_len, opts.max_batch,
                                cls.runtime_bytes)
        if opts.precision not in NATIVE_QUANT:
            return float_need(spec, opts.precision, opts.max_seq_len, opts.max_batch, cls.runtime_bytes,
                              copies=1 if opts.precision == "f32" else 2)

        def held(name: str) -> int:
            native = NATIVE_BYTES.get(spec.tensor_type(name))
            return int(spec.file_bytes(name) * native) if native else elements(spec, name) * 4

        return MemoryNeed(weights=weight_bytes(spec, held), kv=kv_bytes(spec, opts.max_seq_len, opts.max_batch, 4),
                          transient=sum(2 * held(n) for n in spec.load_order() if spec.permuted_heads(n)),
                          runtime=cls.runtime_bytes)

    @classmethod
    def modes(cls, spec, device):
        if spec.config.n_experts:  # stacked experts run as floats only
            return [Mode("f32")]
        native = [Mode(spec.file_type)] if spec.file_type in NATIVE_QUANT else []
        native += [Mode(spec.file_type, options=(("q6_k", r),)) for r in Q6K_MODES if spec.file_type in KQUANT_FILES]
        return [Mode("f32")] + native

    @classmethod
    def device_missing(cls, device: str) -> str:
        # asked without importing mlx off macOS: `build` binds its BLAS as the options say
        if device != "gpu" or (sys.platform == "darwin" and import_mlx().metal.is_available()):
            return ""
        return "mlx's gpu needs Metal (Apple silicon)"

    def build(self, spec, opts: LoadOptions) -> LoadInfo:
        mx = import_mlx(opts.options.get("blas"))

        mx.set_default_device(mx.gpu if opts.device == "gpu" else mx.cpu)
        self.mx = mx
        native = opts.precision in NATIVE_QUANT or opts.precision in KQUANT_FILES
        if native and spec.config.n_experts:
            raise UnavailableError("mlx runs mixture-of-experts files as floats (f32, bf16), not their experts' blocks")
        if "q6_k" in opts.options and opts.precision not in KQUANT_FILES:
            raise UnavailableError(f"option q6_k applies to K-quant files' own quantization only, not to {opts.precision}")
        if native:
            if spec.config.arch.fused:
                raise UnavailableError(f"mlx cannot split {spec.config.arch.name}'s fused attn_qkv/ffn_up blocks natively; use f32")
            self.weights = (self._load_native(spec) if opts.precision in NATIVE_QUANT
                            else self._load_affine(spec, opts.options.get("q6_k", "f32")))
            dtype = mx.float32
        else:
            dtype = {"f32": mx.float32, "bf16": mx.bfloat16, "f16": mx.float16}[opts.precision]
            self.weights = spec.load_weights(lambda a: _evaluated(mx, mx.array(a).astype(dtype)))
        mx.eval(_arrays(self.weights))
        self.ops = MlxOps(spec.config, opts.max_seq_len, opts.max_batch, dtype)
        if native:  # the file's own blocks: sizes as MLX holds them
            held = dict(spec.weight_items(self.weights))
            size = lambda n: held[n].nbytes if n in held else spec.file_bytes(n)  # noqa: E731
            info = LoadInfo(precision=opts.precision, device=opts.device,
                            weight_bytes=sum(x.nbytes for x in _weights(self.weights)),
                            decode_bytes=spec.decode_read_bytes(size),
                            kv_bytes_per_token=spec.config.kv_bytes_per_token(4),
                            details={"native_gguf": True, **_counts(self.weights, opts.options)})
        else:
            info = float_load_info(spec, opts.precision, opts.device)
        if opts.device == "cpu":
            info.details["blas"] = bound_blas()
        mx.reset_peak_memory()
        return info

    def _load_native(self, spec):
        """Quantized tensors as MLX loads them from the GGUF; Q/K rows moved to rotate-half order."""
        mx = self.mx
        arrays = mx.load(spec.path)

        def tensor(name: str):
            base = name.removesuffix(".weight")
            fix = (lambda a: mx.array(spec.hf_rows(name, np.array(a)))) if spec.permuted_heads(name) else (lambda a: a)
            if f"{base}.scales" not in arrays:
                return fix(arrays[name].astype(mx.float32))
            bits = NATIVE_QUANT.get(spec.tensor_type(name))
            if bits is None:
                raise UnavailableError(f"mlx cannot run tensor {name} of type {spec.tensor_type(name)} natively")
            return QuantizedMatrix(fix(arrays[name]), fix(arrays[f"{base}.scales"]), fix(arrays[f"{base}.biases"]), bits)

        return spec.load_weights(lambda a: a, tensor=tensor)

    def _load_affine(self, spec, q6_k: str):
        """Every group-32 block matrix as an exact MLX quantized matrix; the others float, or (Q6_K
        under q6_k=q8) re-quantized by mx.quantize to 8 bits per value in groups of 32."""
        mx = self.mx

        def tensor(name: str):
            qtype, shape = spec.tensor_type(name), spec.raw_tensor(name).shape
            if len(shape) != 2:
                return mx.array(spec.hf_tensor(name))
            if qtype in AFFINE_BITS:
                g = spec.affine_groups(name)
                u, scale, bias = (spec.hf_rows(name, a) for a in (g.u, g.scale, g.bias))
                return QuantizedMatrix(mx.array(pack_bits(u, g.bits)), mx.array(scale), mx.array(bias), g.bits)
            values = mx.array(spec.hf_tensor(name))
            if q6_k == "q8":  # evaluated now: a lazy quantize would hold every f32 matrix until the load's end
                return QuantizedMatrix(*_evaluated(mx, mx.quantize(values, group_size=GROUP_SIZE, bits=8)), 8)
            return values

        return spec.load_weights(lambda a: a, tensor=tensor)

    def step(self, tokens: list[list[int]], start: int) -> np.ndarray:
        mx = self.mx
        batch, n_tokens = len(tokens), len(tokens[0])
        logits = forward(self.ops, self.weights, self.config, mx.array(tokens), start, batch, n_tokens)
        out = logits.astype(mx.float32)
        mx.eval(out, *self.ops.k_cache, *self.ops.v_cache)
        return np.array(out)

    def reset(self) -> None:
        super().reset()
        self.mx.reset_peak_memory()

    def threads_used(self) -> tuple[int, str]:
        if self.mx.default_device() != self.mx.cpu:
            return 0, ""
        quantized = "quantized matmuls on one thread (a kernel that unpacks the weights again for every row)"
        if blas_threads():
            return blas_threads(), f"float matmuls through OpenBLAS, {quantized}"
        return 1, f"float matmuls through the reference BLAS the Linux wheel bundles, {quantized}"

    def memory(self) -> dict[str, int]:
        return {"active_bytes": self.mx.get_active_memory(), "peak_bytes": self.mx.get_peak_memory()}


def _affine_need(spec, q6_k: str, positions: int, sequences: int, runtime: int) -> MemoryNeed:
    """What `_load_affine` holds: group-32 blocks as packed `bits`-bit values with an f32 scale and
    bias per group, the other matrices f32 or (q6_k=q8) 8-bit groups, vectors f32; a matrix being
    converted holds its unpacked values (a byte each) or its f32 dequantization meanwhile."""
    def held(name: str) -> int:
        n, shape = elements(spec, name), spec.raw_tensor(name).shape
        bits = AFFINE_BITS.get(spec.tensor_type(name)) if len(shape) == 2 else None
        if bits is None and len(shape) == 2 and q6_k == "q8":
            bits = 8
        return n * 4 if bits is None else n * bits // 8 + n // GROUP_SIZE * 8

    def staged(name: str) -> int:
        n = elements(spec, name)
        if AFFINE_BITS.get(spec.tensor_type(name)):
            return 2 * n
        # re-quantized to 8 bits: the file's f32 dequantization and MLX's copy of it live together
        return 8 * n if q6_k == "q8" and len(spec.raw_tensor(name).shape) == 2 else 4 * n

    return MemoryNeed(weights=weight_bytes(spec, held), kv=kv_bytes(spec, positions, sequences, 4),
                      transient=conversion_peak(spec, held, staged), runtime=runtime)


def _evaluated(mx, array):
    """Computed now: lazily, every f32 source of a cast would stay alive until the end of the load."""
    mx.eval(array)
    return array


def _weights(w) -> list:
    """Every weight once (a tied output is the embedding), quantized ones as QuantizedMatrix."""
    out = [w.tok_embd, w.output_norm] + ([] if w.output is w.tok_embd else [w.output])
    for layer in w.layers:
        out += list(layer.tensors().values())
    return out


def pack_bits(u: np.ndarray, bits: int) -> np.ndarray:
    """(rows, cols) values below 2**bits -> MLX's packing: one little-endian bit stream per row
    (value j at bit j * bits), as uint32 words. Eight values make `bits` whole bytes."""
    rows, cols = u.shape
    out = np.empty((rows, cols * bits // 8), dtype=np.uint8)
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    for r in range(0, rows, PACK_ROWS):
        eights = u[r:r + PACK_ROWS].reshape(-1, cols // 8, 8).astype(np.uint64) << shifts
        word = np.bitwise_or.reduce(eights, axis=-1)  # (rows, cols / 8) of bits * 8 bits each
        out[r:r + PACK_ROWS] = word.view(np.uint8).reshape(-1, cols // 8, 8)[..., :bits].reshape(-1, cols * bits // 8)
    return out.view(np.uint32)


def _counts(w, options) -> dict:
    """How many layer matrices run quantized and how many float (K-quant files: with `q6_k`)."""
    layers = [x for layer in w.layers for x in layer.tensors().values()]
    quantized = sum(isinstance(x, QuantizedMatrix) for x in layers)
    floats = sum(not isinstance(x, QuantizedMatrix) and x.ndim == 2 for x in layers)
    return {"quantized_matrices": quantized, "float_matrices": floats, **dict(options)}


def _arrays(w) -> list:
    flat = []
    for x in _weights(w):
        flat += [x.weight, x.scales, x.biases] if isinstance(x, QuantizedMatrix) else [x]
    return flat
