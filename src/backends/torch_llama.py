"""`torch`: our compact Llama-family model (llama, qwen2, qwen3, gemma2, gemma3) in PyTorch (gpt-fast style): static KV cache, SDPA with grouped-query
attention, optional `torch.compile` of the decode step. CPU, CUDA and MPS."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from backends.base import (FLOAT_PRECISIONS, ArrayLlamaBackend, BackendOption, LoadInfo, LoadOptions, Mode,
                           Requirement, float_load_info, pip_extra)
from backends.torch_quant import (INT4_TYPES, KQUANT_FILES, RESTS, FileRows, PackedWeight, held_bytes,
                                  load_native_weights, native_counts, native_need)
from engine.errors import UnavailableError
from engine.model.footprint import float_bytes, fused_rows_bytes
from engine.model.forward import FusedProjections, forward, layer_rope_tables

TORCH = Requirement("torch", "torch", pip_extra("torch"))
TORCH_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}
TORCH_RUNTIME = 240 * 2**20  # torch's allocator and first steps beside its imported libraries (measured: default model f32 1004 MB peak, 1021 estimated)
INDUCTOR_RUNTIME = 70 * 2**20  # torch.compile's inductor, imported only by compiled modes (measured: 68 MB)


def torch_device_missing(device: str) -> str:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if device == "mps" and not torch.backends.mps.is_available():
        return "torch sees no MPS device (Apple silicon)"
    return ""


def synchronize(device: str) -> None:
    """Wait for queued kernels: the engine's clock must only see finished work."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def enter_inference(threads: int | None) -> None:
    """Threads set before any op runs, autograd off: what every torch-based backend needs first."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.set_grad_enabled(False)


def torch_memory(device: str) -> dict[str, int]:
    import torch

    if device == "cuda":
        return {"allocated_bytes": torch.cuda.memory_allocated(), "reserved_bytes": torch.cuda.memory_reserved(),
                "peak_allocated_bytes": torch.cuda.max_memory_allocated()}
    if device == "mps":
        return {"allocated_bytes": torch.mps.current_allocated_memory(),
                "driver_bytes": torch.mps.driver_allocated_memory()}
    return {}


class TorchOps(FusedProjections):
    def __init__(self, cfg, max_seq: int, max_batch: int, dtype, device: str):
        import torch

        self.cfg = cfg
        self.rope_tables = layer_rope_tables(cfg, max_seq, lambda a: torch.from_numpy(a).to(device=device, dtype=dtype))
        # a tensor per layer, written whole through index_put: compiled decode copied the caches it
        # wrote through views ([layer, :B] of one tensor: 140 ms a step against 53 ms, B=1 of 8)
        shape = (max_batch, cfg.n_kv_heads, max_seq, cfg.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.positions = torch.arange(max_seq, device=device)
        self.sequences = torch.arange(max_batch, device=device)
        # CPU GEMV: for half types torch.mv's kernel reads ~1.4x faster than F.linear's (measured)
        self.use_mv = device == "cpu" and dtype != torch.float32
        self.end: int | None = None  # eager calls attend over [0, end); compiled ones over the whole cache

    def embed(self, table, tokens):
        return table.lookup(tokens) if isinstance(table, FileRows) else table[tokens]

    def rms_norm(self, x, weight):
        import torch.nn.functional as F

        return F.rms_norm(x, (x.shape[-1],), weight, self.cfg.rms_eps)

    def linear(self, x, weight):
        import torch
        import torch.nn.functional as F

        if isinstance(weight, PackedWeight):
            return weight.matmul(x)
        if self.use_mv and x.numel() == x.shape[-1]:  # one token of one sequence
            return torch.mv(weight, x.reshape(-1)).reshape(*x.shape[:-1], -1)
        return F.linear(x, weight)  # one GEMM over every sequence's tokens

    def rope(self, x, pos, layer):
        import torch

        cos, sin = self.rope_tables[layer]
        cos, sin = cos[pos][:, None, :], sin[pos][:, None, :]
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    def attend(self, layer, q, k, v, pos):
        import torch.nn.functional as F

        batch = q.shape[0]
        kc, vc = self.k_cache[layer], self.v_cache[layer]  # (max_batch, kv, S, hd)
        # (sequence, position) pairs broadcast to (B, T): k and v go in as they are, (B, T, kv, hd)
        slots = (self.sequences[:batch, None], slice(None), pos)
        kc[slots], vc[slots] = k, v
        kc, vc = kc[:batch], vc[:batch]
        end = self.end if self.end is not None else kc.shape[2]
        mask = self.positions[None, :end] <= pos[:, None]  # (T, S): causal over absolute positions
        window = self.cfg.window(layer)
        if window:
            mask = mask & (self.positions[None, :end] > pos[:, None] - window)
        if self.cfg.attn_softcap:
            out = self._capped_attention(q.transpose(1, 2), kc[:, :, :end], vc[:, :, :end], mask)
        else:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), kc[:, :, :end], vc[:, :, :end],
                                                 attn_mask=mask, enable_gqa=True, scale=self.cfg.scale)
        return out.transpose(1, 2).reshape(batch, q.shape[1], -1)

    def _capped_attention(self, q, k, v, keep):
        """Attention with soft-capped scores (Gemma 2), which SDPA cannot do: q (B, H, T, hd),
        k and v (B, kv, S, hd), keep (T, S) True where a query sees a key."""
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = self.softcap(q @ k.transpose(-1, -2) * self.cfg.scale, self.cfg.attn_softcap)
        return scores.masked_fill(~keep, float("-inf")).softmax(dim=-1) @ v

    def silu_mul(self, gate, up):
        import torch.nn.functional as F

        return F.silu(gate) * up

    def gelu_mul(self, gate, up):
        import torch.nn.functional as F

        return F.gelu(gate, approximate="tanh") * up

    def residual(self, x, delta):
        return x + delta

    def softcap(self, x, cap):
        return (x / cap).tanh() * cap

    def moe(self, x, layer):
        """Routing as the reference, then expert by expert over views of the stacked matrices; a
        compiled step gathers each token's experts instead (static shapes, one graph), which copies
        k matrices a token: eagerly, on the MoE shape's decode, 152 ms a layer against the loop's 21."""
        import torch
        import torch.nn.functional as F

        flat = x.reshape(-1, x.shape[-1])
        probs = F.linear(flat, layer.router).float().softmax(dim=-1)
        weights, top = probs.topk(self.cfg.n_experts_used, dim=-1)  # (N, k)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        if torch.compiler.is_compiling():
            h = flat[:, None, :, None]  # (N, 1, dim, 1) against (N, k, rows, dim) gathered experts
            act = F.silu(layer.gate_exps[top] @ h) * (layer.up_exps[top] @ h)
            y = (layer.down_exps[top] @ act)[..., 0]  # (N, k, dim)
            return (y * weights[..., None]).sum(dim=1).reshape(x.shape)
        out = torch.zeros_like(flat)
        for e in top.unique().tolist():
            rows, slot = (top == e).nonzero(as_tuple=True)
            h = flat[rows]
            y = F.linear(F.silu(F.linear(h, layer.gate_exps[e])) * F.linear(h, layer.up_exps[e]), layer.down_exps[e])
            out.index_add_(0, rows, y * weights[rows, slot, None])
        return out.reshape(x.shape)

    def project(self, layer, kind, x, weights):
        if not getattr(self, "fused", None):  # int4 weights are not fused: one kernel call each
            return tuple(self.linear(x, w) for w in weights)
        return super().project(layer, kind, x, weights)

    def concat_rows(self, parts):
        import torch

        return torch.cat(parts)

    def split_rows(self, fused, sizes):
        return fused.split(sizes)

    def split_last(self, y, sizes):
        return y.split(sizes, dim=-1)


class TorchBased(ArrayLlamaBackend):
    """What every backend running on torch shares: devices, threads, inference mode, memory."""

    requires = (TORCH,)
    runtime_bytes = TORCH_RUNTIME
    devices = ("cuda", "mps", "cpu")
    compile_caches = {"TORCHINDUCTOR_CACHE_DIR": "torchinductor"}  # FX graphs, AOTAutograd, kernels

    @classmethod
    def device_missing(cls, device: str) -> str:
        return torch_device_missing(device)

    def prepare_torch(self, opts: LoadOptions) -> None:
        enter_inference(opts.threads)
        self.device = opts.device

    def memory(self) -> dict[str, int]:
        return torch_memory(self.device)

    def threads_used(self) -> tuple[int, str]:
        import torch

        return torch.get_num_threads(), ""


class TorchBackend(TorchBased):
    name = "torch"
    description = "compact PyTorch Llama (static KV cache, SDPA, optional torch.compile)"
    options = (BackendOption("rest", str, "K-quant files: how matrices that are not 4-bit run (f32 or bf16)",
                             choices=RESTS),)

    @classmethod
    def precisions(cls, spec):
        return FLOAT_PRECISIONS + ((spec.file_type,) if spec.file_type in INT4_TYPES + KQUANT_FILES else ())

    @classmethod
    def compiles_on_first_call(cls, compile, options):
        return compile  # torch.compile traces and compiles on the first calls

    @classmethod
    def estimate_bytes(cls, spec, opts):
        """Floats of the precision with Q/K/V and gate/up fused after the load (a layer's worth held
        twice for a moment), or the file's own blocks (packed 4-bit groups, the rest as `rest` says)."""
        if opts.precision in INT4_TYPES + KQUANT_FILES:
            need = native_need(spec, opts.options.get("rest", "f32"), opts.max_seq_len, opts.max_batch,
                               cls.runtime_bytes)
        else:
            need = super().estimate_bytes(spec, opts)
            need = replace(need, transient=max(need.transient, fused_rows_bytes(spec, float_bytes(spec, opts.precision))))
        return replace(need, runtime=need.runtime + INDUCTOR_RUNTIME) if opts.compile else need

    @classmethod
    def modes(cls, spec, device):
        floats = ("f32", "bf16") if device == "cpu" else ("f32", "bf16", "f16")
        native = [Mode(spec.file_type)] if spec.file_type in INT4_TYPES else []
        native += [Mode(spec.file_type, options=(("rest", r),)) for r in RESTS if spec.file_type in KQUANT_FILES]
        return [Mode(p, compile=c) for c in (False, True) for p in floats] + (native if device == "cpu" else [])

    def build(self, spec, opts: LoadOptions) -> LoadInfo:
        import torch

        self.prepare_torch(opts)
        if opts.precision in INT4_TYPES + KQUANT_FILES:
            return self._build_int4(spec, opts)
        if "rest" in opts.options:
            raise UnavailableError("option rest applies to the file's own quantization only (precision "
                                   f"{spec.file_type}), not to {opts.precision}")
        dtype = getattr(torch, TORCH_DTYPES[opts.precision])
        if opts.precision == "f16" and self.device == "cpu" and not _cpu_half_works():
            raise UnavailableError("torch f16 matmul is not supported on this CPU build; use bf16 or f32")
        to = lambda a: torch.from_numpy(a).to(device=self.device, dtype=dtype)  # noqa: E731
        self.weights = spec.load_weights(to)
        self.ops = TorchOps(spec.config, opts.max_seq_len, opts.max_batch, dtype, self.device)
        self.ops.fuse(self.weights.layers)
        self._decode = None  # the compiled decode step, when compiling
        compile_s = 0.0
        if opts.compile:
            t = time.perf_counter()
            self._decode = torch.compile(self._forward, fullgraph=True, dynamic=False)
            # a graph per batch size: dynamo must keep that many before falling back to eager
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, opts.max_batch)
            compile_s = time.perf_counter() - t  # tracing happens on the first calls: see warm-up
            self._codegens_at_load = inductor_codegens()
        info = float_load_info(spec, opts.precision, self.device, torch_threads=torch.get_num_threads(),
                               compiled=bool(opts.compile))
        info.compile_s = compile_s
        return info

    def _build_int4(self, spec, opts: LoadOptions) -> LoadInfo:
        """The file's own Q4 blocks on torch's int4 kernel (CPU): f32 activations, no fusing."""
        import torch

        if self.device != "cpu":
            raise UnavailableError(f"torch runs {opts.precision} blocks on the CPU only (its int4 kernel here)")
        if opts.compile:
            raise UnavailableError("torch.compile of the int4 path is not supported; drop --compile")
        if spec.config.arch.fused or spec.config.n_experts:
            raise UnavailableError(f"torch int4 runs neither fused attn_qkv/ffn_up blocks nor stacked experts "
                                   f"({spec.config.arch.name}); use f32 or bf16")
        rest = opts.options.get("rest", "f32")
        self.weights = load_native_weights(spec, rest)
        self.ops = TorchOps(spec.config, opts.max_seq_len, opts.max_batch, torch.float32, self.device)
        self._decode = None
        held = dict(spec.weight_items(self.weights))
        head = self.weights.output if spec.tied_embeddings else None  # tied: the embedding, or a copy of its own
        def size(name: str) -> int:  # bytes as held (of a tied table, the head's: a lookup reads one row)
            w = head if name == "token_embd.weight" and head is not None else held.get(name)
            return spec.file_bytes(name) if w is None else held_bytes(w)

        copies = list(held.values()) + ([head] if head is not None and head is not self.weights.tok_embd else [])
        return LoadInfo(precision=opts.precision, device=self.device, weight_bytes=sum(map(held_bytes, copies)),
                        decode_bytes=spec.decode_read_bytes(size),
                        kv_bytes_per_token=spec.config.kv_bytes_per_token(4),
                        details={"kernel": "_weight_int4pack_mm_for_cpu", "activations": "bf16", "rest": rest,
                                 **native_counts(self.weights)})

    def uncached_compiles(self) -> int | None:
        if self._decode is None:  # eager: nothing compiles (and importing inductor costs seconds)
            return None
        from torch._inductor import config

        if not config.fx_graph_cache:
            return None
        return inductor_codegens() - self._codegens_at_load

    def _forward(self, tokens, pos):
        return forward(self.ops, self.weights, self.config, tokens, pos, *tokens.shape)

    def step(self, tokens: list[list[int]], start: int) -> np.ndarray:
        import torch

        t = torch.tensor(tokens, device=self.device)
        n = t.shape[1]
        pos = self.ops.positions[start:start + n]
        if n == 1 and self._decode is not None:  # one compiled graph per batch size
            self.ops.end = None
            logits = self._decode(t, pos)
        else:
            self.ops.end = start + n
            logits = self._forward(t, pos)
        synchronize(self.device)
        return logits.float().cpu().numpy()


def inductor_codegens() -> int:
    """Graphs inductor generated code for in this process: its FX graph cache missed or refused
    them (a graph served from that cache or from the AOTAutograd cache counts neither)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_bypass"]


def _cpu_half_works() -> bool:
    import torch

    try:
        torch.nn.functional.linear(torch.ones(2, 4, dtype=torch.float16), torch.ones(3, 4, dtype=torch.float16))
        return True
    except RuntimeError:
        return False
