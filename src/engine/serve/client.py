"""The asynchronous streaming client: one /v1/completions request, every streamed chunk
timestamped on arrival. Nothing is tokenized here (that would delay the clock); `metrics` turns
the log into metrics afterwards.

It runs on aiohttp, as vLLM's client does. The client shares the host's cores with a local
server, so its CPU per chunk slows the server it measures: httpx took 0.95 ms of CPU per streamed
chunk against llama-server on the 2-core test host, aiohttp 0.42 ms (a bare asyncio socket 0.42
ms). Connections are kept alive, as vLLM's client keeps them (a connection per request put the
connects on the event loop between other streams' chunks: p99 ITL +6% against vLLM's client at
c=4 on the mock, +1.5% kept alive).

A chunk is every `data:` message with a non-empty `choices` list, text or not, as vLLM's client
(`vllm/benchmarks/lib/endpoint_request_func.py`) counts them; the server's `usage` and `timings`
(llama-server) are kept from whichever message carries them.
"""

from __future__ import annotations

import asyncio
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


STALE_RETRIES = 4  # a request sent into this many closed kept-alive connections in a row fails


def connector():
    """The session's connector: no connection limit (the load profile is the limit)."""
    import aiohttp

    return aiohttp.TCPConnector(limit=0)


async def _post(session, url: str, body: dict[str, Any], headers: dict[str, str] | None, timeout):
    """The response to the POST. llama-server closes a connection after each stream without saying
    so, and a request written into a kept-alive connection it closed fails before any response
    ("Can not write request body"; half of all requests at c=1): such a request goes again on the
    next connection (a fresh one once the closed ones are gone), as httpx and urllib3 retry it. Its
    clock keeps running from the first try."""
    import aiohttp

    for attempt in range(STALE_RETRIES + 1):
        try:
            return await session.post(url + "/v1/completions", json=body, headers=headers, timeout=timeout)
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
            if attempt == STALE_RETRIES:
                raise


async def stream_completion(session, url: str, body: dict[str, Any], record: RequestRecord, timeout_s: float,
                            headers: dict[str, str] | None = None, due: float | None = None) -> RequestRecord:
    """POST `body` with stream=True to url/v1/completions on an aiohttp session and fill `record`,
    its times counted from `due` (a perf_counter time: an open loop's scheduled send), else from
    the send. A chunk's time is that of the socket read that completed it."""
    import aiohttp

    sent = time.perf_counter()
    t0 = sent if due is None else min(due, sent)
    record.lag_s = sent - t0
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=timeout_s)
    try:
        async with await _post(session, url, body, headers, timeout) as response:
            if response.status != 200:
                detail = (await response.read()).decode("utf-8", "replace")
                raise RuntimeError(f"HTTP {response.status}: {detail.strip()[:200]}")
            await _read_events(response, record, t0)
        record.end_s = time.perf_counter() - t0
        record.ok = bool(record.chunks)
        if not record.ok:
            record.error = f"the stream carried no chunk (finish_reason {record.finish_reason or 'none'})"
    except asyncio.TimeoutError as e:  # aiohttp's read and connect timeouts are TimeoutErrors
        record.error = f"timeout: no data for {timeout_s:g} s ({type(e).__name__})"
    except (aiohttp.ClientError, RuntimeError, ValueError) as e:
        record.error = f"{type(e).__name__}: {str(e)[:200]}"
    return record


async def _read_events(response, record: RequestRecord, t0: float) -> None:
    """The `data:` lines of the stream, as each socket read brings them, until [DONE] or its end."""
    pending = b""
    async for data in response.content.iter_any():
        now = time.perf_counter() - t0
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return
            ev = parse_event(payload.decode("utf-8"))
            record.usage = ev.usage or record.usage
            record.timings = ev.timings or record.timings
            record.finish_reason = ev.finish_reason or record.finish_reason
            if ev.choices:
                record.chunks.append(Chunk(now, ev.text, ev.token_ids))
