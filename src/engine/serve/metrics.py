"""Serving metrics from the request log, by named definitions (docs/results-schema.md states each
formula with its source).

A request's log (kept whole in the JSONL): the arrival time of every chunk (a message with a
non-empty `choices` list) and its text, the stream's end, the server's `usage` and `timings`, and
two output-token counts: the server's (`usage.completion_tokens`) and the client's (the ids the
server returned, else the model tokenizer on the text, without special tokens).

`vllm` (the default) follows `vllm bench serve` (vllm/benchmarks/serve.py `calculate_metrics`,
timing in vllm/benchmarks/lib/endpoint_request_func.py): TTFT = first chunk, E2EL = last chunk,
ITL = gaps between consecutive chunks, TPOT = (E2EL - TTFT) / (n - 1) with n the server's count
when reported, else the client's. `guidellm`, `aiperf` and `mlperf` compute those tools' own
definitions from the same log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from engine.measure.reference import leading_matches
from engine.serve.client import RequestRecord

PERCENTILES = (50, 90, 99)
# a server that leaves the reference where the reference's own top two logits are this close took a
# near tie (lower-precision arithmetic, as llama.cpp's 8-bit activations): not a divergence
NEAR_TIE_NATS = 0.5
DEFINITIONS = ("vllm", "guidellm", "aiperf", "mlperf")


@dataclass(frozen=True)
class Slo:
    ttft_s: float = math.nan
    tpot_s: float = math.nan
    e2el_s: float = math.nan

    @property
    def empty(self) -> bool:
        return all(math.isnan(v) for v in (self.ttft_s, self.tpot_s, self.e2el_s))

    def met(self, m: dict[str, Any]) -> bool:
        """vLLM's goodput test: every limit >= the request's value; TPOT counts 0 below 2 tokens."""
        values = {"ttft_s": m["ttft_s"], "tpot_s": m["tpot_s"] or 0.0, "e2el_s": m["e2el_s"]}
        return all(math.isnan(limit) or values[k] <= limit
                   for k, limit in (("ttft_s", self.ttft_s), ("tpot_s", self.tpot_s), ("e2el_s", self.e2el_s)))


def client_token_count(rec: RequestRecord, count_text: Callable[[str], int]) -> int:
    ids = rec.token_ids
    return len(ids) if ids is not None else count_text(rec.text)


def cached_prompt_tokens(rec: RequestRecord) -> int | None:
    """Prompt tokens the server took from its cache: llama-server `timings.cache_n`, vLLM/OpenAI
    `usage.prompt_tokens_details.cached_tokens`; None where the server does not say."""
    if "cache_n" in rec.timings:
        return int(rec.timings["cache_n"])
    details = rec.usage.get("prompt_tokens_details") or {}
    return int(details["cached_tokens"]) if details.get("cached_tokens") is not None else None


def as_streamed(text: str, expected: str) -> str:
    """`expected` (decoded reference tokens) as a server streaming `text` shows it: when that text
    starts without whitespace, without its leading whitespace too (mlx-lm's streaming detokenizer
    strips the first token's leading space)."""
    return expected if text[:1].isspace() else expected.lstrip()


def leading_text_matches(text: str, reference: Sequence[int], decode) -> int:
    """Leading reference tokens whose decoded text is a prefix of what the server streamed."""
    for k in range(len(reference) + 1):
        if not text.startswith(as_streamed(text, decode(reference[:k]))):
            return k - 1
    return len(reference)


def request_sample(rec: RequestRecord, count_text: Callable[[str], int], decode,
                   reference: Sequence[int] | None) -> dict[str, Any]:
    """One request as the JSONL keeps it: its whole log, and its metrics by vLLM's definitions."""
    server = rec.usage.get("completion_tokens")
    out: dict[str, Any] = {
        "index": rec.index, "prompt_index": rec.prompt_index, "start_s": rec.start_s, "send_lag_s": rec.lag_s,
        "ok": rec.ok,
        "error": rec.error, "chunk_t_s": [c.t_s for c in rec.chunks], "chunk_text": [c.text for c in rec.chunks],
        "end_s": rec.end_s, "usage": rec.usage, "timings": rec.timings, "finish_reason": rec.finish_reason,
        "server_tokens": int(server) if server else None, "client_tokens": client_token_count(rec, count_text),
        "cached_prompt_tokens": cached_prompt_tokens(rec), "match_tokens": -1, "text": rec.text,
        "token_ids": rec.token_ids}
    out.update(request_metrics(out, "vllm") if rec.ok else
               {"ttft_s": None, "tpot_s": None, "e2el_s": None, "itl_s": [], "output_tokens": 0})
    ids = rec.token_ids
    if reference is not None and rec.ok and (ids is not None or rec.text):  # no text: nothing to check
        out["match_tokens"] = (leading_matches(ids, list(reference)) if ids is not None
                               else leading_text_matches(rec.text, reference, decode))
        out["reference_tokens"] = len(reference)
    return out


def reference_answer(tokens: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """The reference's greedy tokens up to its first end-of-sequence token, the part a server's
    output is checked against: past it, servers asked to ignore EOS differ (llama-server forbids
    the token and takes the runner-up, 2.1 nats below it in one SmolLM2 request; vLLM, like the
    reference, emits it and goes on), so what follows is no answer to compare."""
    stop = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
    return list(tokens[:stop])


def _gaps(t: Sequence[float]) -> list[float]:
    return [b - a for a, b in zip(t, t[1:])]


def request_metrics(s: dict[str, Any], definition: str = "vllm") -> dict[str, Any]:
    """TTFT, TPOT, ITL (a list), E2EL and the output-token count n of one successful request's log."""
    t, server, client = s["chunk_t_s"], s["server_tokens"], s["client_tokens"]
    if definition == "guidellm":  # usage, else one token per chunk; TPOT includes TTFT; ITL per request
        n = server or len(t)
        itl = [(t[-1] - t[0]) / (n - 1)] if n > 1 else []
        return {"ttft_s": t[0], "e2el_s": s["end_s"], "tpot_s": t[-1] / n if n else None, "itl_s": itl,
                "output_tokens": n}
    if definition == "aiperf":  # client-side token count; TTFT to the first chunk with content
        n = client
        content = [x for x, text in zip(t, s["chunk_text"]) if text] or t
        per_token = (s["end_s"] - content[0]) / (n - 1) if n > 1 else None
        return {"ttft_s": content[0], "e2el_s": s["end_s"], "tpot_s": per_token,
                "itl_s": [per_token] if per_token is not None else [], "output_tokens": n}
    n = server or client
    if definition == "mlperf":  # the SUT's count; latency to the response's completion; no ITL
        return {"ttft_s": t[0], "e2el_s": s["end_s"], "itl_s": [], "output_tokens": n,
                "tpot_s": (s["end_s"] - t[0]) / (n - 1) if n > 1 else None}
    return {"ttft_s": t[0], "e2el_s": t[-1], "itl_s": _gaps(t), "output_tokens": n,
            "tpot_s": (t[-1] - t[0]) / (n - 1) if n > 1 else None}


def _percentile(values: Sequence[float], q: float, definition: str) -> float:
    if not len(values):
        return math.nan
    if definition == "mlperf":  # loadgen results.cc: sorted[floor(count * p)], no interpolation
        return float(sorted(values)[min(int(len(values) * q / 100), len(values) - 1)])
    return float(np.percentile(values, q))


def _distributions(metrics: list[dict[str, Any]], definition: str) -> dict[str, float]:
    series = {"ttft": [m["ttft_s"] for m in metrics], "e2el": [m["e2el_s"] for m in metrics],
              "tpot": [m["tpot_s"] for m in metrics if m["tpot_s"] is not None],
              "itl": [x for m in metrics for x in m["itl_s"]]}
    f: dict[str, float] = {}
    for name, values in series.items():
        f[f"{name}_mean_s"] = float(np.mean(values)) if values else math.nan
        for q in PERCENTILES:
            f[f"{name}_p{q}_s"] = _percentile(values, q, definition)
    return f


def level_fields(samples: list[dict[str, Any]], duration_s: float, gen_tokens: int, slo: Slo,
                 definition: str = "vllm", not_sent: int = 0) -> dict[str, Any]:
    """The ServeResult fields of one level from its request logs; failed and unsent requests
    count in goodput's denominator."""
    ok = [s for s in samples if s["ok"]]
    metrics = [request_metrics(s, definition) for s in ok]
    rate = (lambda k: k / duration_s if duration_s > 0 else math.nan)  # noqa: E731
    out_tokens = sum(m["output_tokens"] for m in metrics)
    completed = len(ok) - 1 if definition == "mlperf" else len(ok)  # results.cc: (samples - 1) / time
    cached = [s["cached_prompt_tokens"] for s in ok if s["cached_prompt_tokens"] is not None]
    lags = [s.get("send_lag_s", 0.0) for s in samples]
    f: dict[str, Any] = {
        "metrics_definition": definition, "requests_ok": len(ok), "requests_failed": len(samples) - len(ok),
        "requests_not_sent": not_sent, "duration_s": duration_s,
        "request_throughput_rps": rate(max(completed, 0)), "output_tps": rate(out_tokens),
        "output_tokens_total": out_tokens, "output_tokens_mean": out_tokens / len(ok) if ok else math.nan,
        "output_tokens_client_total": sum(s["client_tokens"] for s in ok),
        "usage_completion_tokens_total": sum(s["server_tokens"] or 0 for s in ok),
        "input_tokens_total": sum(int(s["usage"].get("prompt_tokens") or 0) for s in ok),
        "cached_prompt_tokens_total": sum(cached) if cached else -1,
        "send_lag_mean_s": float(np.mean(lags)) if lags else math.nan, "send_lag_max_s": max(lags, default=math.nan),
        "short_requests": sum((s["server_tokens"] or s["client_tokens"]) < gen_tokens for s in ok),
        **_distributions(metrics, definition)}
    if not slo.empty:
        good = sum(slo.met(m) for m in metrics)
        f.update(slo_ttft_s=slo.ttft_s, slo_tpot_s=slo.tpot_s, slo_e2el_s=slo.e2el_s, goodput_rps=rate(good),
                 goodput_frac=good / (len(samples) + not_sent) if samples or not_sent else math.nan)
    checked = [s for s in ok if s["match_tokens"] >= 0]
    if checked:
        # the reference's answer is gen_tokens long, or shorter where it reached its EOS
        left = [s for s in checked if s["match_tokens"] < min(s["client_tokens"], s["reference_tokens"])]
        near = [s for s in left if s.get("divergence_gap", math.inf) < NEAR_TIE_NATS]
        f.update(checked_requests=len(checked), match_tokens=min(s["match_tokens"] for s in checked),
                 near_tie_requests=len(near), diverged_requests=len(left) - len(near))
    return f


def server_token_at(rec: RequestRecord, reference: Sequence[int], k: int, tok) -> int | None:
    """The server's token where it left the reference (after `k` equal tokens): its id where it
    returned ids, else the first token of its text beyond the reference's first k, as the model's
    tokenizer reads it; None when nothing follows."""
    ids = rec.token_ids
    if ids is not None:
        return ids[k] if k < len(ids) else None
    text = rec.text
    rest = text[len(as_streamed(text, tok.decode(list(reference[:k])))):]
    following = tok.encode(rest, add_bos=False) if rest else []
    return following[0] if following else None


def parse_slo(text: str) -> Slo:
    """`ttft_ms=500,tpot_ms=50,e2el_ms=5000` (any subset)."""
    from engine.errors import InputError

    values: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in ("ttft_ms", "tpot_ms", "e2el_ms"):
            raise InputError(f"--slo takes ttft_ms=..,tpot_ms=..,e2el_ms=.., got {part!r}")
        try:
            values[key.removesuffix("_ms") + "_s"] = float(value) / 1e3
        except ValueError:
            raise InputError(f"--slo {key}: not a number ({value!r})") from None
    return Slo(**values)
