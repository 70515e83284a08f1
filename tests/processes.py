"""Ending a test's child process (an app, a sound server): politely, then for sure."""

from __future__ import annotations

import subprocess


def end(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM, so it can clean up (the app stops its model server); SIGKILL if it takes over `grace_s`."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
