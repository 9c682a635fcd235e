"""ManagedServer: one server process on a free localhost port, health-checked before use and
stopped with its whole process group: at `stop()`, at exit, on SIGTERM/SIGHUP, and (through the
kernel's parent-death signal) when the harness itself is killed.

The command line is a template: `{host}` and `{port}` are filled in at start. Output goes to a
log file whose last lines explain a failure.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Sequence

from engine.parent_death import PREEXEC

HOST = "127.0.0.1"
LOG_TAIL_LINES = 8
UNWIND_DEADLINE_S = 15.0  # after SIGTERM/SIGHUP, the most the process may take to exit on its own
_LIVE: dict[int, "ManagedServer"] = {}  # pid -> server, for the exit and signal handlers


class ServerFailed(Exception):
    """A server that did not come up: `status` is crash (it exited) or timeout (never healthy)."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ManagedServer:
    def __init__(self, name: str, argv: Sequence[str], log_path: str | os.PathLike, health_path: str = "/v1/models",
                 env: dict[str, str] | None = None, headers: dict[str, str] | None = None):
        self.name, self.template, self.health_path = name, list(argv), health_path
        self.log_path, self.env, self.headers = Path(log_path), env, headers or {}
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.startup_s = float("nan")

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def argv(self) -> list[str]:
        return [a.replace("{host}", HOST).replace("{port}", str(self.port)) for a in self.template]

    def start(self, timeout_s: float) -> float:
        """Start and wait until the health URL answers 200; the start-up time in seconds."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True,
                                         preexec_fn=PREEXEC)
        _LIVE[self.proc.pid] = self
        _install_handlers()
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise ServerFailed("crash", f"{self.name} exited with code {code} during start-up: {self.log_tail()}")
            if self.healthy(timeout_s=2.0):
                self.startup_s = time.monotonic() - t0
                return self.startup_s
            if time.monotonic() - t0 > timeout_s:
                self.stop()
                raise ServerFailed("timeout", f"{self.name} not healthy after {timeout_s:g} s; killed: {self.log_tail()}")
            time.sleep(0.25)

    def healthy(self, timeout_s: float = 2.0) -> bool:
        import httpx

        try:
            return httpx.get(self.url + self.health_path, timeout=timeout_s, headers=self.headers).status_code == 200
        except httpx.HTTPError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_reason(self) -> str:
        if self.proc is None or self.proc.poll() is None:
            return ""
        code = self.proc.returncode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        return f"{self.name} {how}: {self.log_tail()}"

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after `grace_s`, reap the child."""
        proc = self.proc
        if proc is None:
            return
        _LIVE.pop(proc.pid, None)
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc.pid, signal.SIGKILL)  # grandchildren that outlived the leader, too
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        _wait_group_gone(proc.pid, timeout_s=5.0)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_bytes()[-16384:].decode("utf-8", "replace")
        except OSError:
            return ""
        kept = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return " | ".join(kept[-lines:])[-800:]


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    """A SIGKILLed grandchild is torn down by the kernel after the signal: return once no live
    (non-zombie) process is left in the group, or the time is up, so `stop()` means nothing of the
    server runs any more."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_in_group(p, pgid) for p in psutil.process_iter()):
        time.sleep(0.02)


def _in_group(p, pgid: int) -> bool:
    import psutil

    try:
        return os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, OSError):
        return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all() -> None:
    for server in list(_LIVE.values()):
        server.stop(grace_s=3.0)


_installed = False


def _install_handlers() -> None:
    """Stop every live server at exit and on SIGTERM/SIGHUP (Ctrl-C raises KeyboardInterrupt, and
    the caller's `finally` stops them)."""
    global _installed
    if _installed:
        return
    _installed = True
    atexit.register(stop_all)

    def on_signal(signum, frame):
        stop_all()
        # the unwinding (an event loop cancelling its streams) must not keep a stopped harness alive
        watchdog = threading.Timer(UNWIND_DEADLINE_S, os._exit, args=(128 + signum,))
        watchdog.daemon = True
        watchdog.start()
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(sig, on_signal)
        except ValueError:  # not the main thread: the atexit hook still runs
            pass
