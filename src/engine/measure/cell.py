"""Cell: one benchmark configuration (what to measure and how), with a stable id and the key
that decides which cells can share one loaded model."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from engine.errors import InputError


def physical_cores() -> int:
    """The thread count every framework gets unless --threads says otherwise."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


WARMUP_TOKENS = 8  # a warm-up's tokens: the prefill and 7 decode steps (a compiled decode may recompile once)


@dataclass(frozen=True)
class Cell:
    framework: str
    model: str
    precision: str = "auto"
    device: str = "auto"
    prompt_tokens: int = 32
    prompt_text: str = ""
    gen_tokens: int = 32
    batch_size: int = 1  # sequences prefilled together and decoded in lockstep
    repeats: int = 3  # the least measured repeats
    max_repeats: int = 0  # above `repeats`: measure on until the CI is within ci_target (0: exactly `repeats`)
    ci_target: float = 0.05  # relative half-width of decode tok/s's 95% CI that ends an adaptive cell
    max_time_s: float = 0.0  # adaptive: no repeat beyond `repeats` starts once this much is measured (0: no bound)
    warmup: int = 1
    min_time_s: float = 0.0
    threads: int = 0  # 0: every physical core of the host, for every framework alike
    compile: bool = False
    seed: int = 0
    memory_limit_mb: int = 0  # RLIMIT_AS of the child process; 0: none
    options: tuple[tuple[str, Any], ...] = ()  # backend-specific (e.g. beam=2)
    timeout_s: float = 900.0  # bound on the load and warm-up, then on the repeats and fidelity pass, each
    noise_threshold: float = 0.05  # CoV of decode tok/s above which a cell is flagged `noisy`
    node: str = ""  # a cluster node's name (`bench node ... --name`); '' means any node that can run it
    fidelity: bool = True  # the real-text fidelity pass after the timed runs (--no-check: speed only)

    @property
    def warmup_tokens(self) -> int:
        """Tokens a warm-up generates: the cell's prompt and its first decode steps, which is every
        shape the timed runs call, as llama-bench warms up with its prompt and one token."""
        return min(self.gen_tokens, WARMUP_TOKENS)

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "gen_tokens", "batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "threads", "memory_limit_mb"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_time_s < 0:
            raise InputError(f"max_time_s must be >= 0, got {self.max_time_s}")
        if self.max_repeats < 0:
            raise InputError(f"max_repeats must be >= 0, got {self.max_repeats}")
        if not self.ci_target > 0:
            raise InputError(f"ci_target must be > 0, got {self.ci_target}")
        if self.timeout_s <= 0:
            raise InputError(f"timeout must be > 0 seconds, got {self.timeout_s}")

    @property
    def cell_id(self) -> str:
        """Stable across runs and machines: what was measured, not how long it may take."""
        # how hard to try and what else to check, not what is measured
        effort = ("timeout_s", "noise_threshold", "max_repeats", "ci_target", "max_time_s", "fidelity")
        key = {k: v for k, v in asdict(self).items() if k not in effort}
        for axis, default in (("node", ""), ("batch_size", 1)):
            if key[axis] == default:
                del key[axis]  # ids from before the axis existed stay valid
        key["model"] = os.path.basename(self.model)
        return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def resolved_threads(self) -> int:
        return self.threads or physical_cores()

    @property
    def sequence_seeds(self) -> list[int]:
        """The prompt seed of each sequence of the batch: sequence b of a batch at seed s runs the
        prompt a single-sequence cell at seed s + b runs (with --prompt text, the same text)."""
        return [self.seed + b for b in range(self.batch_size)]

    @property
    def load_shape(self) -> tuple:
        """What sizes a load for this cell: the sequences it decodes and the positions each fills.
        A seeded prompt is exactly `prompt_tokens` long; a text prompt's length needs the model's
        tokenizer, so the text stands for it. Cells of equal shape can share a load."""
        if self.prompt_text:
            return (self.batch_size, self.prompt_text, self.gen_tokens)
        return (self.batch_size, self.prompt_tokens + self.gen_tokens)

    @property
    def load_key(self) -> tuple:
        """Cells with equal keys can share one loaded model in one child process: every cell gets
        a load sized for its own shape, never for its neighbours'."""
        return (self.model, self.framework, self.precision, self.device, self.threads, self.compile,
                self.memory_limit_mb, self.options, self.node, self.load_shape)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Cell":
        d = dict(d)
        d["options"] = tuple(tuple(kv) for kv in d.get("options", ()))
        return cls(**d)


CELL_FIELDS = {f.name for f in fields(Cell)}
