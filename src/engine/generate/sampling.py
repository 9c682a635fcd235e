"""Host-side sampling, shared by every backend: equal logits give equal tokens everywhere."""

from __future__ import annotations

import numpy as np


class Sampler:
    """Greedy when temperature is 0; otherwise temperature, then top-k, then top-p (nucleus),
    drawn from a generator seeded once per generation."""

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        order = np.argsort(-z, kind="stable")
        if self.top_k > 0:
            order = order[: self.top_k]
        probs = np.exp(z[order] - z[order[0]])
        probs /= probs.sum()
        if self.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), self.top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(len(order), p=probs)])
