"""The prompts of a `bench serve` run: no request gets a prompt an earlier request of the run used,
so a server's prefix cache never answers one level (or its warm-up) from another's prompts.

Seeded prompts come from a seed per (level, warm-up or measured, request); `--dataset` rows are
handed out in order, and once they run out a row is reused only behind a nonce prefix (`[#N] `),
counted per level. The same (level, request) gets the same prompt at every server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.errors import InputError
from engine.model.spec import ModelSpec
from engine.model.tokenizer import Tokenizer

NONCE_TOKENS = 8  # room the nonce prefix may add to a dataset prompt


@dataclass(frozen=True)
class Prompt:
    ids: list[int]  # what the server sees, as our tokenizer counts it
    text: str


def read_dataset(path: str) -> list[str]:
    try:
        lines = [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
        texts = [str(d["prompt"] if isinstance(d, dict) else d) for d in lines]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"--dataset {path}: need JSON lines with a \"prompt\" ({e})") from None
    if not texts:
        raise InputError(f"--dataset {path}: no prompts")
    return texts


class PromptSource:
    def __init__(self, spec: ModelSpec, tok: Tokenizer, prompt_tokens: int, seed: int, dataset: str = ""):
        self.spec, self.tok, self.prompt_tokens, self.seed = spec, tok, prompt_tokens, seed
        self.rows = read_dataset(dataset) if dataset else []
        self.row_ids = [tok.encode(t) for t in self.rows]
        self.cache: dict[tuple[int, bool, int], Prompt] = {}
        self.nonce_prefixed: dict[int, int] = {}  # level -> requests whose dataset row was reused

    @property
    def max_tokens(self) -> int:
        return max(map(len, self.row_ids)) + NONCE_TOKENS if self.rows else self.prompt_tokens

    def get(self, level: int, index: int, warmup: bool = False) -> Prompt:
        key = (level, warmup, index)
        if key not in self.cache:
            self.cache[key] = self._dataset(level) if self.rows else self._seeded(level, index, warmup)
        return self.cache[key]

    def _seeded(self, level: int, index: int, warmup: bool) -> Prompt:
        from engine.generate.prompts import seeded_prompt

        # one generator stream per (seed, level, warm-up, request): no two runs of nearby seeds share a
        # prompt (seed + index did: seed 3's request 0 was seed 1's request 2, served from a prefix cache)
        ids = seeded_prompt(self.spec, self.prompt_tokens, [self.seed & 0xFFFFFFFF, level, int(warmup), index])
        return Prompt(ids, self.tok.decode(ids))

    def _dataset(self, level: int) -> Prompt:
        used = len(self.cache)
        row = used % len(self.rows)
        if used < len(self.rows):
            return Prompt(self.row_ids[row], self.rows[row])
        self.nonce_prefixed[level] = self.nonce_prefixed.get(level, 0) + 1
        text = f"[#{used}] {self.rows[row]}"
        return Prompt(self.tok.encode(text), text)
