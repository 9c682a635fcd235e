"""What array backends share: positions and bounds checks around one forward step, and the
LoadInfo of float weights. The contract itself lives in `engine.generate.backend` and is
re-exported here, so a backend module imports everything it needs from one place."""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Any, Collection, Sequence

import numpy as np

from engine.generate.backend import (FLOAT_PRECISIONS, Availability, Backend, BackendOption, LoadInfo,  # noqa: F401
                                     LoadOptions, Mode, Requirement, pip_extra)
from engine.model.footprint import BYTES_PER_ELEMENT, float_bytes
from engine.model.forward import check_batch

if TYPE_CHECKING:
    from engine.model.spec import ModelSpec


class ArrayLlamaBackend(Backend):
    """A backend that steps a batch of sequences at once (one sequence is a batch of 1): the array
    frameworks run engine.model.forward through their own ops table, llama.cpp its own graph.

    Subclasses implement `build` (weights, KV caches for `opts.max_batch` sequences) and `step`
    (one forward call to host logits); positions and bounds checks live here once."""

    batched = True

    def load(self, spec: "ModelSpec", opts: LoadOptions) -> LoadInfo:
        self.config = spec.config
        self.max_seq, self.max_batch = opts.max_seq_len, opts.max_batch
        self.pos, self.batch = 0, 1
        return self.build(spec, opts)

    @abstractmethod
    def build(self, spec: "ModelSpec", opts: LoadOptions) -> LoadInfo: ...

    @abstractmethod
    def step(self, tokens: list[list[int]], start: int) -> np.ndarray:
        """Forward `tokens` (B sequences of T ids) at positions [start, start+T) of sequences
        0..B-1; host float32 logits (B, vocab) of each sequence's last token."""

    def prefill_batch(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        prompts = [list(p) for p in prompts]
        check_batch(prompts, self.pos, self.batch, self.max_batch, self.max_seq, self.config.vocab_size)
        self.batch = len(prompts)
        logits = self.step(prompts, self.pos)
        self.pos += len(prompts[0])
        return logits

    def decode_batch(self, tokens: Sequence[int]) -> np.ndarray:
        return self.prefill_batch([[t] for t in tokens])

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        return self.prefill_batch([tokens])[0]

    def decode(self, token: int) -> np.ndarray:
        return self.prefill_batch([[token]])[0]

    def reset(self) -> None:
        self.pos = 0  # cache entries past `pos` are masked out, so nothing needs clearing


def float_load_info(spec: "ModelSpec", precision: str, device: str, every_expert: bool | Collection[int] = False,
                    **details: Any) -> LoadInfo:
    """LoadInfo for a backend holding every weight as floats of `precision` (and reading every
    expert of a mixture each step where `every_expert`: in every layer, or in the layers it names;
    its details say which)."""
    held = float_bytes(spec, precision)
    if every_expert:
        some = every_expert is not True and len(every_expert) < spec.config.n_layers
        details["experts_read"] = f"all in {len(every_expert)} of {spec.config.n_layers} layers" if some else "all"
    return LoadInfo(
        precision=precision, device=device,
        weight_bytes=sum(held(n) for n in spec.tensor_names),
        decode_bytes=spec.decode_read_bytes(held, every_expert),
        kv_bytes_per_token=spec.config.kv_bytes_per_token(BYTES_PER_ELEMENT[precision]),
        details=dict(details),
    )
