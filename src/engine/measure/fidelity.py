"""Fidelity as numbers: how far a mode's next-token distributions are from the reference's on
natural text, with llama-perplexity's KL-divergence statistics (tools/perplexity/perplexity.cpp,
`kl_divergence`), and whether its greedy continuation of a text prompt stays on the reference's.

Both the reference and the mode are teacher-forced through the same corpus windows
(engine.measure.corpus); every scored position compares two distributions over the same real-text
context. The reference's log-probabilities are stored as float16 (engine.measure.reference); the
mode's are rounded the same way before comparing, so the reference against itself is exactly
0 / 1 / 0 and the rounding is a floor far below any mode's difference.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from engine.generate.backend import Backend
from engine.measure import corpus

LOG_P_FLOOR = -16.0  # llama-perplexity's KLD sums only the reference tokens with log p above this


@dataclass(frozen=True)
class Fidelity:
    kld_mean: float  # nats: mean over positions of KL(reference || mode)
    kld_p99: float  # nats: 99th percentile of the per-position KLD (linear interpolation)
    same_top_p: float  # fraction of positions whose most likely token is the reference's
    same_top_p_err: float  # its standard error, sqrt(p (1 - p) / (n - 1))
    rms_dp: float  # RMS over positions of p_mode(next token) - p_reference(next token)
    positions: int

    def as_dict(self) -> dict:
        return asdict(self)


NOT_COMPARED = Fidelity(math.nan, math.nan, math.nan, math.nan, math.nan, 0)


def log_probs16(logits: np.ndarray) -> np.ndarray:
    """Log-softmax in float64, stored as float16 (how the reference's distributions are kept)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(axis=-1, keepdims=True))).astype(np.float16)


def teacher_forced(backend: Backend, windows: Sequence[Sequence[int]]) -> Iterator[np.ndarray]:
    """Per window, the (SCORED_PER_WINDOW, vocab) float16 log-probabilities of its scored
    positions: prefill the window up to its first scored position, then feed it token by token."""
    first = corpus.FIRST_SCORED
    for w in windows:
        backend.reset()
        every = backend.every_position_logits(list(w[:-1]))  # the same positions in one pass, where it can
        if every is not None:
            yield log_probs16(every[first:])
            continue
        rows = [backend.prefill(list(w[:first + 1]))]
        rows += [backend.decode(int(t)) for t in w[first + 1:-1]]
        yield log_probs16(np.stack(rows))
    backend.reset()


def position_stats(reference: np.ndarray, mode: np.ndarray, targets: Sequence[int]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per position (rows of float16 log-probabilities): KLD in nats, whether the argmax agrees,
    and the difference in probability of the actual next token, each as llama-perplexity defines it."""
    ref, cand = reference.astype(np.float64), mode.astype(np.float64)
    kept = ref > LOG_P_FLOOR
    kld = np.where(kept, np.exp(ref) * (ref - cand), 0.0).sum(axis=-1)
    same = ref.argmax(axis=-1) == cand.argmax(axis=-1)
    rows = np.arange(len(ref))
    dp = np.exp(cand[rows, targets]) - np.exp(ref[rows, targets])
    return kld, same, dp


def summarize(kld: np.ndarray, same: np.ndarray, dp: np.ndarray) -> Fidelity:
    """llama-perplexity's summary: mean KLD, its 99.0% KLD (interpolated between sorted values),
    same-top p with sqrt(p(1-p)/(n-1)), and RMS delta-p = sqrt(mean(dp^2))."""
    n = len(kld)
    p = float(np.mean(same))
    return Fidelity(kld_mean=float(np.mean(kld)), kld_p99=float(np.percentile(kld, 99.0)), same_top_p=p,
                    same_top_p_err=math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else math.nan,
                    rms_dp=float(np.sqrt(np.mean(np.square(dp)))), positions=n)


def compare(reference: np.ndarray, mode_chunks: Iterable[np.ndarray], windows: Sequence[Sequence[int]]) -> Fidelity:
    """Stream the mode's windows against the reference's rows (memory-mapped), one window at a time."""
    parts = []
    row = 0
    for chunk, w in zip(mode_chunks, windows):
        parts.append(position_stats(np.asarray(reference[row:row + len(chunk)]), chunk, corpus.targets(w)))
        row += len(chunk)
    kld, same, dp = (np.concatenate(x) for x in zip(*parts))
    return summarize(kld, same, dp)
