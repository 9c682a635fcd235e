"""The asynchronous streaming client: one /v1/completions request, every streamed chunk
timestamped on arrival. Nothing is tokenized here (that would delay the clock); `metrics` turns
the chunks into token counts afterwards with the model's own tokenizer.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Chunk:
    t_s: float  # since the request was sent
    text: str
    token_ids: list[int] | None = None  # when the server returns them


@dataclass
class RequestRecord:
    index: int
    prompt_index: int
    start_s: float = 0.0  # since the level began
    ok: bool = False
    error: str = ""
    chunks: list[Chunk] = field(default_factory=list)
    end_s: float = float("nan")  # since the request was sent: the stream's end
    usage: dict[str, Any] = field(default_factory=dict)
    finish_reason: str = ""

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)

    @property
    def token_ids(self) -> list[int] | None:
        if not self.chunks or any(c.token_ids is None for c in self.chunks if c.text):
            return None
        return [t for c in self.chunks for t in (c.token_ids or [])]


def parse_event(data: str) -> tuple[str, list[int] | None, dict[str, Any], str]:
    """(text, token ids or None, usage, finish_reason) of one `data:` payload."""
    msg = json.loads(data)
    if "error" in msg and not msg.get("choices"):
        raise RuntimeError(f"server error: {str(msg['error'])[:200]}")
    text, ids, finish = "", None, ""
    for choice in msg.get("choices") or []:
        text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
        if choice.get("token_ids") is not None:
            ids = (ids or []) + list(choice["token_ids"])
        finish = choice.get("finish_reason") or finish
    return text, ids, msg.get("usage") or {}, finish


async def stream_completion(client, url: str, body: dict[str, Any], record: RequestRecord, timeout_s: float,
                            headers: dict[str, str] | None = None) -> RequestRecord:
    """POST `body` with stream=True to url/v1/completions and fill `record`."""
    import httpx

    t0 = time.perf_counter()
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
                text, ids, usage, finish = parse_event(data)
                record.usage = usage or record.usage
                record.finish_reason = finish or record.finish_reason
                if text or ids:
                    record.chunks.append(Chunk(now, text, ids))
        record.end_s = time.perf_counter() - t0
        record.ok = bool(record.chunks)
        if not record.ok:  # e.g. tokens that are pieces of a UTF-8 character the server holds back
            record.error = f"the stream carried no text (finish_reason {record.finish_reason or 'none'})"
    except httpx.TimeoutException as e:
        record.error = f"timeout: no data for {timeout_s:g} s ({type(e).__name__})"
    except (httpx.HTTPError, RuntimeError, ValueError) as e:
        record.error = f"{type(e).__name__}: {str(e)[:200]}"
    return record
