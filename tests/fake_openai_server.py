"""A fake OpenAI-compatible streaming server for tests/test_serve.py, started as a real process.

    python fake_openai_server.py --port P [--mode ok|exit|die-after|hang|no-health] [--ttft S] [--itl S]
        [--tokens N] [--after K] [--child]

It streams N words (`w0 w1 ...`), the first after --ttft seconds and each next one --itl later;
words 2 and 3 arrive in one chunk (a chunk that carries two tokens). Modes: `exit` exits at once
with an error message, `die-after` SIGKILLs itself while streaming request K+1, `hang` accepts
requests and never answers, `no-health` never answers its health check. --child spawns a
grandchild (a sleeper) so a test can see the whole process group go.
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
lock = threading.Lock()


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
        global served
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with lock:
            served += 1
            nth = served
        if args.mode == "hang":
            time.sleep(3600)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        n = min(args.tokens, int(body.get("max_tokens") or args.tokens))
        words = [f"w{i} " for i in range(n)]
        chunks = [words[0], words[1], words[2] + words[3], *words[4:]] if n >= 4 else words
        time.sleep(args.ttft)
        for i, text in enumerate(chunks):
            if i:
                time.sleep(args.itl * (2 if i == 2 and n >= 4 else 1))  # the 2-token chunk comes one ITL later
            if args.mode == "die-after" and nth > args.after and i == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            self.send_event(json.dumps({"choices": [{"index": 0, "text": text, "finish_reason": None}]}))
        usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": n + 7}
        self.send_event(json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": "length"}], "usage": usage}))
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
    p.add_argument("--after", type=int, default=2)
    p.add_argument("--child", action="store_true")
    args = p.parse_args()
    if args.mode == "exit":
        print("fake server: cannot load the model (test fault)", file=sys.stderr)
        sys.exit(3)
    if args.child:
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
