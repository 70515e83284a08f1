"""The whole app in a real Chromium: talk through the fake microphone, hear the replies, cut in, Stop.

What the page plays is heard through a private PulseAudio (tests/sound_capture.py) and timed on the wall
clock, against the microphone file's own timeline (its time 0 is when the page first opened the microphone).
The tests prove, as a user would notice: each question is answered aloud, turn after turn, with the
microphone open all along; Stop silences the reply at once and keeps the history; talking over a reply
silences it and the interrupting question is answered whole; the reply's own echo, at -20 dB in the
microphone, never interrupts it; a second tab hears and shows nothing of the first; a made-up token opens no
channel; replies play after one real click, with nothing evaluated in the page. No request leaves 127.0.0.1.
The final page is saved as test-output/browser/final.png. Speed is measured by bench/live_latency.py, not here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests import browser_harness as harness
from tests.sound_capture import pulse_tools_missing, recording
from tests.speech import espeak_available, silence, speak, trim

OUTPUT = harness.REPO_ROOT / "test-output" / "browser"
RATE = 16_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not espeak_available() or harness.browser_tools_missing() is not None or pulse_tools_missing() is not None,
        reason=harness.browser_tools_missing() or pulse_tools_missing() or "espeak-ng is not installed",
    ),
]


@pytest.fixture(scope="module")
def url() -> str:
    with harness.running_app(OUTPUT / "app.log") as running:
        yield running.url


def test_a_conversation_heard_turn_after_turn_then_stop(url: str, pulse) -> None:
    script = harness.Script().add(silence(0.5))
    for number, text in enumerate(
        [
            "What is the capital of France?",
            "And how many people live there?",
            "Is it a good place to visit in the spring?",
        ],
        start=1,
    ):
        script.add(trim(speak(text)), f"q{number}").add(silence(6.0))
    wav = script.write(OUTPUT / "three-questions.wav")
    with harness.chromium_page(wav, pulse) as (page, record), recording(pulse) as capture:
        page.goto(url)
        harness.wait_for(page, harness.SERVER_READY, 60, "the status line to name the echo engine")
        other_tab = page.context.new_page()  # a second user of the same app, who does not talk
        other_tab.goto(url)
        harness.wait_for(other_tab, harness.SERVER_READY, 30, "the second tab's page")

        page.click("#start")  # the user's one gesture
        harness.wait_for(
            page, "window.omniLive.state.events.some(e => e.type === 'connected')", 15, "the live channel to connect"
        )
        room = harness.mic_opened_at(page)
        assert page.evaluate("window.__mic.opens") == 1, "one getUserMedia for the whole conversation"
        assert '"all"' in page.evaluate("window.__mic.constraints[0]"), "echo cancellation asked for all audio"

        for number in (1, 2):
            harness.wait_for(
                page,
                f"window.omniLive.state.events.some(e => e.type === 'played' && e.turn === {number})",
                script.spans[f"q{number}"][1] + 20 - (time.time() - room),
                f"reply {number} to play",
            )
            end, next_start = script.spans[f"q{number}"][1], script.spans[f"q{number + 1}"][0]
            first_sound = capture.first_sound_after(room + end)
            assert first_sound is not None and first_sound < room + next_start, f"reply {number} was heard"
            spoken = script.spans[f"q{number}"][1] - script.spans[f"q{number}"][0]
            assert harness.heard_between(capture, first_sound, room + next_start) > 0.6 * spoken, "the whole echo plays"
        assert [e["complete"] for e in harness.live_events(page, "played")] == [True, True]

        # Turn 3: Stop while its reply plays.
        harness.wait_for(
            page,
            "window.omniLive.state.events.some(e => e.type === 'sounding' && e.turn === 3)",
            script.spans["q3"][1] + 20 - (time.time() - room),
            "reply 3 to sound",
        )
        time.sleep(0.5)
        clicked = harness.stop_conversation(page)
        time.sleep(1.0)
        harness.assert_silenced_at_once(capture, clicked)
        harness.wait_for(
            page,
            'document.querySelectorAll(\'#chatbot [data-testid="bot"] [data-testid="waveform-Audio"]\').length >= 3',
            10,
            "the third reply in the chat",
        )
        final = harness.chat_counts(page)
        assert final["user"] == 3 and final["user_audio"] == 3 and final["bot_audio"] == 3, final
        assert "(echo)" in final["bot_text"] and "s to first sound" in final["bot_text"], final
        assert "stopped after" in final["bot_text"], (final, harness.live_events(page))

        page.screenshot(path=str(OUTPUT / "final.png"), full_page=True)
        assert harness.chat_counts(other_tab)["user"] == 0 and harness.chat_counts(other_tab)["bot_audio"] == 0, (
            "nothing of one tab's conversation appears in another"
        )
        assert not harness.live_events(other_tab, "first-audio"), "nor is any of its audio sent there"
        sounding = {e["turn"]: e["sounding"] for e in harness.live_events(page, "sounding")}
        (OUTPUT / "timings.json").write_text(
            json.dumps(
                {
                    f"turn_{n}_speech_end_to_sound_s": round(sounding[n] - (room + script.spans[f"q{n}"][1]), 3)
                    for n in sounding
                },
                indent=2,
            )
        )
    assert record.foreign_requests() == [], "the page must not reach beyond 127.0.0.1"


def test_talking_over_a_reply_cuts_it_off_but_its_echo_does_not(url: str, pulse) -> None:
    story = trim(speak("Tell me a long story about the sea, the ships, the sailors and the storms they met."))
    interruption = trim(speak("What time is it now?"))
    # The reply (the story's echo) sounds from about 1.3 s after the story ends, for as long as the story.
    script = harness.Script().add(silence(0.5)).add(story, "story").add(silence(1.9))
    script.add(0.1 * story[: 2 * RATE], "echo")  # the reply coming back from the speakers at -20 dB
    script.add(silence(0.5)).add(interruption, "interruption").add(silence(1.0))
    wav = script.write(OUTPUT / "cut-in.wav")
    with harness.chromium_page(wav, pulse) as (page, _), recording(pulse) as capture:
        page.goto(url)
        harness.wait_for(page, harness.SERVER_READY, 60, "the local server")
        page.click("#start")
        harness.wait_for(page, "window.__mic.firstOpenedAt !== null", 15, "the microphone to open")
        room = harness.mic_opened_at(page)
        harness.wait_for(
            page,
            "window.omniLive.state.events.some(e => e.type === 'played' && e.turn === 2)",
            script.length_s + 25 - (time.time() - room),
            "the interrupting question's reply",
        )

        flushes = harness.live_events(page, "flush")
        cut_at = room + script.spans["interruption"][0]
        assert [e["turn"] for e in flushes] == [1], "one cut-in, on the first reply"
        assert flushes[0]["at"] > cut_at, "the echo (which came earlier) did not interrupt"
        first_sound = capture.first_sound_after(room + script.spans["story"][1])
        assert first_sound is not None and first_sound < room + script.spans["echo"][0], "the story was playing"
        assert harness.heard_between(capture, room + script.spans["echo"][0], room + script.spans["echo"][1]) > 1.5, (
            "it kept playing through its echo"
        )
        silent_from = capture.sound_stopped_after(cut_at, quiet_s=0.3)
        assert silent_from is not None and silent_from - cut_at < 1.0, "talking over it silences it"
        played = harness.live_events(page, "played")
        assert [(e["turn"], e["complete"]) for e in played] == [(1, False), (2, True)], played
        answer_heard = harness.heard_between(capture, room + script.spans["interruption"][1], time.time())
        assert answer_heard > 0.8 * len(interruption) / RATE, "the interrupting question is answered, whole"
        harness.wait_for(
            page,
            "document.querySelector('#chatbot').innerText.includes('you cut in after')",
            10,
            "the first reply filed as interrupted",
        )
        assert harness.chat_counts(page)["user_audio"] == 2


def test_replies_play_after_the_users_one_click_alone(url: str, pulse) -> None:
    """Nothing but one mouse click touches the page until two replies have been heard: no `evaluate`, whose
    implicit gesture could unlock audio where a real user's browser would not. The second reply plays long
    after the click, when the click's short-lived activation is over."""
    script = (
        harness.Script().add(silence(0.5)).add(trim(speak("What is the capital of France?")), "q1").add(silence(6.0))
    )
    script.add(trim(speak("And how many people live there?")), "q2")
    wav = script.write(OUTPUT / "one-click.wav")
    with harness.chromium_page(wav, pulse) as (scout, _):  # another page finds the button and waits for the server
        scout.goto(url)
        harness.wait_for(scout, harness.SERVER_READY, 60, "the local server")
        box = scout.locator("#start").bounding_box()
    with harness.chromium_page(wav, pulse) as (page, record), recording(pulse) as capture:
        page.goto(url)
        time.sleep(8.0)  # the page renders; no polling, which would evaluate in it
        clicked = time.time()
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        time.sleep(script.length_s + 8.0)  # both turns and both replies, with room to spare
        opened = page.evaluate("window.__mic.firstOpenedAt")
    assert opened is not None and opened - clicked < 3, "the click started the conversation"
    for name, until in (("q1", script.spans["q2"][0]), ("q2", script.length_s + 7.0)):
        assert harness.heard_between(capture, opened + script.spans[name][1], opened + until) > 1.0, (
            f"the reply to {name} played"
        )
    assert record.foreign_requests() == []


def test_a_made_up_token_opens_no_channel(url: str, pulse) -> None:
    with harness.chromium_page(OUTPUT / "one-click.wav") as (page, _):
        page.goto(url)
        harness.wait_for(page, "window.omniLive !== undefined", 30, "the page's live client")
        outcome = page.evaluate("""() => new Promise((resolve) => {
            const socket = new WebSocket(new URL("live", document.baseURI).href.replace(/^http/, "ws"));
            const heard = [];
            socket.onopen = () => socket.send(JSON.stringify({type: "hello", token: "made-up-token"}));
            socket.onmessage = (event) => heard.push(event.data);
            socket.onclose = (event) => resolve({code: event.code, heard});
            setTimeout(() => resolve({code: null, heard}), 10000);
        })""")
    assert outcome["code"] == 4403 and len(outcome["heard"]) == 1, outcome
    assert json.loads(outcome["heard"][0])["type"] == "error"


def test_a_closed_tab_takes_its_audio_with_it_and_the_app_leaves_nothing(
    pulse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tab's WAVs and MP3s go when it closes (Gradio's unload), not an hour later; all else at the app's exit."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the app's own temporary folder goes
    wav = harness.Script().add(silence(0.5)).add(trim(speak("What is the capital of France?")), "q").add(silence(8.0))
    path = wav.write(OUTPUT / "closed-tab.wav")
    with harness.running_app(OUTPUT / "closed-tab-app.log") as running:
        (run_dir,) = tmp_path.glob("omni-voice-chat-*")
        with harness.chromium_page(path, pulse) as (page, _):
            page.goto(running.url)
            harness.wait_for(page, harness.SERVER_READY, 60, "the status line to name the echo engine")
            page.click("#start")
            harness.wait_for(
                page,
                "window.omniLive.state.events.some(e => e.type === 'played' && e.turn === 1)",
                30,
                "the reply to play",
            )
            deadline = time.monotonic() + 10  # the app files the reply once the page says it played
            while {p.suffix for p in (run_dir / "tabs").glob("*/*")} != {
                ".wav",
                ".mp3",
            } and time.monotonic() < deadline:
                time.sleep(0.2)
            tab_files = list((run_dir / "tabs").glob("*/*"))
            assert {p.suffix for p in tab_files} == {".wav", ".mp3"}, tab_files
            page.close()
            deadline = time.monotonic() + 30
            while any(p.exists() for p in tab_files) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not any(p.exists() for p in tab_files), "the closed tab's audio is removed"
    assert not run_dir.exists(), "the app's folder is gone after it exits"
