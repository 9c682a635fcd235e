"""Fidelity as a number: how far a framework's next-token distributions are from the reference's.

The reference backend's greedy continuation of a prompt is the path. Both the reference and the
framework are teacher-forced along it (prefill the prompt, then feed the reference's tokens one
by one), so every position compares two distributions over the same context even where greedy
decoding would drift apart. The reference saves its log-probabilities once per (model, prompt,
length) under the cache; a measuring child reads them after its timed runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from engine.generate.backend import Backend
from engine.paths import cache_dir


@dataclass(frozen=True)
class Fidelity:
    kl_vs_reference: float  # nats: mean over positions of KL(reference || framework)
    top1_agreement: float  # fraction of positions whose argmax equals the reference's


NOT_COMPARED = Fidelity(math.nan, math.nan)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def teacher_forced_logprobs(backend: Backend, prompt: Sequence[int], path: Sequence[int]) -> np.ndarray:
    """(len(path), vocab) log-probabilities: row i predicts path[i] given the prompt and path[:i]."""
    backend.reset()
    rows = [backend.prefill(list(prompt))]
    for token in path[:-1]:
        rows.append(backend.decode(int(token)))
    backend.reset()
    return log_softmax(np.stack(rows)).astype(np.float32)


def compare(reference: np.ndarray, candidate: np.ndarray) -> Fidelity:
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    kl = (np.exp(ref) * (ref - cand)).sum(axis=-1)
    top1 = ref.argmax(axis=-1) == cand.argmax(axis=-1)
    return Fidelity(float(max(kl.mean(), 0.0)), float(top1.mean()))


def reference_file(model_path: str, prompt: Sequence[int], n_tokens: int) -> Path:
    """Where the reference's log-probabilities for this prompt live: keyed by the model file's
    identity (path, size, mtime) and the exact prompt ids, so a changed file never matches."""
    st = os.stat(model_path)
    key = json.dumps([os.path.realpath(model_path), st.st_size, st.st_mtime_ns, list(map(int, prompt)), n_tokens])
    return cache_dir() / "reference" / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.npz"


def save_reference(path: Path, tokens: Sequence[int], logprobs: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, tokens=np.asarray(tokens, dtype=np.int64), logprobs=logprobs)
    os.replace(tmp, path)


def load_reference(path: Path) -> tuple[list[int], np.ndarray] | None:
    if not path.exists():
        return None
    with np.load(path) as f:
        return [int(t) for t in f["tokens"]], f["logprobs"]
