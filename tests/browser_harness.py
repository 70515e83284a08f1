"""A real Chromium talking to the real app (`python app.py --engine echo`) through its fake microphone, with
what the page plays heard through a private PulseAudio (tests/sound_capture.py).

Shared by tests/test_browser.py and bench/live_latency.py. Facts about Chromium's fake microphone shape it:
- it plays the WAV file in real time from the first getUserMedia, and restarts the file at every later one
  (a new conversation opens the microphone again). A real microphone hears the room in real time whether
  the page records or not; to get that, the page keeps one clone of the first microphone track alive, which
  keeps the device open, so the file plays on from where it was. `window.__mic.firstOpenedAt` (wall clock,
  the clock the sound capture uses) is therefore the file's time 0;
- the browser requires a user's click before audio may play (`--autoplay-policy=document-user-activation-
  required`), and the only interactions are real clicks. Playwright's `evaluate` counts as a gesture too, so
  tests/test_browser.py also has a run in which nothing is evaluated in the page before its replies played.
Every request the page makes is recorded, so a test can prove nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from tests import processes
from tests.sound_capture import PulseAudio, Recording
from tests.speech import join, silence, write_wav

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
RATE = 16_000  # the microphone files' rate

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--autoplay-policy=document-user-activation-required",  # what a user's browser does: a click first
]

# Keeps the microphone device open (see above), and stamps on the wall clock what tests need.
PAGE_INIT_SCRIPT = """
(() => {
    window.__mic = {firstOpenedAt: null, opens: 0, constraints: []};
    const open = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
    navigator.mediaDevices.getUserMedia = async (constraints) => {
        window.__mic.constraints.push(JSON.stringify(constraints));
        const stream = await open(constraints);
        window.__mic.opens += 1;
        if (window.__mic.firstOpenedAt === null) {
            window.__mic.firstOpenedAt = Date.now() / 1000;
            window.__mic.room = stream.clone();
        }
        return stream;
    };
    document.addEventListener("click", (event) => {
        if (event.target.closest && event.target.closest("#stop")) window.__stopClickedAt = Date.now() / 1000;
    }, true);
})();
"""


def browser_tools_missing() -> str | None:
    """Why a browser test cannot run here, or None."""
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is not installed"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class RunningApp:
    url: str
    pid: int  # the app's own process (its model server is a child process of its own)


@contextmanager
def running_app(
    log_path: Path,
    *extra_args: str,
    timeout_s: float = 90.0,
    app_dir: Path = REPO_ROOT,
    engine_args: tuple[str, ...] = ("--engine", "echo"),
    env: dict[str, str] | None = None,
) -> Iterator[RunningApp]:
    """`python app.py --engine echo` (of `app_dir`, this checkout unless told; `engine_args` pick another
    engine, `env` adds variables) on 127.0.0.1 and a free port, once its page is served."""
    port = free_port()
    env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "app.py", *engine_args, *extra_args],
            cwd=app_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"app.py exited with {process.returncode}; see {log_path}")
                try:
                    urllib.request.urlopen(url, timeout=2).read()
                    break
                except OSError as error:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"app.py did not serve {url} within {timeout_s} s; see {log_path}"
                        ) from error
                    time.sleep(0.3)
            yield RunningApp(url, process.pid)
        finally:
            processes.end(process, grace_s=15)


@dataclass
class PageRecord:
    requests: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    def foreign_requests(self) -> list[str]:
        """Requests to anything but 127.0.0.1 (blob: and data: URLs stay in the page)."""
        return [
            url
            for url in self.requests
            if urlparse(url).scheme in ("http", "https", "ws", "wss") and urlparse(url).hostname != "127.0.0.1"
        ]


@contextmanager
def chromium_pages(
    microphone_wavs: list[Path], pulse: PulseAudio | None = None
) -> Iterator[list[tuple[object, PageRecord]]]:
    """One page per file, each in a fresh Chromium of its own (the fake microphone is per browser); with
    `pulse`, their sound goes there."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browsers = []
        try:
            pages = []
            for wav in microphone_wavs:
                browsers.append(
                    playwright.chromium.launch(
                        executable_path=CHROMIUM,
                        headless=True,
                        args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={wav}"],
                        **(pulse.chromium_launch_kwargs() if pulse is not None else {}),
                    )
                )
                context = browsers[-1].new_context(permissions=["microphone"], viewport={"width": 1280, "height": 900})
                context.add_init_script(PAGE_INIT_SCRIPT)
                page, record = context.new_page(), PageRecord()
                page.on("request", lambda request, record=record: record.requests.append(request.url))
                page.on("console", lambda message, record=record: record.console.append(message.text))
                pages.append((page, record))
            yield pages
        finally:
            for browser in browsers:
                browser.close()


@contextmanager
def chromium_page(microphone_wav: Path, pulse: PulseAudio | None = None) -> Iterator[tuple[object, PageRecord]]:
    """A page of a fresh Chromium whose microphone plays `microphone_wav`; with `pulse`, its sound goes there."""
    with chromium_pages([microphone_wav], pulse) as [page]:
        yield page


def wait_for(page: object, condition_js: str, timeout_s: float, what: str) -> float:
    """Poll a JS condition (no gesture: evaluate only reads); return the wall-clock time it became true."""
    deadline = time.monotonic() + timeout_s
    guarded = f"() => {{ try {{ return Boolean({condition_js}); }} catch {{ return false; }} }}"
    while time.monotonic() < deadline:
        if page.evaluate(guarded):  # type: ignore[attr-defined]
            return time.time()
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


SERVER_READY = "document.querySelector('#status').innerText.includes('echo engine')"


def live_events(page: object, kind: str | None = None) -> list[dict]:
    """What the page's live client logged (web/live.js), on the wall clock; `kind` picks one type."""
    events = page.evaluate("window.omniLive.state.events")  # type: ignore[attr-defined]
    return [event for event in events if kind is None or event["type"] == kind]


def mic_opened_at(page: object) -> float:
    """Wall-clock time of the microphone file's time 0."""
    return page.evaluate("window.__mic.firstOpenedAt")  # type: ignore[attr-defined]


def status_text(page: object) -> str:
    return page.evaluate("document.querySelector('#status').innerText")  # type: ignore[attr-defined]


def chat_counts(page: object) -> dict:
    return page.evaluate("""() => ({
        user: document.querySelectorAll('#chatbot [data-testid="user"]').length,
        user_audio: document.querySelectorAll('#chatbot [data-testid="user"] [data-testid="waveform-Audio"]').length,
        bot_audio: document.querySelectorAll('#chatbot [data-testid="bot"] [data-testid="waveform-Audio"]').length,
        bot_text: Array.from(document.querySelectorAll('#chatbot [data-testid="bot"]'))
            .map(e => e.innerText).join(' | '),
    })""")  # type: ignore[attr-defined]


class Script:
    """A microphone file built piece by piece, remembering where each spoken part starts and ends (seconds)."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.length_s = 0.0
        self.spans: dict[str, tuple[float, float]] = {}

    def add(self, audio: np.ndarray, name: str | None = None) -> Script:
        if name is not None:
            self.spans[name] = (self.length_s, self.length_s + len(audio) / RATE)
        self.parts.append(audio)
        self.length_s += len(audio) / RATE
        return self

    def write(self, path: Path) -> Path:
        return write_wav(path, join(*self.parts, silence(60.0)))


def heard_between(capture: Recording, start: float, end: float) -> float:
    """Seconds of sound the page played in [start, end] (wall clock)."""
    times, levels = capture.blocks()
    inside = (times >= start) & (times < end)
    return float(np.sum(levels[inside] > -50.0)) * 0.01


def assert_silenced_at_once(capture: Recording, clicked: float) -> None:
    """What a user hears of Stop clicked at `clicked` (wall clock): the reply stops within 0.5 s, for good."""
    silent_from = capture.sound_stopped_after(clicked - 0.3, quiet_s=0.5)
    assert silent_from is not None and silent_from - clicked < 0.5, "Stop silences the reply at once"
    assert heard_between(capture, clicked + 0.5, time.time()) == 0.0, "and nothing plays after it"


def click(page: object, selector: str) -> None:
    """A real mouse click in the middle of the element, with no actionability waits."""
    box = page.locator(selector).bounding_box()  # type: ignore[attr-defined]
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)  # type: ignore[attr-defined]


def stop_conversation(page: object) -> float:
    """Click Stop as a user does and wait for the status line to say so; the click's wall-clock time."""
    click(page, "#stop")
    clicked = page.evaluate("window.__stopClickedAt")  # type: ignore[attr-defined]
    wait_for(
        page,
        "document.querySelector('#status').innerText.includes('Stopped')",
        10,
        "the status line to say the conversation stopped",
    )
    return clicked
