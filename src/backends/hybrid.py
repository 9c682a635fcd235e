"""`hybrid`: torch owns one copy of the weights; tinygrad runs the transformer blocks on zero-copy
views of torch's buffers (`Tensor.from_blob` on the same addresses); torch does the embedding,
the final norm, the output projection and the host side.

Consecutive tinygrad blocks form a segment whose decode step runs under one TinyJit per batch
size. A block whose tinygrad path fails to build or run falls back to torch; the row records how
many did.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from backends.base import ArrayLlamaBackend, LoadInfo, LoadOptions, float_load_info
from backends.tinygrad_caches import cache_entries, restore_programs
from backends.tinygrad_llama import TINYGRAD, TINYGRAD_RUNTIME, ShapeJits, TinygradBackend, TinyOps
from backends.torch_llama import TORCH, TORCH_RUNTIME, TorchOps, enter_inference
from engine.model.footprint import float_bytes, fused_rows_bytes, kv_bytes
from engine.model.spec import LayerWeights
from engine.model.forward import block, embed, head


def tinygrad_view(t) -> Any:
    """A tinygrad tensor over the torch tensor's own memory: no copy."""
    from tinygrad import Tensor, dtypes

    assert t.is_contiguous() and t.device.type == "cpu" and str(t.dtype) == "torch.float32"
    return Tensor.from_blob(t.data_ptr(), tuple(t.shape), dtype=dtypes.float32, device="CPU")


@dataclass
class Segment:
    """Consecutive blocks run by one framework."""

    tinygrad: bool
    layers: list[int] = field(default_factory=list)
    decode: Any = None  # one captured graph per batch size, for every position
    prefill: Any = None  # prefills from position 0, one captured graph per (batch, length)


class HybridBackend(ArrayLlamaBackend):
    name = "hybrid"
    description = "torch owns the weights; tinygrad runs the blocks on zero-copy views of them"
    requires = (TORCH, TINYGRAD)
    devices = ("cpu",)
    compile_caches = TinygradBackend.compile_caches  # its blocks' kernels
    runtime_bytes = TORCH_RUNTIME + TINYGRAD_RUNTIME

    @classmethod
    def estimate_bytes(cls, spec, opts):
        """torch's f32 weights (one copy, fused after the load) and a KV cache in each framework."""
        need = super().estimate_bytes(spec, opts)
        return replace(need, kv=2 * kv_bytes(spec, opts.max_seq_len, opts.max_batch, 4),
                       transient=max(need.transient, fused_rows_bytes(spec, float_bytes(spec, "f32"))))

    @classmethod
    def precisions(cls, spec):
        return ("f32",)

    @classmethod
    def compiles_on_first_call(cls, compile, options):
        return True  # the tinygrad segments capture their TinyJit on the first calls

    def build(self, spec, opts: LoadOptions) -> LoadInfo:
        import torch
        from tinygrad import UOp

        enter_inference(opts.threads)
        restored = restore_programs()
        self._cache_rows_at_load = cache_entries()
        cfg = spec.config
        self.weights = spec.load_weights(lambda a: torch.from_numpy(a))  # the one copy
        self.torch_ops = TorchOps(cfg, opts.max_seq_len, opts.max_batch, torch.float32, "cpu")
        self.torch_ops.fuse(self.weights.layers)  # still one copy: the layer weights become views
        self.tiny_ops = TinyOps(cfg, opts.max_seq_len, opts.max_batch, _tiny_f32(), "CPU")
        self.tiny_layers: dict[int, LayerWeights] = {}
        self.fallbacks: dict[int, str] = {}
        for i, layer in enumerate(self.weights.layers):
            try:
                self.tiny_layers[i] = self.tinygrad_block(i, layer)
            except Exception as e:  # this block stays on torch
                self.fallbacks[i] = f"{type(e).__name__}: {e}"
        self.segments: list[Segment] = []
        for i in range(cfg.n_layers):
            on_tiny = i in self.tiny_layers
            if not self.segments or self.segments[-1].tinygrad != on_tiny:
                self.segments.append(Segment(on_tiny))
            self.segments[-1].layers.append(i)
        for seg in self.segments:
            if seg.tinygrad:
                seg.decode = ShapeJits(lambda x, start, _seg=seg: self._run_tiny(_seg, x, start))
                seg.prefill = ShapeJits(lambda x, _seg=seg: self._run_tiny(_seg, x, 0))
        self._start_var = UOp.variable("start", 1, opts.max_seq_len - 1)
        # tinygrad's mixture-of-experts op computes every expert (TinyOps.moe); torch's reads the routed ones
        every_expert = sorted(self.tiny_layers) if cfg.n_experts else False
        return float_load_info(spec, "f32", "cpu", every_expert, fallback_blocks=len(self.fallbacks),
                               programs_restored=restored, fallback_errors=list(self.fallbacks.values())[:3])

    uncached_compiles = TinygradBackend.uncached_compiles  # its segments' kernels go to tinygrad's caches
    close = TinygradBackend.close

    def threads_used(self) -> tuple[int, str]:
        import torch

        return torch.get_num_threads(), "torch's part uses these threads; tinygrad runs the blocks on one"

    def tinygrad_block(self, i: int, layer: LayerWeights) -> LayerWeights:
        """Wrap block i's torch weights for tinygrad and run it once (position 0) to prove it works."""
        from tinygrad import Tensor

        views = LayerWeights(**{name: tinygrad_view(w) for name, w in layer.tensors().items()})
        probe = Tensor.zeros(1, 1, self.config.dim).contiguous()
        block(self.tiny_ops, i, views, self.config, probe, 0, 1, 1).realize()
        return views

    def _run_tiny(self, seg: Segment, x, start):
        batch, n = x.shape[:2]
        for i in seg.layers:
            x = block(self.tiny_ops, i, self.tiny_layers[i], self.config, x, start, batch, n)
        return x.realize()

    def step(self, tokens: list[list[int]], start: int) -> np.ndarray:
        import torch
        from tinygrad import Tensor

        batch, n = len(tokens), len(tokens[0])
        pos = self.torch_ops.positions[start:start + n]
        self.torch_ops.end = start + n
        x = embed(self.torch_ops, self.weights, self.config, torch.tensor(tokens))
        for seg in self.segments:
            if not seg.tinygrad:
                for i in seg.layers:
                    x = block(self.torch_ops, i, self.weights.layers[i], self.config, x, pos, batch, n)
                continue
            host = x.numpy()  # activations cross by copy (a few KB per token); weights never do
            xt = lambda h=host: Tensor(h).realize()  # noqa: E731  (a fresh input per JIT call)
            if n == 1 and start >= 1:
                out = seg.decode(batch, lambda f=xt: (f(), self._start_var.bind(start)))
            elif start == 0:
                out = seg.prefill((batch, n), lambda f=xt: (f(),))
            else:
                out = self._run_tiny(seg, xt(), start)
            x = torch.from_numpy(out.numpy())
        return head(self.torch_ops, self.weights, self.config, x).numpy()


def _tiny_f32():
    from tinygrad import dtypes

    return dtypes.float32
