"""A zero-delay OpenAI-compatible streaming server (stdlib only, run as a script), against which
`engine.serve.capacity` measures what the client itself can time.

    python mock.py --port P

Every /v1/completions request gets `max_tokens` one-word chunks as fast as the socket takes them,
then a usage message and [DONE]; GET answers the model list (the health check). The bytes of a
stream are made once per length, so the server costs far less per chunk than the client.
"""

import argparse
import asyncio
import functools
import json


def _event(payload: str) -> bytes:
    data = f"data: {payload}\n\n".encode()
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@functools.lru_cache(maxsize=16)
def _stream(n: int) -> bytes:
    chunks = [_event(json.dumps({"choices": [{"index": 0, "text": "w ", "finish_reason":
                                              "length" if i == n - 1 else None}]})) for i in range(n)]
    usage = _event(json.dumps({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": n,
                                                        "total_tokens": n + 1}}))
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + b"".join(chunks) + usage + _event("[DONE]") + b"0\r\n\r\n"


def _models() -> bytes:
    body = b'{"object": "list", "data": [{"id": "mock"}]}'
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:  # keep-alive: one request after another on the connection
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            body = json.loads(await reader.readexactly(length)) if length else {}
            writer.write(_models() if head.startswith(b"GET") else _stream(max(int(body.get("max_tokens") or 1), 1)))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _main(port: int) -> None:
    server = await asyncio.start_server(_serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    asyncio.run(_main(p.parse_args().port))
