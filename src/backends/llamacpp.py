"""`llamacpp`: llama.cpp's native C/C++ kernels through llama-cpp-python, on the GGUF as it is
(its own quantization). `metal`: the same engine with every layer on the Apple GPU."""

from __future__ import annotations

import platform
import sys
from typing import Sequence

import numpy as np

from backends.base import Availability, Backend, LoadInfo, LoadOptions, Requirement, pip_extra
from engine.model.forward import check_tokens

LLAMA_CPP = Requirement("llama_cpp", "llama-cpp-python", pip_extra("llamacpp"))
KV_BYTES = 2  # llama.cpp's default KV cache type is f16


def _gpu_offload() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def _apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


class LlamaCppBackend(Backend):
    name = "llamacpp"
    description = "llama.cpp native kernels (llama-cpp-python), the file's own quantization"
    requires = (LLAMA_CPP,)
    devices = ("metal", "cuda", "cpu")

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

    def load(self, spec, opts: LoadOptions) -> LoadInfo:
        import llama_cpp

        self.n_vocab = spec.config.vocab_size
        threads = opts.threads or None
        self.llm = llama_cpp.Llama(
            model_path=spec.path, n_ctx=opts.max_seq_len, n_batch=min(512, opts.max_seq_len),
            n_threads=threads, n_threads_batch=threads, n_gpu_layers=0 if opts.device == "cpu" else -1,
            logits_all=False, verbose=False,
        )
        self.max_seq = opts.max_seq_len
        weight_bytes = sum(spec.file_bytes(n) for n in spec.tensor_names)
        return LoadInfo(
            precision=opts.precision, device=opts.device, weight_bytes=weight_bytes,
            decode_bytes=spec.decode_read_bytes(spec.file_bytes),
            kv_bytes_per_token=spec.config.kv_bytes_per_token(KV_BYTES),
            details={"n_threads": self.llm.n_threads, "n_gpu_layers": 0 if opts.device == "cpu" else -1},
        )

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        tokens = list(tokens)
        check_tokens(tokens, self.llm.n_tokens, self.max_seq, self.n_vocab)
        self.llm.eval(tokens)  # llama_decode returns after the computation is complete
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,)).copy()

    def decode(self, token: int) -> np.ndarray:
        return self.prefill([token])

    def reset(self) -> None:
        self.llm.reset()  # the next eval removes cached positions past 0

    def threads_used(self) -> tuple[int, str]:
        return int(self.llm.n_threads), ""

    def close(self) -> None:
        self.llm.close()


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

