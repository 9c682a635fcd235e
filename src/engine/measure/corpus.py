"""The natural-text corpus fidelity is measured on, and the windows of it every mode is fed.

The files of `corpus/` (licences in its README) are joined in name order. A model's tokens of it
are cut into `N_WINDOWS` windows of `WINDOW` tokens spread evenly over the text (so every language
and the code get some), each starting with BOS where the model's files ask for one, as
llama-perplexity replaces a chunk's first token with BOS. As in llama-perplexity, a window is
scored on its second half: the positions after its first `WINDOW // 2` tokens, each predicting
the next corpus token from at least half a window of real text before it.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import resources
from typing import Sequence

from engine.errors import InputError
from engine.model.spec import ModelSpec
from engine.model.tokenizer import Tokenizer

WINDOW = 64  # tokens of one window (llama-perplexity's n_ctx): fits the default cell's 32 + 32 positions
N_WINDOWS = 17  # 17 x 31 = 527 scored positions
FIRST_SCORED = WINDOW // 2  # llama-perplexity's `first`: logits at positions first..WINDOW-2 are scored
SCORED_PER_WINDOW = WINDOW - 1 - FIRST_SCORED
POSITIONS = N_WINDOWS * SCORED_PER_WINDOW
TEXT_PROMPT_TOKENS = 32  # the greedy check's prompt: the first tokens of the first window


@lru_cache(maxsize=1)
def corpus_text() -> str:
    folder = resources.files("engine.measure") / "corpus"
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".txt"))
    return "\n\n".join(folder.joinpath(n).read_text(encoding="utf-8").strip() for n in names)


def corpus_sha() -> str:
    return hashlib.sha256(corpus_text().encode()).hexdigest()[:16]


@lru_cache(maxsize=4)
def windows(spec: ModelSpec) -> tuple[tuple[int, ...], ...]:
    """`N_WINDOWS` non-overlapping windows of `WINDOW` corpus tokens, evenly spaced over the text."""
    tok = Tokenizer.from_spec(spec)
    ids = tok.encode(corpus_text(), add_bos=False)
    if len(ids) < N_WINDOWS * WINDOW:
        raise InputError(f"the fidelity corpus is {len(ids)} tokens for {spec.name}; it needs {N_WINDOWS * WINDOW}")
    step = (len(ids) - WINDOW) / (N_WINDOWS - 1)
    out = []
    for i in range(N_WINDOWS):
        w = ids[round(i * step):round(i * step) + WINDOW]
        if tok.add_bos and tok.bos_id is not None:
            w = [tok.bos_id, *w[1:]]
        out.append(tuple(w))
    return tuple(out)


def targets(window: Sequence[int]) -> list[int]:
    """The tokens a window's scored positions predict."""
    return list(window[FIRST_SCORED + 1:])


def text_prompt(spec: ModelSpec) -> list[int]:
    """The prompt of the greedy check: real text, the first tokens of the first window."""
    return list(windows(spec)[0][:TEXT_PROMPT_TOKENS])
