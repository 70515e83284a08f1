"""tests/sound_capture.py hears what Chromium plays, at the right wall-clock time: a measured self-check."""

from __future__ import annotations

import importlib.util
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sound_capture import Recording, private_pulse, pulse_tools_missing, recording

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

MISSING = (
    pulse_tools_missing()
    or (None if Path(CHROMIUM).exists() else f"{CHROMIUM} is not installed")
    or (None if importlib.util.find_spec("playwright") else "playwright is not installed")
)
pytestmark = [pytest.mark.browser, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]

# Plays 440 Hz tones [(start, stop) in seconds from now] and returns the wall time of the `start()` calls: Date.now()
# reads the same clock as Python's time.time(). The page's one AudioContext first runs for a second: on a busy
# machine Chromium's output underruns while its audio starts up.
PLAY_TONES = """async (tones) => {
    window.context ??= new AudioContext();
    await context.resume();
    while (context.currentTime < 1) await new Promise((resolve) => setTimeout(resolve, 10));
    const now = context.currentTime;
    for (const [start, stop] of tones) {
        const tone = new OscillatorNode(context, {frequency: 440});
        tone.connect(context.destination);
        tone.start(now + start);
        tone.stop(now + stop);
    }
    return {at: Date.now() / 1000, outputLatency: context.outputLatency, baseLatency: context.baseLatency};
}"""


@pytest.fixture(scope="module")
def listening() -> Iterator[tuple[Recording, object]]:
    """A Chromium page that plays into a private PulseAudio, which is being recorded."""
    from playwright.sync_api import sync_playwright

    with private_pulse() as pulse, recording(pulse) as heard, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_FLAGS, **pulse.chromium_launch_kwargs()
        )
        page = browser.new_page()
        page.set_content("<title>tones</title>")
        yield heard, page
        browser.close()


def play(page: object, tones: list[tuple[float, float]]) -> dict:
    played = page.evaluate(PLAY_TONES, tones)
    time.sleep(max(0.0, played["at"] + tones[-1][1] + 0.8 - time.time()))  # the tones, and quiet before the next
    return played


def test_a_tone_is_heard_when_and_as_long_as_the_page_plays_it(listening, tmp_path: Path) -> None:
    heard, page = listening
    played = play(page, [(0.0, 0.5)])
    at = played["at"]

    onset = heard.first_sound_after(at - 0.3)
    assert onset is not None, "the tone was not heard"
    stopped = heard.sound_stopped_after(onset)
    assert stopped is not None
    print(
        f"\ntone heard {1000 * (onset - at):+.1f} ms after osc.start(), lasted {1000 * (stopped - onset):.1f} ms; "
        f"Chromium reports outputLatency {1000 * played['outputLatency']:.1f} ms, "
        f"baseLatency {1000 * played['baseLatency']:.1f} ms"
    )
    assert -0.02 < onset - at < 0.15
    assert heard.level_db(at - 0.3, at) < -90, "something played before the tone"
    gaps = heard.gaps(onset + 0.01, stopped - 0.01)
    assert gaps == [], f"Chromium's output underran (a busy CPU does that): gaps {gaps}"
    assert abs(stopped - onset - 0.5) < 0.08
    assert heard.level_db(onset + 0.1, onset + 0.4) > -10  # a full-scale sine is -3 dBFS

    heard.save_wav(tmp_path / "heard.wav")
    with wave.open(str(tmp_path / "heard.wav")) as saved:
        assert saved.getframerate() == 16_000 and saved.getnframes() >= 16_000 * 0.5


def test_a_40_ms_gap_between_two_tones_is_found(listening) -> None:
    heard, page = listening
    at = play(page, [(0.05, 0.25), (0.29, 0.49)])["at"]  # in the future, so that each edge is exact

    onset = heard.first_sound_after(at - 0.3)
    gaps = heard.gaps(onset, onset + 0.44)
    print(
        "\ngaps (start after onset, length) in ms:",
        [(round(1000 * (a - onset), 1), round(1000 * (b - a), 1)) for a, b in gaps],
    )
    assert len(gaps) == 1
    ((gap_start, gap_end),) = gaps
    assert abs(gap_start - onset - 0.2) < 0.015 and abs(gap_end - gap_start - 0.04) < 0.003
    assert heard.gaps(onset, onset + 0.44, min_gap_s=0.05) == []
