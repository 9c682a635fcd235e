"""`tinygrad`: the shared Llama-family forward on tinygrad tensors, the decode step under TinyJit.

The KV-cache position is a symbolic variable, so one captured decode graph replays for every
position; prefill runs unjitted (its length varies). JIT capture takes the first calls, which
warm-up covers. Set BEAM=N in the environment (or --option beam=N) for kernel search.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from backends.base import (ArrayLlamaBackend, BackendOption, LoadInfo, LoadOptions, Mode, Requirement, float_load_info,
                           pip_extra)
from engine.model.forward import SeparateProjections, forward, layer_rope_tables

TINYGRAD = Requirement("tinygrad", "tinygrad", pip_extra("tinygrad"))


class TinyOps(SeparateProjections):
    def __init__(self, cfg, max_seq: int, dtype, device: str):
        from tinygrad import Tensor

        self.cfg = cfg
        self.rope_tables = layer_rope_tables(cfg, max_seq, lambda a: Tensor(a, device=device).cast(dtype).contiguous().realize())
        self.positions = Tensor(np.arange(max_seq, dtype=np.int32), device=device).contiguous().realize()  # window masks
        shape = (cfg.n_kv_heads, max_seq, cfg.head_dim)
        self.k_cache = [Tensor.zeros(*shape, dtype=dtype, device=device).contiguous().realize() for _ in range(cfg.n_layers)]
        self.v_cache = [Tensor.zeros(*shape, dtype=dtype, device=device).contiguous().realize() for _ in range(cfg.n_layers)]

    def embed(self, table, tokens):
        from tinygrad import UOp

        if isinstance(tokens, UOp):  # decode: a symbolic token id reads one row, not the whole table
            return table[tokens:tokens + 1]
        return table[tokens]

    def rms_norm(self, x, weight):
        # .contiguous() marks where tinygrad should materialise: without it the lazy graph is
        # recomputed per consumer (measured: ~11,000 kernels per decode step instead of ~300)
        return (x * (x.square().mean(-1, keepdim=True) + self.cfg.rms_eps).rsqrt() * weight).contiguous()

    def linear(self, x, weight):
        return x @ weight.T

    def rope(self, x, start, layer):
        t, half = x.shape[0], x.shape[-1] // 2
        cos, sin = self.rope_tables[layer]
        cos, sin = cos[start:start + t].unsqueeze(1), sin[start:start + t].unsqueeze(1)
        return (x * cos + (-x[..., half:]).cat(x[..., :half], dim=-1) * sin).contiguous()

    def attend(self, layer, q, k, v, start):
        from tinygrad import Tensor

        t = q.shape[0]
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        kc[:, start:start + t, :].assign(k.transpose(0, 1)).realize()
        vc[:, start:start + t, :].assign(v.transpose(0, 1)).realize()
        keys, values = kc[:, :start + t, :].unsqueeze(0), vc[:, :start + t, :].unsqueeze(0)
        mask, window = None, self.cfg.window(layer)
        if window:  # query start+i sees keys (start+i-window, start+i]; positions may be symbolic
            qpos, kpos = self.positions[start:start + t].unsqueeze(1), self.positions[:start + t].unsqueeze(0)
            mask = ((kpos <= qpos) & (kpos > qpos - window)).reshape(1, 1, t, -1)
        elif t > 1:  # causal, aligned to the end: query i sees positions <= start + i
            mask = Tensor.full((1, 1, t, start + t), float("-inf"), dtype=q.dtype).triu(start + 1)
        hd = self.cfg.head_dim
        if abs(self.cfg.scale * hd ** 0.5 - 1.0) > 1e-12:  # tinygrad's SDPA divides by sqrt(head_dim)
            q = q * (self.cfg.scale * hd ** 0.5)
        out = q.transpose(0, 1).unsqueeze(0).scaled_dot_product_attention(keys, values, attn_mask=mask, enable_gqa=True)
        return out[0].transpose(0, 1).reshape(t, -1).contiguous()

    def silu_mul(self, gate, up):
        return (gate.silu() * up).contiguous()

    def gelu_mul(self, gate, up):
        return (gate.gelu() * up).contiguous()

    def residual(self, x, delta):
        return (x + delta).contiguous()


class PrefillJits:
    """One TinyJit per prompt length, for prefills from position 0.

    TinyJit runs its first call and captures the second: on a new length both happen at once
    (same inputs, same cache writes), so the capture cost lands in warm-up and every later
    prefill of that length replays the captured kernels."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.jits: dict[int, Any] = {}

    def __call__(self, n: int, inputs: Callable[[], tuple]) -> Any:
        from tinygrad import TinyJit

        jit = self.jits.get(n)
        if jit is None:
            jit = self.jits[n] = TinyJit(self.fn)
            jit(*inputs())
        return jit(*inputs())


class TinygradBackend(ArrayLlamaBackend):
    name = "tinygrad"
    description = "tinygrad Llama, decode step under TinyJit with a symbolic KV position"
    requires = (TINYGRAD,)
    devices = ("cuda", "metal", "amd", "gpu", "cpu")
    options = (BackendOption("beam", int, "BEAM kernel-search width: 0 off, 2 typical", choices=tuple(range(0, 9))),)

    @classmethod
    def precisions(cls, spec):
        return ("f32", "f16")

    @classmethod
    def modes(cls, spec, device):
        return [Mode("f32", options=(("beam", beam),)) for beam in (0, 2)]

    @classmethod
    def resolve_device(cls, device: str) -> str:
        from tinygrad import Device

        return Device.DEFAULT.lower() if device == "auto" else super().resolve_device(device)

    @classmethod
    def device_missing(cls, device: str) -> str:
        from tinygrad import Device

        try:
            Device[device.upper()]
        except Exception as e:  # tinygrad raises whatever its runtime loader raised
            return f"{type(e).__name__}: {e}"
        return ""

    def build(self, spec, opts: LoadOptions) -> LoadInfo:
        from tinygrad import Tensor, TinyJit, UOp, dtypes
        from tinygrad.helpers import BEAM, CACHEDB

        if "beam" in opts.options:  # tinygrad read BEAM from the environment at import: set the live value
            BEAM.value = int(opts.options["beam"])

        self.dev = opts.device.upper()
        dtype = {"f32": dtypes.float32, "f16": dtypes.float16}[opts.precision]
        np_dtype = np.float32 if opts.precision == "f32" else np.float16
        self.weights = spec.load_weights(lambda a: Tensor(a.astype(np_dtype, copy=False), device=self.dev).realize())
        # separate projections: with BEAM=2, fused QKV/gate-up measured 10.8 tok/s against 12.4 unfused
        self.ops = TinyOps(spec.config, opts.max_seq_len, dtype, self.dev)
        self._jit = TinyJit(self._step)
        self._prefill = PrefillJits(lambda t: self._step(t, 0, t.shape[0]))
        self._start_var = UOp.variable("start", 1, opts.max_seq_len - 1)
        self._token_var = UOp.variable("token", 0, spec.config.vocab_size - 1)
        self._Tensor, self._int32 = Tensor, dtypes.int32
        return float_load_info(spec, opts.precision, opts.device, beam=BEAM.value, kernel_cache=CACHEDB)

    def threads_used(self) -> tuple[int, str]:
        if self.dev in ("CPU", "CLANG", "LLVM"):
            return 1, "tinygrad's CPU backend runs each generated kernel on one thread"
        return 0, ""

    def _step(self, tokens, start, n_tokens: int = 1):
        return forward(self.ops, self.weights, self.config, tokens, start, n_tokens).float().realize()

    def step(self, tokens: Sequence[int], start: int) -> np.ndarray:
        n = len(tokens)
        if n == 1 and start >= 1:  # decode: one captured graph for every token and position
            return self._jit(self._token_var.bind(tokens[0]), self._start_var.bind(start)).numpy()[0]
        ids = lambda: self._Tensor(list(tokens), dtype=self._int32, device=self.dev).realize()  # noqa: E731
        if start:  # appending to a conversation: lengths and positions vary, run unjitted
            return self._step(ids(), start, n).numpy()[0]
        return self._prefill(n, lambda: (ids(),)).numpy()[0]
