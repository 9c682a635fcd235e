"""Children that cannot outlive the harness: a measuring child or a server started with
`preexec_fn=die_with_parent` is sent SIGKILL by the kernel when the harness dies, however it dies
(SIGTERM's default action, SIGKILL, a crash), so no 20 GB reference or server is left running."""

from __future__ import annotations

import signal
import sys


def die_with_parent() -> None:  # in the child, before exec (Linux)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


PREEXEC = die_with_parent if sys.platform == "linux" else None
