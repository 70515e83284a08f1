"""The mini-omni engine through the whole app in a real Chromium, as a user on a fresh machine meets it.

The app runs `--engine mini-omni` on a tiny recipe checkpoint (built here, no download from the Hub) whose
whisper file is missing, so the server downloads it, from a mirror on 127.0.0.1 (`OMNI_WHISPER_URL`), the
edge this project does not own. The mirror sends its first megabyte and then holds the rest until the user's
first question has been heard, so that question is certainly asked while the model loads. The checkpoint's
end-of-audio embedding is zero, so its replies never end on their own (each would take ~2000 steps, over a
minute here): Stop always lands during generation. The test proves, as a user would notice: the question
asked while loading waits, with progress in the status line, and is answered aloud once the model is ready,
its text in the chat; Stop silences the reply at once, files it with its text, and frees the server, so the
next question is answered at once instead of after the abandoned reply.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from omni_server.mini_omni import checkpoint, recipe
from omni_server.mini_omni.checkpoint import WHISPER_URL_VARIABLE
from tests import browser_harness as harness
from tests.mini_omni_helpers import write_tiny_checkpoint
from tests.sound_capture import Recording, pulse_tools_missing, recording
from tests.speech import espeak_available, silence, speak, trim
from turn_weights import PATH_VARIABLE, default_path

OUTPUT = harness.REPO_ROOT / "test-output" / "browser"
HELD_AFTER_BYTES = 1 << 20

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not espeak_available() or harness.browser_tools_missing() is not None or pulse_tools_missing() is not None,
        reason=harness.browser_tools_missing() or pulse_tools_missing() or "espeak-ng is not installed",
    ),
]


class HeldMirror:
    """An HTTP mirror of one file on 127.0.0.1 that sends its first megabyte, then waits for `release()`."""

    def __init__(self, payload: bytes, url: str) -> None:
        self.payload = payload
        self.url = url
        self.released = threading.Event()

    def release(self) -> None:
        self.released.set()


@contextmanager
def held_mirror(payload: bytes) -> Iterator[HeldMirror]:
    """Serve `payload` at /models/<sha256>/small.pt, as `OMNI_WHISPER_URL` names a mirror."""
    mirror = HeldMirror(payload, "")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[:HELD_AFTER_BYTES])
            self.wfile.flush()
            mirror.released.wait(timeout=120)
            self.wfile.write(payload[HELD_AFTER_BYTES:])

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    mirror.url = f"http://127.0.0.1:{server.server_address[1]}/models/{hashlib.sha256(payload).hexdigest()}/small.pt"
    threading.Thread(target=server.serve_forever, name="held-mirror", daemon=True).start()
    try:
        yield mirror
    finally:
        mirror.release()
        server.shutdown()
        server.server_close()


@pytest.fixture()
def endless_checkpoint(tmp_path: Path) -> Path:
    """A tiny recipe checkpoint (no whisper file: it is downloaded) whose replies run to max_tokens."""
    return write_tiny_checkpoint(tmp_path / "checkpoint", recipe_gains=recipe.GPTRecipe(eoa6_gain=0.0))


def bot_words(page: object) -> list[str]:
    """The word tokenizer's words ("w1234") in the chat's replies: the model's streamed text."""
    return re.findall(r"\bw\d+\b", harness.chat_counts(page)["bot_text"])


def heard_soon_after(capture: Recording, since: float, until: float | None = None) -> float | None:
    """The first sound after `since`, waiting for the recording to catch up (it lags what the page reports by
    its reads); gives up at `until` (default: 5 s from now)."""
    deadline = until if until is not None else time.time() + 5.0
    while (sound := capture.first_sound_after(since)) is None and time.time() < deadline:
        time.sleep(0.1)
    return sound


def test_a_question_asked_while_the_model_loads_is_answered_and_stop_frees_the_server(
    pulse, endless_checkpoint: Path, tmp_path: Path
) -> None:
    whisper = endless_checkpoint / checkpoint.WHISPER_FILE
    payload = whisper.read_bytes()
    whisper.unlink()
    script = harness.Script().add(silence(0.5)).add(trim(speak("What is the capital of France?")), "q1")
    script.add(silence(34.0)).add(trim(speak("And how many people live there?")), "q2")
    wav = script.write(OUTPUT / "mini-omni.wav")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}  # whisper is downloaded there
    if default_path().is_file():  # the end-of-turn model where it was fetched, not the empty cache's
        env[PATH_VARIABLE] = str(default_path())
    with held_mirror(payload) as mirror:
        env[WHISPER_URL_VARIABLE] = mirror.url
        engine_args = ("--engine", "mini-omni", "--checkpoint-dir", str(endless_checkpoint))
        with (
            harness.running_app(OUTPUT / "mini-omni-app.log", engine_args=engine_args, env=env) as app,
            harness.chromium_page(wav, pulse) as (page, record),
            recording(pulse) as capture,
        ):
            page.goto(app.url)
            harness.wait_for(page, "document.querySelector('#start') !== null", 60, "the page")
            harness.click(page, "#start")
            harness.wait_for(page, "window.__mic.firstOpenedAt !== null", 15, "the microphone to open")
            room = harness.mic_opened_at(page)

            # The question ends while the whisper download is held: it waits, saying why.
            harness.wait_for(
                page,
                "document.querySelector('#status').innerText.includes("
                "'Waiting for the model to load (mini-omni: downloading small.pt')",
                script.spans["q1"][1] + 15,
                "the question to wait for the model",
            )
            waiting_line = harness.status_text(page)
            assert re.search(r"downloading small\.pt: \d+ of \d+ MB", waiting_line), waiting_line
            assert not harness.live_events(page, "first-audio"), "nothing could have been answered yet"
            released = time.time()
            mirror.release()

            harness.wait_for(
                page,
                "window.omniLive.state.events.some(e => e.type === 'sounding' && e.turn === 1)",
                60,
                "the reply to the question asked while loading to sound",
            )
            first_sound = heard_soon_after(capture, released)
            assert first_sound is not None, "the reply was heard"
            harness.wait_for(
                page,
                "/\\bw\\d+\\b/.test(document.querySelector('#chatbot').innerText)",
                15,
                "the reply's text in the chat",
            )
            deadline = time.monotonic() + 15
            while harness.heard_between(capture, first_sound, time.time()) < 1.0 and time.monotonic() < deadline:
                time.sleep(0.1)

            clicked = harness.stop_conversation(page)
            time.sleep(1.5)  # the recording catches up
            playing = harness.heard_between(capture, clicked - 0.5, clicked)
            assert playing > 0.1, "the reply was playing when Stop was clicked"
            harness.assert_silenced_at_once(capture, clicked)
            harness.wait_for(
                page,
                "document.querySelector('#chatbot').innerText.includes('stopped after')",
                10,
                "the stopped reply filed in the chat",
            )
            filed = harness.chat_counts(page)
            assert filed["user_audio"] == 1 and filed["bot_audio"] == 1 and bot_words(page), filed

            # Talk again: the next question is answered at once, so the abandoned reply no longer holds the
            # server (unstopped, it would generate for a minute more).
            assert time.time() - room < script.spans["q2"][0] - 3, "the test reached its second question in time"
            harness.click(page, "#start")
            q2_end = room + script.spans["q2"][1]
            second_sound = heard_soon_after(capture, q2_end, until=q2_end + 10)
            assert second_sound is not None and second_sound - q2_end < 10, "answered without waiting"
            harness.click(page, "#stop")
            harness.wait_for(
                page,
                'document.querySelectorAll(\'#chatbot [data-testid="bot"] '
                '[data-testid="waveform-Audio"]\').length >= 2',
                15,
                "the second reply filed",
            )
            page.screenshot(path=str(OUTPUT / "mini-omni-final.png"), full_page=True)
            assert record.foreign_requests() == []
    log = (OUTPUT / "mini-omni-app.log").read_text()
    stopped = re.findall(r"reply: (\d+) steps \(stopped early\)", log)
    assert len(stopped) == 2 and all(int(steps) < 1500 for steps in stopped), (
        f"the server stopped generating each reply when it was stopped: {stopped}"
    )
