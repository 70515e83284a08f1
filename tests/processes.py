"""Ending a test's child process (an app, a sound server): politely, then for sure; and telling when one ended."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def end(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM, so it can clean up (the app stops its model server); SIGKILL if it takes over `grace_s`."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def gone(pid: int) -> bool:
    """Whether process `pid` has ended: no such process, or a zombie whose threads have all exited (only then
    can its parent reap it; a killed multi-threaded process shows "Z" a moment before)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X") and threads <= 1


def wait_gone(pid: int, timeout_s: float) -> bool:
    """Wait until process `pid` has ended; False if it still runs after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
