"""The Backend contract every framework implements, and the shared base for array backends."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import numpy as np

from engine.errors import InputError
from engine.llama import check_tokens

if TYPE_CHECKING:
    from engine.gguf_model import ModelSpec

FLOAT_PRECISIONS = ("f32", "bf16", "f16")
BYTES_PER_ELEMENT = {"f32": 4, "bf16": 2, "f16": 2}


@dataclass(frozen=True)
class Requirement:
    module: str  # the import name (find_spec looks this up, never the distribution name)
    dist: str  # the distribution whose version is reported
    install: str  # the exact command that installs it

    def present(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def version(self) -> str:
        try:
            return importlib.metadata.version(self.dist)
        except importlib.metadata.PackageNotFoundError:
            return ""


def pip_extra(extra: str) -> str:
    return f"pip install -e '.[{extra}]'"


@dataclass(frozen=True)
class Availability:
    ok: bool
    version: str = ""
    reason: str = ""


@dataclass(frozen=True)
class LoadOptions:
    precision: str = "auto"
    device: str = "auto"
    threads: int | None = None
    max_seq_len: int = 512
    compile: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class LoadInfo:
    precision: str
    device: str
    weight_bytes: int  # weights as the framework holds them
    decode_bytes: int  # weight bytes one decode step reads
    kv_bytes_per_token: int  # KV-cache bytes one position adds (all layers, K and V)
    compile_s: float = 0.0  # explicit compilation done inside load (reported, never in tok/s)
    details: dict[str, Any] = field(default_factory=dict)  # goes to the row's `extra` column


class Backend(ABC):
    """One inference framework. Logits come back to the host as float32 numpy arrays, so the
    engine owns sampling, stopping and timing; each call returns only after the framework's
    queued work is complete."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    requires: ClassVar[tuple[Requirement, ...]] = ()
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    is_reference: ClassVar[bool] = False

    @classmethod
    def availability(cls) -> Availability:
        missing = [r for r in cls.requires if not r.present()]
        if missing:
            return Availability(False, reason=f"{missing[0].module} is not installed: {missing[0].install}")
        return Availability(True, version=cls.requires[0].version() if cls.requires else _numpy_version())

    @classmethod
    def precisions(cls, spec: "ModelSpec") -> tuple[str, ...]:
        """Precisions this backend runs the model at; the first is the default."""
        return FLOAT_PRECISIONS

    @classmethod
    def resolve_precision(cls, spec: "ModelSpec", precision: str) -> str:
        supported = cls.precisions(spec)
        if precision == "auto":
            return supported[0]
        if precision not in supported:
            raise InputError(
                f"framework {cls.name} does not run precision {precision!r} on {spec.name} "
                f"(supported: {', '.join(supported)})"
            )
        return precision

    @classmethod
    def resolve_device(cls, device: str) -> str:
        """'auto' -> the best device present; a named device is checked to exist here."""
        if device == "auto":
            return cls.devices[0]
        if device not in cls.devices:
            raise InputError(f"framework {cls.name} has no device {device!r} (devices: {', '.join(cls.devices)})")
        return device

    @abstractmethod
    def load(self, spec: "ModelSpec", opts: LoadOptions) -> LoadInfo: ...

    @abstractmethod
    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Append `tokens` to the sequence; logits (vocab,) of the last one."""

    @abstractmethod
    def decode(self, token: int) -> np.ndarray:
        """Append one token; its logits (vocab,)."""

    @abstractmethod
    def reset(self) -> None:
        """Empty the KV cache: the next prefill starts at position 0."""

    def memory(self) -> dict[str, int]:
        """What the framework's own allocator reports, in bytes (empty when it has none)."""
        return {}

    def close(self) -> None:
        pass


class ArrayLlamaBackend(Backend):
    """A backend that runs engine.llama.forward through its own ops table.

    Subclasses implement `build` (weights + ops + KV cache) and `step` (one forward call to
    host logits); positions and bounds checks live here once."""

    def load(self, spec: "ModelSpec", opts: LoadOptions) -> LoadInfo:
        self.config = spec.config
        self.max_seq = opts.max_seq_len
        self.pos = 0
        return self.build(spec, opts)

    @abstractmethod
    def build(self, spec: "ModelSpec", opts: LoadOptions) -> LoadInfo: ...

    @abstractmethod
    def step(self, tokens: Sequence[int], start: int) -> np.ndarray:
        """Forward `tokens` at positions [start, start+len); host float32 logits (vocab,)."""

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        tokens = list(tokens)
        check_tokens(tokens, self.pos, self.max_seq, self.config.vocab_size)
        logits = self.step(tokens, self.pos)
        self.pos += len(tokens)
        return logits

    def decode(self, token: int) -> np.ndarray:
        return self.prefill([token])

    def reset(self) -> None:
        self.pos = 0  # cache entries past `pos` are masked out, so nothing needs clearing


def float_load_info(spec: "ModelSpec", precision: str, device: str, **details: Any) -> LoadInfo:
    """LoadInfo for a backend holding every weight as floats of `precision`."""
    per = BYTES_PER_ELEMENT[precision]
    elements = lambda name: int(np.prod(spec.raw_tensor(name).shape))  # noqa: E731
    tensors = spec.tensor_names
    return LoadInfo(
        precision=precision, device=device,
        weight_bytes=sum(elements(n) for n in tensors) * per,
        decode_bytes=spec.decode_read_bytes(lambda n: elements(n) * per),
        kv_bytes_per_token=spec.config.kv_bytes_per_token(per),
        details=dict(details),
    )


def _numpy_version() -> str:
    return np.__version__
