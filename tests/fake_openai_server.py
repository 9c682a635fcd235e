"""A fake OpenAI-compatible streaming server for tests/test_serve.py, started as a real process.

    python fake_openai_server.py --port P [--mode ok|exit|die-after|hang|no-health] [--ttft S] [--itl S]
        [--tokens N] [--chunk-tokens K] [--no-usage] [--cache-n C] [--slowdown F] [--after K] [--child]
        [--eos-at E]

It streams N words (`w0 w1 ...`, fewer when max_tokens asks for fewer) in chunks of K words as
vLLM's server does: the first chunk --ttft seconds after the request arrived, chunk i at
--ttft + i x --itl (sleeping until each deadline, so no delay accumulates: every client sees the
same schedule, whatever its own pace), the last one carrying finish_reason, then a message with `"choices": []` and the usage (unless --no-usage).
With --cache-n the last chunk carries llama-server's `timings` (cache_n C). --slowdown F makes
TTFT and ITL grow with the requests in flight (x (1 + F (in_flight - 1))), for --find-max tests.
--eos-at E ends every stream after E words with finish_reason `stop` (the model's EOS) unless the
request sends `ignore_eos: true`.
Modes: `exit` exits at once with an error message, `die-after` SIGKILLs itself while streaming
request K+1, `hang` accepts requests and never answers, `no-health` never answers its health
check. --child spawns a grandchild (a sleeper) so a test can see the whole process group go.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

args = None
served = 0
in_flight = 0
lock = threading.Lock()


def sleep_until(deadline):
    time.sleep(max(deadline - time.perf_counter(), 0.0))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        if args.mode == "no-health":
            time.sleep(3600)
        body = json.dumps({"object": "list", "data": [{"id": "fake"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_event(self, payload):
        data = f"data: {payload}\n\n".encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def do_POST(self):
        global served, in_flight
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        arrived = time.perf_counter()
        with lock:
            served += 1
            in_flight += 1
            nth, load = served, 1 + args.slowdown * (in_flight - 1)
        self.stream(body, nth, load, arrived)

    def done(self):  # before the last bytes go out: a client's next request never sees this one in flight
        global in_flight
        with lock:
            in_flight -= 1

    def stream(self, body, nth, load, arrived):
        if args.mode == "hang":
            time.sleep(3600)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        n = min(args.tokens, int(body.get("max_tokens") or args.tokens))
        eos = 0 < args.eos_at < n and not body.get("ignore_eos")
        n = args.eos_at if eos else n
        words = [f"w{i} " for i in range(n)]
        chunks = ["".join(words[i:i + args.chunk_tokens]) for i in range(0, n, args.chunk_tokens)]
        prompt = body.get("prompt")
        prompt_n = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
        events = []  # made before the first deadline: nothing but the writes runs on the schedule
        for i, text in enumerate(chunks):
            last = i == len(chunks) - 1
            msg = {"choices": [{"index": 0, "text": text, "finish_reason": ("stop" if eos else "length") if last else None}]}
            if last and args.cache_n >= 0:
                msg["timings"] = {"cache_n": args.cache_n, "prompt_n": prompt_n - args.cache_n, "predicted_n": n}
            events.append(json.dumps(msg))
        for i, event in enumerate(events):
            sleep_until(arrived + (args.ttft + i * args.itl) * load)
            if args.mode == "die-after" and nth > args.after and i == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            self.send_event(event)
        self.done()
        if not args.no_usage:
            usage = {"prompt_tokens": prompt_n, "completion_tokens": n, "total_tokens": n + prompt_n}
            self.send_event(json.dumps({"choices": [], "usage": usage}))
        self.send_event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def main():
    global args
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", default="ok")
    p.add_argument("--ttft", type=float, default=0.2)
    p.add_argument("--itl", type=float, default=0.05)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--chunk-tokens", type=int, default=1)
    p.add_argument("--no-usage", action="store_true")
    p.add_argument("--cache-n", type=int, default=-1)
    p.add_argument("--slowdown", type=float, default=0.0)
    p.add_argument("--after", type=int, default=2)
    p.add_argument("--eos-at", type=int, default=0)
    p.add_argument("--child", action="store_true")
    args = p.parse_args()
    sys.setswitchinterval(1e-4)  # a thread due to write waits at most this long for the GIL (default 5 ms)
    if args.mode == "exit":
        print("fake server: cannot load the model (test fault)", file=sys.stderr)
        sys.exit(3)
    if args.child:
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
