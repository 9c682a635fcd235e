"""Per-request and per-level serving metrics from the client's timestamped chunks.

Tokens are counted with the model's own tokenizer (or taken from the ids the server returned):
a chunk carrying k tokens counts as k tokens at the chunk's time. Definitions (in the schema):
TTFT: request sent until the first chunk carrying a token; ITL: gaps between consecutive tokens
(0 for the extra tokens of a multi-token chunk); TPOT: (last token - first token) / (tokens - 1);
E2EL: request sent until the stream ended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from engine.measure.stats import percentile
from engine.serve.client import RequestRecord

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Slo:
    ttft_s: float = math.nan
    tpot_s: float = math.nan
    e2el_s: float = math.nan

    def met(self, sample: dict[str, Any]) -> bool:
        return all(math.isnan(limit) or (sample[k] is not None and sample[k] <= limit)
                   for k, limit in (("ttft_s", self.ttft_s), ("tpot_s", self.tpot_s), ("e2el_s", self.e2el_s)))


def chunk_token_counts(rec: RequestRecord, encode) -> list[int]:
    """Tokens each chunk carried: the server's ids where it sent them, else the growth of the
    model tokenizer's count of the text so far (never negative)."""
    if rec.token_ids is not None:
        return [len(c.token_ids or []) for c in rec.chunks]
    counts, seen, text = [], 0, ""
    for c in rec.chunks:
        text += c.text
        n = max(seen, len(encode(text)))
        counts.append(n - seen)
        seen = n
    return counts


def leading_text_matches(text: str, reference: Sequence[int], decode) -> int:
    """Leading reference tokens whose decoded text is a prefix of what the server streamed. When
    the server's text starts without whitespace, the reference's leading whitespace is dropped
    too: mlx-lm's streaming detokenizer strips the first token's leading space."""
    strip = not text[:1].isspace()
    for k in range(len(reference) + 1):
        expected = decode(reference[:k])
        if not text.startswith(expected.lstrip() if strip else expected):
            return k - 1
    return len(reference)


def request_sample(rec: RequestRecord, encode, decode, reference: Sequence[int] | None) -> dict[str, Any]:
    """One request as the JSONL keeps it, with its metrics."""
    out: dict[str, Any] = {"index": rec.index, "prompt_index": rec.prompt_index, "start_s": rec.start_s,
                           "ok": rec.ok, "error": rec.error, "ttft_s": None, "tpot_s": None, "e2el_s": None,
                           "itl_s": [], "output_tokens": 0, "usage": rec.usage, "finish_reason": rec.finish_reason,
                           "match_tokens": -1, "text": rec.text, "token_ids": rec.token_ids}
    if not rec.ok:
        return out
    counts = chunk_token_counts(rec, encode)
    times = [c.t_s for c, k in zip(rec.chunks, counts) for _ in range(k)]
    if not times:
        out.update(ok=False, error="no tokens in the streamed text")
        return out
    itl = [b - a for a, b in zip(times, times[1:])]
    out.update(ttft_s=times[0], e2el_s=rec.end_s, itl_s=itl, output_tokens=len(times),
               tpot_s=(times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None)
    if reference is not None:
        ids = rec.token_ids
        out["match_tokens"] = (next((i for i, (a, b) in enumerate(zip(ids, reference)) if a != b),
                                    min(len(ids), len(reference))) if ids is not None
                               else leading_text_matches(rec.text, reference, decode))
    return out


def level_fields(samples: list[dict[str, Any]], duration_s: float, gen_tokens: int, slo: Slo) -> dict[str, Any]:
    """The ServeResult fields of one level from its request samples."""
    ok = [s for s in samples if s["ok"]]
    f: dict[str, Any] = {"requests_ok": len(ok), "requests_failed": len(samples) - len(ok),
                         "duration_s": duration_s}
    out_tokens = sum(s["output_tokens"] for s in ok)
    f.update(request_throughput_rps=len(ok) / duration_s if duration_s > 0 else math.nan,
             output_tps=out_tokens / duration_s if duration_s > 0 else math.nan,
             output_tokens_total=out_tokens, output_tokens_mean=out_tokens / len(ok) if ok else math.nan,
             input_tokens_total=sum(int(s["usage"].get("prompt_tokens") or 0) for s in ok),
             usage_completion_tokens_total=sum(int(s["usage"].get("completion_tokens") or 0) for s in ok))
    series = {"ttft": [s["ttft_s"] for s in ok], "tpot": [s["tpot_s"] for s in ok if s["tpot_s"] is not None],
              "itl": [x for s in ok for x in s["itl_s"]], "e2el": [s["e2el_s"] for s in ok]}
    for name, values in series.items():
        for q in PERCENTILES:
            f[f"{name}_p{q}_s"] = percentile(values, q)
    if not all(math.isnan(v) for v in (slo.ttft_s, slo.tpot_s, slo.e2el_s)):
        good = sum(slo.met(s) for s in ok)
        f.update(slo_ttft_s=slo.ttft_s, slo_tpot_s=slo.tpot_s, slo_e2el_s=slo.e2el_s,
                 goodput_rps=good / duration_s if duration_s > 0 else math.nan,
                 goodput_frac=good / len(samples) if samples else math.nan)
    checked = [s for s in ok if s["match_tokens"] >= 0]
    if checked:
        f.update(checked_requests=len(checked), match_tokens=min(s["match_tokens"] for s in checked),
                 diverged_requests=sum(s["match_tokens"] < min(gen_tokens, s["output_tokens"]) for s in checked))
    return f


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
