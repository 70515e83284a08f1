"""The whole app in a real Chromium: talk through the fake microphone, hear the reply, go on, then Stop.

The microphone plays two espeak-ng questions. The test proves, by watching the page as a user would:
recording stops by itself after question 1; the reply streams and plays in #reply (autoplay, no
autoplay-policy flag); #chatbot shows the user turn and the reply as audio; the microphone re-arms after
the reply has played; question 2 makes a second turn; Stop cancels the second reply and nothing re-arms; a
second tab open all along shows none of it; no request leaves 127.0.0.1. The final page is saved as
test-output/browser/final.png.

The questions are 9 s apart, not 2.5 s: the microphone is (rightly) off while a reply plays, and a reply
takes longer than 2.5 s (pause detection, the echo of question 1 itself, Gradio's ~1 s player start), so a
second question 2.5 s later would be spoken into a closed microphone. The test checks that the microphone
was open again before question 2 began, so the gap is not hiding a late re-arm.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests import browser_harness as harness
from tests.speech import espeak_available, join, silence, speak, write_wav

OUTPUT = harness.REPO_ROOT / "test-output" / "browser"
LEAD_IN_S = 0.5
GAP_S = 9.0

pytestmark = pytest.mark.skipif(
    not espeak_available() or harness.browser_tools_missing() is not None,
    reason=harness.browser_tools_missing() or "espeak-ng is not installed",
)


def two_questions(path: Path) -> tuple[float, float, float]:
    """Write the microphone's WAV; return (question 1 end, question 2 start, question 2 end) in file seconds."""
    first = speak("What is the capital of France?")
    second = speak("And how many people live there, and what is the city famous for?")
    write_wav(path, join(silence(LEAD_IN_S), first, silence(GAP_S), second, silence(40.0)))
    first_end = LEAD_IN_S + len(first) / 16_000
    second_start = first_end + GAP_S
    return first_end, second_start, second_start + len(second) / 16_000


BOT_AUDIO = """document.querySelectorAll('#chatbot [data-testid="bot"] [data-testid="waveform-Audio"]')"""


def chat_counts(page) -> dict:
    return page.evaluate("""() => ({
        user: document.querySelectorAll('#chatbot [data-testid="user"]').length,
        user_audio: document.querySelectorAll('#chatbot [data-testid="user"] [data-testid="waveform-Audio"]').length,
        bot_audio: document.querySelectorAll('#chatbot [data-testid="bot"] [data-testid="waveform-Audio"]').length,
        bot_text: Array.from(document.querySelectorAll('#chatbot [data-testid="bot"]'))
            .map(e => e.innerText).join(' | '),
    })""")


def status_text(page) -> str:
    return page.evaluate("document.querySelector('#status').innerText")


@pytest.fixture(scope="module")
def microphone() -> tuple[Path, tuple[float, float, float]]:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    path = OUTPUT / "two-questions.wav"
    return path, two_questions(path)


@pytest.fixture(scope="module")
def url() -> str:
    with harness.running_app(OUTPUT / "app.log") as running:
        yield running


def test_two_turns_then_stop_in_a_real_browser(url: str, microphone) -> None:
    wav, (first_end, second_start, second_end) = microphone
    with harness.chromium_page(wav) as (page, record):
        page.goto(url)
        harness.wait_for(page, harness.MIC_OFF, 30, "the microphone's record button")
        harness.wait_for(page, "document.querySelector('#status').innerText.includes('echo engine')", 60,
                         "the status line to name the echo engine (the local server is ready)")

        other_tab = page.context.new_page()  # a second user of the same app, who does not talk
        other_tab.goto(url)
        harness.wait_for(other_tab, harness.MIC_OFF, 30, "the second tab's page")

        page.click("#mic button.record-button")  # the user's one gesture
        harness.wait_for(page, harness.MIC_RECORDING, 10, "recording to start")
        harness.wait_for(page, "window.__mic.firstOpenedAt !== null", 10, "the microphone to open")
        room = harness.mic_opened_at(page)

        # Turn 1: the app stops the microphone itself once question 1 is over.
        stopped = harness.wait_for(page, harness.MIC_OFF, first_end + 8, "the microphone to stop after question 1")
        assert room + first_end < stopped < room + second_start, "recording must stop after question 1, by itself"
        assert "Thinking" in status_text(page) or "Speaking" in status_text(page)

        playing = harness.wait_for(page, "window.__reply.some(e => e.type === 'playing')", 15,
                                   "the reply to play in #reply")
        ended = harness.wait_for(page, "window.__reply.some(e => e.type === 'ended')", 20,
                                 "the reply to finish playing")
        assert ended - playing > 1.5, "the echo of a 2 s question plays for about 2 s"
        rearmed = harness.wait_for(page, harness.MIC_RECORDING, 10, "the microphone to re-arm after the reply")
        assert rearmed >= ended
        assert rearmed < room + second_start, "the microphone must be open before question 2 starts"
        harness.wait_for(page, f"{BOT_AUDIO}.length >= 1", 10, "the reply's audio in the chat")
        first_turn = chat_counts(page)
        assert first_turn["user"] == 1 and first_turn["user_audio"] == 1 and first_turn["bot_audio"] == 1
        assert "(echo)" in first_turn["bot_text"] and "s to first audio" in first_turn["bot_text"]

        # Turn 2: question 2, then Stop while its reply plays.
        stopped_again = harness.wait_for(page, harness.MIC_OFF, second_end - (rearmed - room) + 8,
                                         "the microphone to stop after question 2")
        assert stopped_again > room + second_end, "turn 2 must end after question 2, not cut it off"
        # Stop as soon as the second reply reaches the player: most of it is still being streamed then.
        harness.wait_for(page, f"window.__reply.some(e => e.type === 'play' && e.at > {stopped_again})", 15,
                         "the second reply to reach the player")
        page.click("#stop")
        clicked = page.evaluate("window.__stopClickedAt")  # when the click landed, on the page's clock
        harness.wait_for(page, "document.querySelector('#status').innerText.includes('Stopped')", 10,
                         "the status line to say the conversation stopped")
        time.sleep(3.0)  # long enough for the second reply to have ended and a re-arm to have happened
        assert page.evaluate(harness.MIC_OFF), "after Stop the microphone stays off"
        final = chat_counts(page)
        assert final["user"] == 2 and final["user_audio"] == 2, final
        assert final["bot_audio"] == 2 and "stopped" in final["bot_text"], final
        after_stop = [e for e in page.evaluate("window.__reply") if e["at"] >= clicked]
        audible = [e for e in after_stop if e["type"] == "playing" and not e["muted"] and e["at"] - clicked > 0.25]
        assert not audible, f"nothing is heard after Stop: {after_stop} {page.evaluate('window.__mic')}"
        player_paused = "(() => { const a = document.querySelector('#reply audio'); return !a || a.paused; })()"
        assert page.evaluate(player_paused), "the stopped reply's player is not playing"
        assert harness.reply_events(page, "ended")[-1]["at"] < clicked, f"the stopped reply never ends: {after_stop}"

        page.screenshot(path=str(OUTPUT / "final.png"), full_page=True)
        assert chat_counts(other_tab)["user"] == 0 and not other_tab.evaluate(BOT_AUDIO + ".length"), \
            "nothing of one tab's conversation appears in another"
        assert "Click" in status_text(other_tab) and other_tab.evaluate(harness.MIC_OFF)
        timings = {
            "speech_end_to_first_audio_s": round(playing - (room + first_end), 3),
            "turn_1_mic_stopped_after_speech_s": round(stopped - (room + first_end), 3),
            "turn_2_mic_stopped_after_speech_s": round(stopped_again - (room + second_end), 3),
        }
        (OUTPUT / "timings.json").write_text(json.dumps(timings, indent=2))

    assert record.foreign_requests() == [], "the page must not reach beyond 127.0.0.1"


def test_replies_autoplay_after_the_users_one_click_alone(url: str, microphone) -> None:
    """Nothing but one mouse click touches the page until two replies have played: no `evaluate`, whose
    implicit gesture could make autoplay work where a real user's browser would refuse it. The second reply
    plays long after the click, so the click's short-lived activation is over by then."""
    wav, (_, second_start, second_end) = microphone
    with harness.chromium_page(wav) as (scout, _):  # another page finds the button and waits for the server
        scout.goto(url)
        harness.wait_for(scout, "document.querySelector('#status').innerText.includes('echo engine')", 60,
                         "the local server")
        box = scout.locator("#mic button.record-button").bounding_box()
    with harness.chromium_page(wav) as (page, record):
        page.goto(url)
        time.sleep(8.0)  # the page renders; no polling, which would evaluate in it
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        time.sleep(second_end + 14.0)  # both turns and both replies, with room to spare
        events = page.evaluate("window.__reply")
        assert page.evaluate("window.__mic.opens") >= 2, "the click started recording and the mic re-armed"
    played = [e for e in events if e["type"] == "ended" and e["position"] > 1.5 and not e["muted"]]
    assert len(played) == 2, f"both replies played to their end: {events}"
    assert record.foreign_requests() == []
