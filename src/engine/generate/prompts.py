"""The prompt a cell runs: given text, or a fixed number of tokens from a seeded stream."""

from __future__ import annotations

import numpy as np

from engine.errors import InputError
from engine.model.spec import ModelSpec
from engine.model.tokenizer import CONTROL, USER_DEFINED, Tokenizer


def seeded_prompt(spec: ModelSpec, n_tokens: int, seed: int | list[int]) -> list[int]:
    """`n_tokens` ordinary token ids (no control tokens) drawn from a generator seeded with `seed`:
    the same ids for every framework and every run of the cell. A file that asks for BOS
    (`tokenizer.ggml.add_bos_token`, Gemma's and SentencePiece files) gets it as the first of them."""
    if n_tokens < 1:
        raise InputError(f"prompt_tokens must be at least 1, got {n_tokens}")
    types = spec.field("tokenizer.ggml.token_type")
    vocab = spec.config.vocab_size
    ordinary = np.arange(vocab) if types is None else np.flatnonzero(
        ~np.isin(np.asarray(types[:vocab]), (CONTROL, USER_DEFINED)))
    ids = [int(t) for t in np.random.default_rng(seed).choice(ordinary, size=n_tokens)]
    bos = spec.field("tokenizer.ggml.bos_token_id")
    default_bos = spec.field("tokenizer.ggml.model") == "llama"
    if bos is not None and bool(spec.field("tokenizer.ggml.add_bos_token", default_bos)):
        ids = [int(bos), *ids[:-1]]
    return ids


def prompt_ids(spec: ModelSpec, n_tokens: int, text: str, seed: int) -> list[int]:
    if text:
        ids = Tokenizer.from_spec(spec).encode(text)
        if not ids:
            raise InputError("--prompt encodes to no tokens")
        return ids
    return seeded_prompt(spec, n_tokens, seed)
