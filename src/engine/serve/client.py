"""The asynchronous streaming client: one /v1/completions request, every streamed chunk
timestamped on arrival. Nothing is tokenized here (that would delay the clock); `metrics` turns
the log into metrics afterwards.

A chunk is every `data:` message with a non-empty `choices` list, text or not, as vLLM's client
(`vllm/benchmarks/lib/endpoint_request_func.py`) counts them; the server's `usage` and `timings`
(llama-server) are kept from whichever message carries them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Chunk:
    t_s: float  # since the request was due (its scheduled send time; closed loop: its send)
    text: str
    token_ids: list[int] | None = None  # when the server returns them


@dataclass
class RequestRecord:
    index: int
    prompt_index: int
    start_s: float = 0.0  # since the level began: when the request was due
    lag_s: float = 0.0  # the client's own lag: actual send - due (0 in a closed loop, which sends when due)
    ok: bool = False
    error: str = ""
    chunks: list[Chunk] = field(default_factory=list)
    end_s: float = float("nan")  # since the request was due: the stream's end
    usage: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)  # llama-server's per-response timings
    finish_reason: str = ""

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)

    @property
    def token_ids(self) -> list[int] | None:
        carried = [c.token_ids is not None for c in self.chunks]
        if not any(carried) or any(not has and c.text for has, c in zip(carried, self.chunks)):
            return None
        return [t for c in self.chunks for t in (c.token_ids or [])]


@dataclass
class Event:
    """One `data:` payload."""

    choices: bool  # a non-empty `choices` list: a chunk by vLLM's count
    text: str = ""
    token_ids: list[int] | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    finish_reason: str = ""


def parse_event(data: str) -> Event:
    msg = json.loads(data)
    if "error" in msg and not msg.get("choices"):
        raise RuntimeError(f"server error: {str(msg['error'])[:200]}")
    ev = Event(bool(msg.get("choices")), usage=msg.get("usage") or {}, timings=msg.get("timings") or {})
    for choice in msg.get("choices") or []:
        ev.text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
        if choice.get("token_ids") is not None:
            ev.token_ids = (ev.token_ids or []) + list(choice["token_ids"])
        ev.finish_reason = choice.get("finish_reason") or ev.finish_reason
    return ev


async def stream_completion(client, url: str, body: dict[str, Any], record: RequestRecord, timeout_s: float,
                            headers: dict[str, str] | None = None, due: float | None = None) -> RequestRecord:
    """POST `body` with stream=True to url/v1/completions and fill `record`, its times counted
    from `due` (a perf_counter time: an open loop's scheduled send), else from the send."""
    import httpx

    sent = time.perf_counter()
    t0 = sent if due is None else min(due, sent)
    record.lag_s = sent - t0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=headers,
                                 timeout=httpx.Timeout(timeout_s, connect=10.0)) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode("utf-8", "replace")
                raise RuntimeError(f"HTTP {response.status_code}: {detail.strip()[:200]}")
            async for line in response.aiter_lines():
                now = time.perf_counter() - t0
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                ev = parse_event(data)
                record.usage = ev.usage or record.usage
                record.timings = ev.timings or record.timings
                record.finish_reason = ev.finish_reason or record.finish_reason
                if ev.choices:
                    record.chunks.append(Chunk(now, ev.text, ev.token_ids))
        record.end_s = time.perf_counter() - t0
        record.ok = bool(record.chunks)
        if not record.ok:
            record.error = f"the stream carried no chunk (finish_reason {record.finish_reason or 'none'})"
    except httpx.TimeoutException as e:
        record.error = f"timeout: no data for {timeout_s:g} s ({type(e).__name__})"
    except (httpx.HTTPError, RuntimeError, ValueError) as e:
        record.error = f"{type(e).__name__}: {str(e)[:200]}"
    return record
