"""`llamacpp`: llama.cpp's native C/C++ kernels through llama-cpp-python, on the GGUF as it is
(its own quantization). `metal`: the same engine with every layer on the Apple GPU."""

from __future__ import annotations

import os
import platform
import sys

import numpy as np

from backends.base import ArrayLlamaBackend, Availability, LoadInfo, LoadOptions, Requirement, pip_extra
from engine.model.footprint import MemoryNeed

LLAMA_CPP = Requirement("llama_cpp", "llama-cpp-python", pip_extra("llamacpp"))
KV_BYTES = 2  # llama.cpp's default KV cache type is f16
CELL_PAD = 256  # llama.cpp rounds each sequence's KV cells up to a multiple of this
LLAMA_RUNTIME = 40 * 2**20  # libllama and the bindings beside the model (measured)
# block types ggml's CPU backend repacks into its interleaved layout at load: a second copy beside
# the mapped file (3B Q4_K_M: 3423 MB peak = 1918 MB of file + 1299 MB of Q4_K matrices + runtime)
CPU_REPACKED = ("q4_0", "q4_k", "iq4_nl")


def _gpu_offload() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def _apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


class _Rows:
    """One reusable llama_batch, laid out position-major: row i belongs to sequence i % B, so
    the sequence ids depend on B alone, and the last B rows (each sequence's last token) are
    the ones whose logits come back, in sequence order."""

    def __init__(self, capacity: int):
        from llama_cpp import _internals

        self.batch = _internals.LlamaBatch(n_tokens=capacity, embd=0, n_seq_max=1, verbose=False)
        raw = self.batch.batch
        view = lambda ptr: np.ctypeslib.as_array(ptr, shape=(capacity,))  # noqa: E731  (writes reach llama.cpp)
        self.token, self.pos, self.logits = view(raw.token), view(raw.pos), view(raw.logits)
        view(raw.n_seq_id)[:] = 1
        self.capacity, self.b = capacity, 0

    def fill(self, ids: np.ndarray, start: int):
        """The batch holding ids (B, T) at positions [start, start + T) of sequences 0..B-1."""
        b, t = ids.shape
        n = b * t
        if b != self.b:  # seq_id is one C array per row: rewritten only when B changes
            for i in range(self.capacity):
                self.batch.batch.seq_id[i][0] = i % b
            self.b = b
        self.token[:n] = ids.T.ravel()
        self.pos[:n] = np.repeat(np.arange(start, start + t, dtype=np.int32), b)
        self.logits[:n] = 0
        self.logits[n - b:n] = 1
        self.batch.batch.n_tokens = n
        return self.batch

    def close(self) -> None:
        self.batch.close()


class LlamaCppBackend(ArrayLlamaBackend):
    """llama.cpp through its own batch API: sequence b of a batch is llama.cpp sequence id b,
    with its own KV cells, and every step of all sequences is one llama_decode. One sequence
    is a batch of one (ArrayLlamaBackend keeps positions and checks bounds)."""

    name = "llamacpp"
    description = "llama.cpp native kernels (llama-cpp-python), the file's own quantization"
    requires = (LLAMA_CPP,)
    devices = ("metal", "cuda", "cpu")
    runtime_bytes = LLAMA_RUNTIME

    @classmethod
    def estimate_bytes(cls, spec, opts):
        """The file's tensors memory-mapped (resident as they are read) with, on the CPU, a repacked
        copy of its Q4 matrices; f16 KV cells for every sequence's padded positions; compute buffers
        for one micro-batch: activations, attention scores over the context, each sequence's logits."""
        p, c = cls._context_params(opts), spec.config
        n_ubatch = int(p.n_ubatch)
        compute = 4 * n_ubatch * (6 * c.dim + 3 * c.ffn_dim + int(p.n_ctx) // opts.max_batch * c.n_heads)
        repacked = sum(spec.file_bytes(n) for n in spec.tensor_names
                       if n.startswith("blk.") and spec.tensor_type(n) in CPU_REPACKED) if opts.device == "cpu" else 0
        return MemoryNeed(weights=sum(spec.file_bytes(n) for n in spec.tensor_names) + repacked,
                          kv=int(p.n_ctx) * c.kv_bytes_per_token(KV_BYTES), transient=0,
                          runtime=cls.runtime_bytes + compute + 4 * opts.max_batch * c.vocab_size)

    @classmethod
    def build_info(cls) -> str:
        import llama_cpp

        info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
        return f"{'GPU offload' if _gpu_offload() else 'CPU only'}; {info}"

    @classmethod
    def precisions(cls, spec):
        return (spec.file_type,)

    @classmethod
    def device_missing(cls, device: str) -> str:
        if device == "cpu":
            return ""
        if not _gpu_offload():
            return "this llama.cpp build has no GPU offload"
        if (device == "metal") != _apple_silicon():
            return "Metal needs Apple silicon" if device == "metal" else "no CUDA on Apple silicon"
        return ""

    def build(self, spec, opts: LoadOptions) -> LoadInfo:
        import llama_cpp
        from llama_cpp import _internals  # the model/context/batch owners llama_cpp.Llama itself uses
        from llama_cpp._logger import set_verbose

        set_verbose(False)  # as Llama(verbose=False): llama-cpp-python prints llama.cpp's log otherwise
        llama_cpp.llama_backend_init()
        offload = opts.device != "cpu"
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0x7FFFFFFF if offload else 0  # every layer (llama.cpp caps it)
        self._model = _internals.LlamaModel(path_model=spec.path, params=mparams, verbose=False)
        self._ctx = _internals.LlamaContext(model=self._model, params=self._context_params(opts), verbose=False)
        self._mem = llama_cpp.llama_get_memory(self._ctx.ctx)
        self.n_batch = llama_cpp.llama_n_batch(self._ctx.ctx)
        self._rows = _Rows(self.n_batch)
        weight_bytes = sum(spec.file_bytes(n) for n in spec.tensor_names)
        return LoadInfo(
            precision=opts.precision, device=opts.device, weight_bytes=weight_bytes,
            decode_bytes=spec.decode_read_bytes(spec.file_bytes),
            kv_bytes_per_token=spec.config.kv_bytes_per_token(KV_BYTES),
            details={"n_threads": self.threads_used()[0], "n_gpu_layers": -1 if offload else 0,
                     "n_seq_max": opts.max_batch, "n_ctx": llama_cpp.llama_n_ctx(self._ctx.ctx)},
        )

    @staticmethod
    def _context_params(opts: LoadOptions):
        import llama_cpp

        p = llama_cpp.llama_context_default_params()
        # one KV stream per sequence (not unified): each attends over its own cells only, and
        # llama.cpp pads each stream to a multiple of CELL_PAD cells (a warning when n_ctx is not)
        p.n_seq_max, p.kv_unified = opts.max_batch, False
        p.n_ctx = opts.max_batch * -(-opts.max_seq_len // CELL_PAD) * CELL_PAD
        # tokens per llama_decode: a longer batched prefill goes in chunks of whole positions
        p.n_batch = p.n_ubatch = opts.max_batch * min(max(512 // opts.max_batch, 1), opts.max_seq_len)
        p.n_threads = opts.threads or max(os.cpu_count() // 2, 1)  # llama-cpp-python's defaults
        p.n_threads_batch = opts.threads or os.cpu_count()
        p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as llama_cpp.Llama runs by default
        return p

    def step(self, tokens: list[list[int]], start: int) -> np.ndarray:
        import llama_cpp

        ids = np.asarray(tokens, dtype=np.int32)
        b, t = ids.shape
        chunk = self.n_batch // b
        for p in range(0, t, chunk):
            self._ctx.decode(self._rows.fill(ids[:, p:p + chunk], start + p))  # raises on failure
        logits = llama_cpp.llama_get_logits(self._ctx.ctx)  # rows with logits set, in batch order
        return np.ctypeslib.as_array(logits, shape=(b, self.config.vocab_size)).copy()

    def reset(self) -> None:
        import llama_cpp

        super().reset()
        llama_cpp.llama_memory_clear(self._mem, False)  # cells only: positions restart at 0

    def threads_used(self) -> tuple[int, str]:
        import llama_cpp

        return int(llama_cpp.llama_n_threads(self._ctx.ctx)), ""

    def close(self) -> None:
        self._rows.close()
        self._model.close()  # closes the context first


class MetalBackend(LlamaCppBackend):
    name = "metal"
    description = "llama.cpp's Metal kernels, every layer on the Apple GPU"
    devices = ("metal",)

    @classmethod
    def availability(cls) -> Availability:
        base = super().availability()
        if not base.ok:
            return base
        if not _apple_silicon():
            return Availability(False, base.version, "no Apple GPU on this host (Metal needs macOS on Apple silicon)")
        if not _gpu_offload():
            return Availability(False, base.version, "llama-cpp-python was built without Metal: "
                                "CMAKE_ARGS='-DGGML_METAL=on' pip install --force-reinstall llama-cpp-python")
        return base

