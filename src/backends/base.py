"""What array backends share: positions and bounds checks around one forward step, and the
LoadInfo of float weights. The contract itself lives in `engine.generate.backend` and is
re-exported here, so a backend module imports everything it needs from one place."""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from engine.generate.backend import (FLOAT_PRECISIONS, Availability, Backend, BackendOption, LoadInfo,  # noqa: F401
                                     LoadOptions, Mode, Requirement, pip_extra)
from engine.model.forward import check_tokens

if TYPE_CHECKING:
    from engine.model.spec import ModelSpec

BYTES_PER_ELEMENT = {"f32": 4, "bf16": 2, "f16": 2}


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
