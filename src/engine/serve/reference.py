"""The numpy reference as `bench serve` checks a server against it: greedy tokens per prompt from
the one reference cache (engine.measure.reference), and the reference's logit gap where a server
left them. The reference loads only for prompts it has not answered, and for gaps."""

from __future__ import annotations

from engine.model.spec import ModelSpec


class Reference:
    """Greedy tokens of the numpy reference, per prompt ids, from the one reference cache
    (engine.measure.reference); the reference loads here only for prompts it has not answered."""

    def __init__(self, spec: ModelSpec, gen_tokens: int, max_prompt: int):
        self.spec, self.gen_tokens = spec, gen_tokens
        self.max_seq_len = max_prompt + gen_tokens + 8
        self.backend = None

    def tokens(self, ids: list[int]) -> list[int]:
        from engine.measure.reference import greedy_tokens

        return greedy_tokens(self.spec.path, ids, self.gen_tokens, self._open)

    def gap(self, ids: list[int], token: int) -> float:
        """How far `token` lies below the reference's own choice after `ids`, in logits (nats)."""
        backend = self._open()
        backend.reset()
        logits = backend.prefill(list(ids))
        backend.reset()
        return float(logits.max() - logits[token])

    def _open(self):
        if self.backend is None:
            import backends

            self.backend = backends.open_backend(backends.reference().name, self.spec,
                                                 max_seq_len=self.max_seq_len).backend
        return self.backend
