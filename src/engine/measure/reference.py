"""The numpy reference's answers, computed once and kept under the cache directory: its greedy
tokens per (model file, prompt ids, length), and its teacher-forced log-probabilities over the
fidelity corpus per model file. The sweep, the measuring children and `bench serve` all read them
here, so every check compares with the same reference run.

Files are keyed by the model file's content (size and sha256: a changed file never matches, the
same bytes at another path, as in a fresh clone's environment, do), what was asked, and `VERSION`,
bumped when the computation changes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from engine.generate.backend import Backend
from engine.measure import corpus
from engine.model.digest import content_identity
from engine.paths import cache_dir

VERSION = 2  # 2: distributions over the natural-text corpus (1: along a greedy path after random tokens)

Opener = Callable[[], Backend]  # opens the reference backend when a missing answer must be computed


def keyed_file(kind: str, key: list, suffix: str) -> Path:
    digest = hashlib.sha1(json.dumps([VERSION, *key]).encode()).hexdigest()[:20]
    return cache_dir() / kind / f"{digest}{suffix}"


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then a rename: a reader sees the whole file or none (a crashed writer leaves none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def greedy_file(model_path: str, prompt: Sequence[int], n_tokens: int) -> Path:
    return keyed_file("reference", [*content_identity(model_path), list(map(int, prompt)), n_tokens], ".json")


def greedy_tokens(model_path: str, prompt: Sequence[int], n_tokens: int, open_reference: Opener | None = None
                  ) -> list[int] | None:
    """The reference's `n_tokens` greedy tokens after `prompt` (EOS ignored): from the cache, else
    computed with `open_reference()` and saved; None when not cached and nothing to compute with."""
    path = greedy_file(model_path, prompt, n_tokens)
    if path.exists():
        return json.loads(path.read_text())
    if open_reference is None:
        return None
    tokens = greedy(open_reference(), prompt, n_tokens)
    save_greedy(model_path, prompt, n_tokens, tokens)
    return tokens


def greedy(backend: Backend, prompt: Sequence[int], n_tokens: int) -> list[int]:
    """`n_tokens` greedy tokens of `backend` after `prompt`, EOS ignored, the cache emptied after."""
    from engine.generate.engine import GenerationConfig, InferenceEngine

    tokens = InferenceEngine(backend).generate(list(prompt), GenerationConfig(max_new_tokens=n_tokens, ignore_eos=True))
    backend.reset()
    return [int(t) for t in tokens.tokens]


def save_greedy(model_path: str, prompt: Sequence[int], n_tokens: int, tokens: Sequence[int]) -> None:
    write_atomically(greedy_file(model_path, prompt, n_tokens),
                     lambda tmp: tmp.write_text(json.dumps([int(t) for t in tokens])))


def distributions_file(model_path: str) -> Path:
    key = [*content_identity(model_path), corpus.corpus_sha(), corpus.WINDOW, corpus.N_WINDOWS]
    return keyed_file("reference", key, ".npy")


def distributions(model_path: str) -> np.ndarray | None:
    """(corpus.POSITIONS, vocab) float16 log-probabilities, memory-mapped; None when not computed."""
    path = distributions_file(model_path)
    return np.load(path, mmap_mode="r") if path.exists() else None


def save_distributions(model_path: str, chunks) -> np.ndarray:
    """Write the reference's log-probabilities chunk by chunk (one window's rows at a time, never
    the whole array in memory) and return them memory-mapped."""
    def write(tmp: Path) -> None:
        out = None
        row = 0
        for chunk in chunks:
            if out is None:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                                shape=(corpus.POSITIONS, chunk.shape[1]))
            out[row:row + len(chunk)] = chunk
            row += len(chunk)
        out.flush()
        del out

    write_atomically(distributions_file(model_path), write)
    return distributions(model_path)


def leading_matches(tokens: Sequence[int], reference_tokens: Sequence[int]) -> int:
    """Leading tokens of `tokens` equal to `reference_tokens`: the one definition every check uses."""
    return next((i for i, (a, b) in enumerate(zip(tokens, reference_tokens)) if a != b),
                min(len(tokens), len(reference_tokens)))
