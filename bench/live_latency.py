"""How live the conversation feels, measured at the browser's audio output, beside the old path in the same run.

Both apps run `python app.py --engine echo` (the echo engine "thinks" 0.3 s, then speaks the question back)
and are driven by a real Chromium whose fake microphone plays espeak-ng questions; what the page plays goes
to a private PulseAudio sink and is timed on the wall clock (tests/sound_capture.py, about 20 ms). The
microphone file's time 0 is when the page first opened the microphone, so "speech end" is where the speech
really ends in the file, not where a detector thought it did.

- live: this checkout (WebSocket channel, AudioWorklet capture and player, barge-in).
- old: the Gradio-microphone path (streaming gr.Audio in and out, HLS player), checked out from git at
  --old-commit into a temporary worktree. Its questions are 9 s apart because its microphone is off while a
  reply plays; the live path gets the same file.

Figures (seconds unless named otherwise):
- speech_end_to_sound: per turn, end of the question in the file -> first reply sound at the output; median
  and worst. The echo engine's reply opens with the silence the detector kept before the first syllable
  (reply_silent_lead, read from the user's WAV the app filed), so speech_end_to_reply_start is that sound less
  the lead: when the reply's audio began to play. The live path also gives app_share: the reply's start - the
  turn-end decision (the page's receipt of the `turn` message) - the model server's request-to-first-audio,
  i.e. what the app and browser add.
- barge_in (live only): user starts talking over a reply -> its sound stops; whether a -20 dB echo of the
  reply, placed in the microphone before that, interrupted it (it must not); whether the interrupting
  question was answered.
- gaps: silences over 20 ms inside a 10 s reply (the question carries a quiet tone under the speech, so the
  reply is never silent while it plays); slow_model: the same against an echo engine paced 1.34x slower than
  real time (mini-omni in fp32 on this 2-core CPU), with the player's stalls.
- tabs: 4 browsers talking at once, each with a question of its own length; each must hear its own reply.
- live_silence_only: the live path's turns again, with the end-of-turn model missing (turns end on 0.8 s of
  silence), for the ratio model / silence alone.
- cpu: app CPU per listening tab (percent of one core), beside an idle page, over --cpu-seconds; and the
  microphone path alone in this process (cpu_hear_in_process), which a busy machine cannot blur.

Prints one JSON object on the last line. Example: python bench/live_latency.py --old-commit 60e4f21
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import turn_weights  # noqa: E402
from tests import browser_harness as harness  # noqa: E402
from tests.sound_capture import PulseAudio, private_pulse, recording  # noqa: E402
from tests.speech import join, silence, speak, trim, write_wav  # noqa: E402

RATE = 16_000
OUTPUT = ROOT / "test-output" / "bench"
QUESTIONS = [
    "What is the capital of France?",
    "And how many people live there?",
    "Is it a good place to visit?",
    "What should I see first?",
]
LONG_QUESTION = (
    "The quick brown fox jumps over the lazy dog while the sun sets slowly behind the distant hills "
    "and the birds sing their evening songs across the quiet valley."
)


class Script:
    """A microphone file and where each named part of it lies (seconds into the file)."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = [silence(0.5)]
        self.spans: dict[str, tuple[float, float]] = {}

    @property
    def length_s(self) -> float:
        return sum(len(part) for part in self.parts) / RATE

    def add(self, audio: np.ndarray, name: str | None = None) -> Script:
        if name is not None:
            self.spans[name] = (self.length_s, self.length_s + len(audio) / RATE)
        self.parts.append(audio)
        return self

    def write(self, path: Path) -> Path:
        return write_wav(path, join(*self.parts, silence(40.0)))


def silent_leads(since: float) -> dict[int, float]:
    """Seconds of silence (below -50 dBFS) at the start of each user turn's WAV the app filed after `since`
    (wall clock). The echo engine's reply is that audio, so the same silence opens the reply: the player has
    started that long before anything can be heard (the detector's pre-roll before the first syllable)."""
    import wave

    leads = {}
    # The old path kept its files in <tmp>/omni-voice-chat/; the live app keeps them in its own
    # <tmp>/omni-voice-chat-*/ folder (removed when it exits, so read while it runs).
    temporary = Path(tempfile.gettempdir())
    for path in [
        *temporary.glob("omni-voice-chat/*/turn-*-user.wav"),
        *temporary.glob("omni-voice-chat-*/tabs/*/turn-*-user.wav"),
    ]:
        if path.stat().st_mtime >= since:
            with wave.open(str(path)) as reader:
                samples = np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2")
            audible = np.nonzero(np.abs(samples) > 32768 * 10 ** (-50 / 20))[0]
            leads[int(path.name.split("-")[1])] = audible[0] / RATE if len(audible) else 0.0
    return leads


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in clock ticks of 1/100 s


def _mic_on(page, old: bool) -> None:
    page.click("#mic button.record-button" if old else "#start")
    harness.wait_for(page, "window.__mic.firstOpenedAt !== null", 15, "the microphone to open")


@contextmanager
def _page(app: harness.RunningApp, wav: Path, pulse: PulseAudio) -> Iterator[object]:
    with harness.chromium_page(wav, pulse) as (page, _):
        page.goto(app.url)
        harness.wait_for(page, harness.SERVER_READY, 60, "the local server")
        yield page


def turns(app: harness.RunningApp, pulse: PulseAudio, old: bool) -> dict:
    script = Script()
    for number, text in enumerate(QUESTIONS[:3], start=1):
        script.add(trim(speak(text)), f"q{number}").add(silence(9.0))
    wav = script.write(OUTPUT / "questions.wav")
    with _page(app, wav, pulse) as page, recording(pulse) as capture:
        started = time.time()
        _mic_on(page, old)
        room = harness.mic_opened_at(page)
        time.sleep(max(0.0, script.length_s - (time.time() - room)))
        rows = []
        for number in (1, 2, 3):
            end, until = script.spans[f"q{number}"][1], script.spans[f"q{number}"][1] + 8.0
            sound = capture.first_sound_after(room + end)
            row = {"speech_end_to_sound_s": None if sound is None or sound > room + until else sound - (room + end)}
            if not old and sound is not None:
                decided = next(e["at"] for e in harness.live_events(page, "turn-end") if e["turn"] == number)
                engine = next(
                    e["engineFirstAudio"] for e in harness.live_events(page, "reply-end") if e["turn"] == number
                )
                browser = next(e["sounding"] for e in harness.live_events(page, "sounding") if e["turn"] == number)
                row |= {
                    "decision_after_speech_end_s": decided - (room + end),
                    "engine_first_audio_s": engine,
                    "app_share_s": sound - decided - engine,
                    "browser_estimate_error_s": browser - sound,
                }
            rows.append(row)
        leads = silent_leads(started)
    for number, row in enumerate(rows, start=1):
        row["reply_silent_lead_s"] = leads.get(number)
        if row["speech_end_to_sound_s"] is not None and number in leads:
            row["speech_end_to_reply_start_s"] = row["speech_end_to_sound_s"] - leads[number]
            if "app_share_s" in row:
                row["app_share_s"] -= leads[number]
                row["browser_estimate_error_s"] += leads[number]
    rows = [{key: None if value is None else round(value, 3) for key, value in row.items()} for row in rows]
    heard = [row["speech_end_to_sound_s"] for row in rows if row["speech_end_to_sound_s"] is not None]
    starts = [row["speech_end_to_reply_start_s"] for row in rows if row.get("speech_end_to_reply_start_s") is not None]
    summary = {
        "turns": rows,
        "heard": f"{len(heard)} of {len(rows)}",
        "median_s": round(statistics.median(heard), 3) if heard else None,
        "worst_s": max(heard) if heard else None,
        "reply_start_median_s": round(statistics.median(starts), 3) if starts else None,
        "reply_start_worst_s": max(starts) if starts else None,
    }
    if not old:
        summary["app_share_median_s"] = round(statistics.median(row["app_share_s"] for row in rows), 3)
    return summary


def barge_in(app: harness.RunningApp, pulse: PulseAudio) -> dict:
    story = trim(speak("Tell me a long story about the sea, the ships, the sailors and the storms they met."))
    script = Script().add(story, "story").add(silence(1.9)).add(0.1 * story[: 2 * RATE], "echo").add(silence(0.5))
    script.add(trim(speak("What time is it now?")), "interruption").add(silence(1.0))
    wav = script.write(OUTPUT / "cut-in.wav")
    with _page(app, wav, pulse) as page, recording(pulse) as capture:
        _mic_on(page, old=False)
        room = harness.mic_opened_at(page)
        harness.wait_for(
            page,
            "window.omniLive.state.events.some(e => e.type === 'played' && e.turn === 2)",
            script.length_s + 25,
            "the interrupting question's reply",
        )
        cut_at = room + script.spans["interruption"][0]
        silent = capture.sound_stopped_after(cut_at, quiet_s=0.3)
        flushes = harness.live_events(page, "flush")
        played = harness.live_events(page, "played")
    return {
        "cut_in_to_silence_s": None if silent is None else round(silent - cut_at, 3),
        "echo_interrupted": any(e["at"] < cut_at for e in flushes),
        "interrupting_question_answered": any(e["turn"] == 2 and e["complete"] for e in played),
    }


def gaps(app: harness.RunningApp, pulse: PulseAudio, old: bool, wait_s: float = 14.0) -> dict:
    """A 10 s reply that is never silent while it plays: any silence in it is the player's."""
    words = trim(speak(LONG_QUESTION))
    tone = 0.03 * np.sin(2 * np.pi * 200 * np.arange(len(words)) / RATE)  # -33 dBFS under the speech
    script = Script().add((words + tone).astype(np.float32), "question")
    wav = script.write(OUTPUT / "long-question.wav")
    with _page(app, wav, pulse) as page, recording(pulse) as capture:
        _mic_on(page, old)
        room = harness.mic_opened_at(page)
        time.sleep(max(0.0, script.length_s - (time.time() - room)) + wait_s)
        start = capture.first_sound_after(room + script.spans["question"][1])
        if start is None:
            return {"reply_heard": False}
        if old:
            end = capture.sound_stopped_after(start, quiet_s=1.0)
        else:  # the player says when it has played the reply
            end = next((e["at"] for e in harness.live_events(page, "played")), None)
        found = capture.gaps(start + 0.05, (end or time.time()) - 0.1, threshold_db=-50.0, min_gap_s=0.02)
        result = {
            "reply_s": round(script.spans["question"][1] - script.spans["question"][0], 2),
            "heard_s": None if end is None else round(end - start, 2),
            "gaps_over_20ms": len(found),
            "longest_gap_ms": round(1000 * max((b - a for a, b in found), default=0.0), 1),
            "silent_in_gaps_s": round(sum(b - a for a, b in found), 2),
        }
        if not old:
            first_audio = harness.live_events(page, "first-audio")[0]["at"]
            result |= {
                "stalls": len(harness.live_events(page, "stalled")),
                "first_audio_to_sound_s": round(start - first_audio, 3),
            }
    return result


def slow_model(pulse: PulseAudio, real_time_factor: float) -> dict:
    """The player against a reply that arrives slower than real time (a model on a slow CPU)."""
    from omni_server.echo import EchoEngine
    from tests.servers import serving_engine

    with (
        serving_engine(EchoEngine(real_time_factor=real_time_factor)) as server,
        harness.running_app(OUTPUT / "slow-app.log", "--server-url", server) as app,
    ):
        return {"real_time_factor": real_time_factor} | gaps(app, pulse, old=False, wait_s=20.0)


def tabs(app: harness.RunningApp, pulse: PulseAudio, count: int) -> dict:
    rows, wavs, lengths = [], [], []
    for index in range(count):
        words = trim(speak(" ".join(QUESTIONS[: index + 1])))
        wavs.append(Script().add(words, "q").write(OUTPUT / f"tab-{index + 1}.wav"))
        lengths.append(len(words) / RATE)
    with harness.chromium_pages(wavs, pulse) as opened:
        pages = [page for page, _ in opened]
        for page in pages:
            page.goto(app.url)
            harness.wait_for(page, harness.SERVER_READY, 60, "the local server")
        for page in pages:
            _mic_on(page, old=False)
        for page, spoken in zip(pages, lengths):
            harness.wait_for(page, "window.omniLive.state.events.some(e => e.type === 'played')", 60, "a reply")
            played = harness.live_events(page, "played")
            turns = harness.live_events(page, "turn-end")
            rows.append(
                {
                    "question_s": round(spoken, 2),
                    "utterances_s": [round(e["utterance"], 2) for e in turns],
                    "played": [(round(e["samples"] / 24_000, 2), e["complete"]) for e in played],
                }
            )
    # The echo engine answers with the utterance the app heard, so a tab hears its own reply when what it
    # played is as long as its own utterance (which is shorter than the question where 4 browsers on 2 cores
    # made Chromium drop microphone audio).
    own = all(
        len(row["played"]) == len(row["utterances_s"]) == 1
        and row["played"][0][1]
        and abs(row["played"][0][0] - row["utterances_s"][0]) < 0.05
        for row in rows
    )
    return {"tabs": rows, "each_heard_only_its_own_reply": own}


def cpu(app: harness.RunningApp, pulse: PulseAudio, old: bool, seconds: float, listening_tabs: int) -> dict:
    noise = (np.random.default_rng(1).normal(0, 0.001, round((seconds + 60) * RATE))).astype(np.float32)
    wav = write_wav(OUTPUT / "room-noise.wav", noise)
    with harness.chromium_page(wav, pulse) as (page, _):
        pages = [page] + [page.context.new_page() for _ in range(listening_tabs - 1)]
        for tab in pages:
            tab.goto(app.url)
            harness.wait_for(tab, harness.SERVER_READY, 60, "the local server")
        time.sleep(2.0)
        before = cpu_seconds(app.pid)
        time.sleep(seconds)
        idle = (cpu_seconds(app.pid) - before) / seconds
        for page in pages:
            _mic_on(page, old)
        time.sleep(2.0)
        before = cpu_seconds(app.pid)
        time.sleep(seconds)
        busy = (cpu_seconds(app.pid) - before) / seconds
    return {
        "idle_pages_percent": round(100 * idle, 2),
        "listening_percent": round(100 * busy, 2),
        "per_listening_tab_percent": round(100 * (busy - idle) / listening_tabs, 2),
    }


def hear_cpu(audio_s: float) -> dict:
    """The app's CPU for one listening tab's microphone, without a browser or socket: 32 ms frames of room
    noise through LiveLink.hear (detector, state), timed with the process clock."""
    import live_protocol as wire
    from app import Handlers, Session
    from audio_files import TurnFiles
    from backend import Backend

    session = Session(files=TurnFiles(Path(tempfile.mkdtemp())))
    link = Handlers(Backend(server_url="http://127.0.0.1:9")).open_link(session, lambda message: None)
    noise = np.random.default_rng(2).normal(0, 300, round(audio_s * wire.MIC_SAMPLE_RATE)).astype("<i2")
    frames = [noise[i : i + wire.MIC_FRAME_SAMPLES].tobytes() for i in range(0, len(noise), wire.MIC_FRAME_SAMPLES)]
    link.hear(frames[0])  # the model's first call loads it
    started = time.process_time()
    for frame in frames[1:]:
        link.hear(frame)
    return {"percent_of_one_core": round(100 * (time.process_time() - started) / audio_s, 2)}


@contextmanager
def old_checkout(commit: str) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="omni-old-"))
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(folder), commit], cwd=ROOT, check=True, capture_output=True
    )
    try:
        yield folder
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(folder)], cwd=ROOT, check=False, capture_output=True
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-commit", default="60e4f21", help="the Gradio-microphone path to compare with")
    parser.add_argument("--cpu-seconds", type=float, default=15.0)
    parser.add_argument("--skip-old", action="store_true", help="measure the live path only")
    parser.add_argument("--barge-in-runs", type=int, default=3)
    parser.add_argument(
        "--skip-silence-only",
        action="store_true",
        help="skip the live path's turns with the end-of-turn model missing (silence alone)",
    )
    args = parser.parse_args()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    os.environ[turn_weights.DOWNLOAD_VARIABLE] = "0"  # the apps use the model where it was fetched, or none
    result: dict = {
        "turn_model": str(turn_weights.default_path())
        if turn_weights.is_verified(turn_weights.default_path())
        else None
    }
    with private_pulse() as pulse:
        with harness.running_app(OUTPUT / "live-app.log") as app:
            cut_ins = [barge_in(app, pulse) for _ in range(args.barge_in_runs)]
            stops = [run["cut_in_to_silence_s"] for run in cut_ins if run["cut_in_to_silence_s"] is not None]
            live = {
                "turns": turns(app, pulse, old=False),
                "barge_in": {
                    "runs": cut_ins,
                    "cut_in_to_silence_median_s": statistics.median(stops) if stops else None,
                },
                "gaps": gaps(app, pulse, old=False),
                "tabs": tabs(app, pulse, 4),
                "slow_model": slow_model(pulse, 1.34),
                "cpu_hear_in_process": hear_cpu(30.0),
                "cpu_1_tab": cpu(app, pulse, False, args.cpu_seconds, 1),
                "cpu_4_tabs": cpu(app, pulse, False, args.cpu_seconds, 4),
            }
        result["live"] = live
        print(json.dumps({"live": live}), flush=True)
        if not args.skip_silence_only:
            missing = OUTPUT / "no-turn-model.onnx"
            with harness.running_app(OUTPUT / "silence-app.log", "--turn-model", str(missing)) as app:
                result["live_silence_only"] = {"turns": turns(app, pulse, old=False)}
            result["speech_end_to_sound_median_ratio_model_over_silence"] = round(
                live["turns"]["median_s"] / result["live_silence_only"]["turns"]["median_s"], 3
            )
        if not args.skip_old:
            with (
                old_checkout(args.old_commit) as folder,
                harness.running_app(OUTPUT / "old-app.log", app_dir=folder) as app,
            ):
                result["old"] = {
                    "turns": turns(app, pulse, old=True),
                    "gaps": gaps(app, pulse, old=True),
                    "cpu_1_tab": cpu(app, pulse, True, args.cpu_seconds, 1),
                    "barge_in": "not possible: the microphone is off while a reply plays",
                }
            result["speech_end_to_sound_median_ratio_live_over_old"] = round(
                live["turns"]["median_s"] / result["old"]["turns"]["median_s"], 3
            )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
