"""`tinygrad`: the shared Llama-family forward on tinygrad tensors, the decode step under TinyJit.

The KV-cache position and each sequence's token id are symbolic variables, so one captured decode
graph per batch size replays for every position and token; prefills from position 0 jit per
(batch, length). JIT capture takes the first calls, which warm-up covers. Set BEAM=N in the
environment (or --option beam=N) for kernel search.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable

import numpy as np

from backends.base import (ArrayLlamaBackend, BackendOption, LoadInfo, LoadOptions, Mode, Requirement, float_load_info,
                           pip_extra)
from backends.tinygrad_caches import CACHE_SUBDIR, cache_entries, restore_programs, save_programs
from engine.model.footprint import float_need
from engine.model.forward import SeparateProjections, forward, layer_rope_tables

TINYGRAD = Requirement("tinygrad", "tinygrad", pip_extra("tinygrad"))
TINYGRAD_RUNTIME = 120 * 2**20  # tinygrad's modules, compiled kernels and JIT buffers (measured)


class TinyOps(SeparateProjections):
    def __init__(self, cfg, max_seq: int, max_batch: int, dtype, device: str):
        from tinygrad import Tensor

        self.cfg = cfg
        self.rope_tables = layer_rope_tables(cfg, max_seq, lambda a: Tensor(a, device=device).cast(dtype).contiguous().realize())
        self.positions = Tensor(np.arange(max_seq, dtype=np.int32), device=device).contiguous().realize()  # window masks
        if cfg.n_experts:  # expert order, for routing ties
            self.expert_ids = Tensor(np.arange(cfg.n_experts, dtype=np.int32), device=device).realize()
        shape = (max_batch, cfg.n_kv_heads, max_seq, cfg.head_dim)
        self.k_cache = [Tensor.zeros(*shape, dtype=dtype, device=device).contiguous().realize() for _ in range(cfg.n_layers)]
        self.v_cache = [Tensor.zeros(*shape, dtype=dtype, device=device).contiguous().realize() for _ in range(cfg.n_layers)]

    def embed(self, table, tokens):
        from tinygrad import Tensor

        if isinstance(tokens, Tensor):
            return table[tokens]
        # decode: one symbolic id per sequence reads its row alone; gathering with a Tensor of ids
        # scans the vocabulary (measured 1.8 MB per id for a 49k vocabulary, against a 2.3 KB row)
        return Tensor.stack(*[table[t:t + 1] for t in tokens])

    def rms_norm(self, x, weight):
        # .contiguous() marks where tinygrad should materialise: without it the lazy graph is
        # recomputed per consumer (measured: ~11,000 kernels per decode step instead of ~300)
        return (x * (x.square().mean(-1, keepdim=True) + self.cfg.rms_eps).rsqrt() * weight).contiguous()

    def linear(self, x, weight):
        return x @ weight.T

    def rope(self, x, start, layer):
        t, half = x.shape[1], x.shape[-1] // 2
        cos, sin = self.rope_tables[layer]
        cos, sin = cos[start:start + t].unsqueeze(1), sin[start:start + t].unsqueeze(1)
        return (x * cos + (-x[..., half:]).cat(x[..., :half], dim=-1) * sin).contiguous()

    def attend(self, layer, q, k, v, start):
        from tinygrad import Tensor

        b, t = q.shape[:2]
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        kc[:b, :, start:start + t, :].assign(k.transpose(1, 2)).realize()
        vc[:b, :, start:start + t, :].assign(v.transpose(1, 2)).realize()
        keys, values = kc[:b, :, :start + t, :], vc[:b, :, :start + t, :]
        mask, window = None, self.cfg.window(layer)
        if self.cfg.attn_softcap:
            out = self._capped_attention(q.transpose(1, 2), keys, values, start, window)
            return out.transpose(1, 2).reshape(b, t, -1).contiguous()
        if window:  # query start+i sees keys (start+i-window, start+i]; positions may be symbolic
            qpos, kpos = self.positions[start:start + t].unsqueeze(1), self.positions[:start + t].unsqueeze(0)
            mask = ((kpos <= qpos) & (kpos > qpos - window)).reshape(1, 1, t, -1)
        elif t > 1:  # causal, aligned to the end: query i sees positions <= start + i
            mask = Tensor.full((1, 1, t, start + t), float("-inf"), dtype=q.dtype).triu(start + 1)
        hd = self.cfg.head_dim
        if abs(self.cfg.scale * hd ** 0.5 - 1.0) > 1e-12:  # tinygrad's SDPA divides by sqrt(head_dim)
            q = q * (self.cfg.scale * hd ** 0.5)
        out = q.transpose(1, 2).scaled_dot_product_attention(keys, values, attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2).reshape(b, t, -1).contiguous()

    def _capped_attention(self, q, k, v, start, window):
        """Attention with soft-capped scores (Gemma 2), which SDPA cannot do: q (B, H, T, hd),
        k and v (B, kv, S, hd); query start+i sees keys <= start+i (within `window` when not 0)."""
        t = q.shape[2]
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = self.softcap((q @ k.transpose(-1, -2)) * self.cfg.scale, self.cfg.attn_softcap)
        qpos, kpos = self.positions[start:start + t].unsqueeze(1), self.positions[:start + t].unsqueeze(0)
        keep = (kpos <= qpos) & (kpos > qpos - window) if window else kpos <= qpos
        return keep.reshape(1, 1, t, -1).where(scores, float("-inf")).softmax(-1) @ v

    def softcap(self, x, cap):
        return ((x / cap).tanh() * cap).contiguous()

    def moe(self, x, layer):
        """Routing as the reference, then every expert on every token, the unrouted ones weighted 0.
        A captured graph cannot pick its matrices by values it computes (the experts are chosen on
        the device, mid-step), and indexing the stacked experts by a Tensor would read all of them
        anyway (as a Tensor gather of the embedding table was measured to), so each step reads every expert:
        `bytes_per_token` counts them all (TinygradBackend.build)."""
        n_exp, k = self.cfg.n_experts, self.cfg.n_experts_used
        flat = x.reshape(-1, x.shape[-1])
        probs = self.linear(flat, layer.router).float().softmax(-1)  # (N, E)
        # expert e is chosen when fewer than k experts rank above it (ties to the lower index, as a stable sort)
        order = self.expert_ids
        p_e, p_j = probs.unsqueeze(-1), probs.unsqueeze(-2)
        above = (p_j > p_e) | ((p_j == p_e) & (order.reshape(1, 1, n_exp) < order.reshape(1, n_exp, 1)))
        weights = (above.sum(-1) < k).where(probs, 0.0)
        weights = (weights / weights.sum(-1, keepdim=True)).cast(x.dtype)  # (N, E)
        h = flat.unsqueeze(0)  # (1, N, dim) against (E, rows, dim)
        act = self.silu_mul(h @ layer.gate_exps.transpose(-1, -2), h @ layer.up_exps.transpose(-1, -2))
        y = act @ layer.down_exps.transpose(-1, -2)  # (E, N, dim)
        return (y * weights.T.unsqueeze(-1)).sum(0).reshape(x.shape).contiguous()

    def silu_mul(self, gate, up):
        return (gate.silu() * up).contiguous()

    def gelu_mul(self, gate, up):
        return (gate.gelu() * up).contiguous()

    def residual(self, x, delta):
        return (x + delta).contiguous()


class ShapeJits:
    """One TinyJit per input shape (batch size, prompt length): tinygrad captures fixed shapes.

    TinyJit runs its first call plainly and captures the second, scheduling the whole forward
    twice (seconds of Python each: most of a warm-up on a warm kernel cache). Every buffer it
    reads already exists here (weights, KV caches), so the first call captures at once (`cnt`
    1). (Not `prune`: it runs once whatever reads no input buffer, and decode's inputs are bound
    variables, not buffers.) Every later call of that shape replays the captured kernels."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.jits: dict[Hashable, Any] = {}

    def __call__(self, shape: Hashable, inputs: Callable[[], tuple]) -> Any:
        from tinygrad import TinyJit

        jit = self.jits.get(shape)
        if jit is None:
            jit = self.jits[shape] = TinyJit(self.fn)
            jit.cnt = 1  # capture on this first call
        return jit(*inputs())


class TinygradBackend(ArrayLlamaBackend):
    name = "tinygrad"
    description = "tinygrad Llama, decode step under TinyJit with a symbolic KV position"
    requires = (TINYGRAD,)
    devices = ("cuda", "metal", "amd", "gpu", "cpu")
    compile_caches = {"CACHEDB": f"{CACHE_SUBDIR}/cache.db"}  # compiled kernels and BEAM choices (sqlite)
    options = (BackendOption("beam", int, "BEAM kernel-search width: 0 off, 2 typical", choices=tuple(range(0, 9))),)
    runtime_bytes = TINYGRAD_RUNTIME

    @classmethod
    def estimate_bytes(cls, spec, opts):
        """Its buffers are copies of the dequantized array (and of its f16 cast at f16)."""
        return float_need(spec, opts.precision, opts.max_seq_len, opts.max_batch, cls.runtime_bytes,
                          copies=1.5 if opts.precision == "f16" else 1)

    @classmethod
    def precisions(cls, spec):
        return ("f32", "f16")

    @classmethod
    def modes(cls, spec, device):
        return [Mode("f32", options=(("beam", beam),)) for beam in (0, 2)]

    @classmethod
    def compiles_on_first_call(cls, compile, options):
        return True  # TinyJit captures (and BEAM searches) on the first calls of every shape

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
        from tinygrad import Tensor, UOp, dtypes
        from tinygrad.helpers import BEAM, CACHEDB

        if "beam" in opts.options:  # tinygrad read BEAM from the environment at import: set the live value
            BEAM.value = int(opts.options["beam"])

        restored = restore_programs()
        self._cache_rows_at_load = cache_entries()
        self.dev = opts.device.upper()
        dtype = {"f32": dtypes.float32, "f16": dtypes.float16}[opts.precision]
        np_dtype = np.float32 if opts.precision == "f32" else np.float16
        self.weights = spec.load_weights(lambda a: Tensor(a.astype(np_dtype, copy=False), device=self.dev).realize())
        # separate projections: with BEAM=2, fused QKV/gate-up measured 10.8 tok/s against 12.4 unfused
        self.ops = TinyOps(spec.config, opts.max_seq_len, opts.max_batch, dtype, self.dev)
        # decode takes the bound variables as positional arguments: that is where TinyJit looks for them
        self._decode = ShapeJits(lambda start, *tokens: self._step(list(tokens), start, len(tokens), 1))
        self._prefill = ShapeJits(lambda t: self._step(t, 0, *t.shape))
        self._start_var = UOp.variable("start", 1, opts.max_seq_len - 1)
        self._token_vars = [UOp.variable(f"token{b}", 0, spec.config.vocab_size - 1) for b in range(opts.max_batch)]
        self._Tensor, self._int32 = Tensor, dtypes.int32
        return float_load_info(spec, opts.precision, opts.device, every_expert=bool(spec.config.n_experts),
                               beam=BEAM.value, kernel_cache=CACHEDB,  # every expert: TinyOps.moe
                               programs_restored=restored)

    def uncached_compiles(self) -> int | None:
        rows = cache_entries()
        return None if rows is None else rows - self._cache_rows_at_load

    def close(self) -> None:
        save_programs()  # for the next process (backends.tinygrad_caches)

    def threads_used(self) -> tuple[int, str]:
        if self.dev in ("CPU", "CLANG", "LLVM"):
            return 1, "tinygrad's CPU backend runs each generated kernel on one thread"
        return 0, ""

    def _step(self, tokens, start, batch: int, n_tokens: int):
        return forward(self.ops, self.weights, self.config, tokens, start, batch, n_tokens).float().realize()

    def step(self, tokens: list[list[int]], start: int) -> np.ndarray:
        batch, n = len(tokens), len(tokens[0])
        if n == 1 and start >= 1:  # decode: one captured graph per batch size, for every token and position
            bound = [var.bind(seq[0]) for var, seq in zip(self._token_vars, tokens)]
            return self._decode(batch, lambda: (self._start_var.bind(start), *bound)).numpy()
        ids = lambda: self._Tensor(tokens, dtype=self._int32, device=self.dev).realize()  # noqa: E731
        if start:  # appending to a conversation: lengths and positions vary, run unjitted
            return self._step(ids(), start, batch, n).numpy()
        return self._prefill((batch, n), lambda: (ids(),)).numpy()
