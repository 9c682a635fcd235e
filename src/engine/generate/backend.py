"""The Backend contract every framework implements; the engine drives nothing else.

Backends see this module and `engine.model`; the harness reaches them only through the registry
in `backends`. A backend states what it can do (devices present, precisions, typed options) as
data and hooks here, so no harness code ever switches on a framework's name.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import numpy as np

from engine.errors import InputError, UnavailableError
from engine.model.footprint import MemoryNeed, float_need

if TYPE_CHECKING:
    from engine.model.spec import ModelSpec

FLOAT_PRECISIONS = ("f32", "bf16", "f16")


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
class BackendOption:
    """A `--option KEY=VALUE` a backend understands, typed so the CLI checks it before any run."""

    name: str
    type: type  # int, float, str or bool
    help: str
    choices: tuple = ()

    def parse(self, framework: str, value: Any) -> Any:
        try:
            if self.type is bool and isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError
                parsed: Any = value.lower() in ("1", "true", "yes", "on")
            elif self.type is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            else:
                parsed = self.type(value)
        except (TypeError, ValueError):
            raise InputError(f"option {self.name}={value!r} of framework {framework} needs a "
                             f"{self.type.__name__} ({self.help})") from None
        if self.choices and parsed not in self.choices:
            raise InputError(f"option {self.name}={value!r} of framework {framework} must be one of "
                             f"{', '.join(map(str, self.choices))}")
        return parsed


@dataclass(frozen=True)
class Mode:
    """One way a framework can run a model: what `bench run --modes best` tries."""

    precision: str
    compile: bool = False
    options: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class LoadOptions:
    precision: str = "auto"
    device: str = "auto"
    threads: int | None = None
    max_seq_len: int = 512  # positions per sequence
    max_batch: int = 1  # sequences decoded together at most (KV caches to hold)
    compile: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    # the most the load may hold (0: not said); a backend that can trade speed for memory (the
    # reference's layers dequantized on demand) sizes itself to it
    memory_budget_bytes: int = 0


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
    devices: ClassVar[tuple[str, ...]] = ("cpu",)  # every device it knows, in order of preference
    options: ClassVar[tuple[BackendOption, ...]] = ()
    is_reference: ClassVar[bool] = False
    batched: ClassVar[bool] = False  # overrides prefill_batch/decode_batch to step many sequences at once
    # where the framework keeps compiled code between processes: environment variable -> a path
    # under the project's cache directory (the harness sets them in the measuring child)
    compile_caches: ClassVar[Mapping[str, str]] = {}
    runtime_bytes: ClassVar[int] = 0  # the framework's resident footprint beside the model (measured)

    @classmethod
    def availability(cls) -> Availability:
        missing = [r for r in cls.requires if not r.present()]
        if missing:
            return Availability(False, reason=f"{missing[0].module} is not installed: {missing[0].install}")
        return Availability(True, version=cls.requires[0].version() if cls.requires else np.__version__)

    @classmethod
    def precisions(cls, spec: "ModelSpec") -> tuple[str, ...]:
        """Precisions this backend runs the model at; the first is the default."""
        return FLOAT_PRECISIONS

    @classmethod
    def modes(cls, spec: "ModelSpec", device: str) -> list[Mode]:
        """The modes worth trying for this file on `device` (a resolved device); by default the
        default precision. A framework lists its faster or leaner ways here (precisions, compile,
        options), and `--modes best` measures every one."""
        return [Mode(cls.precisions(spec)[0])]

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
    def estimate_bytes(cls, spec: "ModelSpec", opts: LoadOptions) -> MemoryNeed:
        """The memory a load with `opts` will hold at its peak, known before loading: the harness
        writes an `oom` row for a mode that would not fit, never starts it. By default: every
        weight as floats of the precision (f32 for any other), KV caches alike, one tensor converted
        at a time (engine.model.footprint has the arithmetic)."""
        precision = opts.precision if opts.precision in FLOAT_PRECISIONS else "f32"
        return float_need(spec, precision, opts.max_seq_len, opts.max_batch, cls.runtime_bytes)

    @classmethod
    def device_missing(cls, device: str) -> str:
        """Why one of `devices` is not usable on this host; '' when it is. Probes import the framework."""
        return ""

    @classmethod
    def resolve_device(cls, device: str) -> str:
        """'auto' -> the first device present here; a named device is checked to exist here."""
        if device == "auto":
            return next((d for d in cls.devices if not cls.device_missing(d)), cls.devices[-1])
        if device not in cls.devices:
            raise InputError(f"framework {cls.name} has no device {device!r} (devices: {', '.join(cls.devices)}, auto)")
        why = cls.device_missing(device)
        if why:
            raise UnavailableError(f"{cls.name} device {device} is not available here: {why}")
        return device

    @classmethod
    def parse_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """`options` typed by this backend's declarations; an unknown key is one clear error."""
        known = {o.name: o for o in cls.options}
        for key in options:
            if key not in known:
                listed = ", ".join(known) or "none"
                raise InputError(f"framework {cls.name} has no option {key!r} (its options: {listed})")
        return {k: known[k].parse(cls.name, v) for k, v in options.items()}

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

    def prefill_batch(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Append prompts[b] (all of one length) to sequence b; logits (B, vocab) of each last token.
        The first call after `reset` sets B. A backend that cannot batch (`batched` False) runs
        B = 1 only: looping over sequences would measure B single runs, not a batch."""
        self.check_batch_size(len(prompts))
        return self.prefill(prompts[0])[None]

    def decode_batch(self, tokens: Sequence[int]) -> np.ndarray:
        """Append tokens[b] to sequence b; logits (B, vocab)."""
        self.check_batch_size(len(tokens))
        return self.decode(tokens[0])[None]

    @classmethod
    def compiles_on_first_call(cls, compile: bool, options: Mapping[str, Any]) -> bool:
        """Whether the first call of a shape in this mode compiles (torch.compile's tracing, a JIT
        capture, a kernel search): timed without a warm-up, its tok/s would include the compiler."""
        return False

    @classmethod
    def check_batch_size(cls, n: int) -> None:
        if n != 1 and not cls.batched:
            raise UnavailableError(f"framework {cls.name} cannot decode a batch of {n} sequences in one step")

    def every_position_logits(self, tokens: Sequence[int]) -> np.ndarray | None:
        """Logits (T, vocab) of every position of `tokens` prefilled from position 0, in one pass,
        where that saves work (the fidelity pass teacher-forces windows): the reference streaming
        its layers reads the weights once per window, not once per position. None: not offered."""
        return None

    def memory(self) -> dict[str, int]:
        """What the framework's own allocator reports, in bytes (empty when it has none)."""
        return {}

    def uncached_compiles(self) -> int | None:
        """Programs this loaded backend compiled itself so far (since load) because its on-disk
        compile cache could not serve them; None when this mode compiles nothing or the framework
        cannot tell. The harness reads the change over a cell's first run: cold or cached."""
        return None

    def threads_used(self) -> tuple[int, str]:
        """Threads the loaded framework computes with, read back from it where it can say (0 when
        it cannot), and a note when it cannot use the threads it was given."""
        return 0, ""

    def close(self) -> None:
        pass
