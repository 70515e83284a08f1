"""The real model in the page from a cold start, beside the echo engine in the same run.

Each engine gets a fresh `python app.py` (`--engine echo`, then `--engine mini-omni --checkpoint-dir DIR` at
the default dtype) and a real Chromium that opens the page and clicks Start as soon as the page is served,
while the model server is still loading. Its fake microphone asks three espeak-ng questions, the first at
0.5 s, so the first is asked while the model loads; what the page plays is heard through a private
PulseAudio (tests/sound_capture.py). Without --checkpoint, recipe weights of the real size are written to a
temporary folder (bench/engine.py's); no download.

Per engine: the load (app start -> the server line says ready), each turn's outcome (answered: its reply
sounded; failed: the chat says so; lost: neither), whether it waited for the model to load, and speech end ->
first reply sound at the browser's output. Prints one JSON object on the last line.

Usage: python bench/model_in_page.py [--checkpoint DIR] [--gap-s 40]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import turn_weights  # noqa: E402
from bench.engine import with_tokenizer, write_full_checkpoint  # noqa: E402
from tests import browser_harness as harness  # noqa: E402
from tests.sound_capture import PulseAudio, private_pulse, recording  # noqa: E402
from tests.speech import silence, speak, trim  # noqa: E402

RATE = 16_000
OUTPUT = ROOT / "test-output" / "bench"
QUESTIONS = ["What is the capital of France?", "And how many people live there?", "What should I see first?"]


def microphone_file(gap_s: float) -> tuple[Path, list[tuple[float, float]]]:
    """The questions `gap_s` apart (start to start), and where each lies in the file (seconds)."""
    script = harness.Script().add(silence(0.5))
    for number, text in enumerate(QUESTIONS, start=1):
        spoken = trim(speak(text))
        script.add(spoken, f"q{number}").add(silence(gap_s - len(spoken) / RATE))
    spans = [script.spans[f"q{number}"] for number in range(1, len(QUESTIONS) + 1)]
    return script.write(OUTPUT / "model-in-page.wav"), spans


def engine_ready_at(app_log: Path) -> float | None:
    """Wall-clock time of the model server's "engine ready" line in the app's log."""
    for line in app_log.read_text(errors="replace").splitlines():
        if "engine ready:" in line:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp()
    return None


def one_engine(engine_args: tuple[str, ...], pulse: PulseAudio, gap_s: float, log_name: str) -> dict:
    wav, spans = microphone_file(gap_s)
    began = time.time()
    with (
        harness.running_app(OUTPUT / log_name, engine_args=engine_args) as app,
        harness.chromium_page(wav, pulse) as (page, _),
        recording(pulse) as capture,
    ):
        page.goto(app.url)
        page.click("#start")
        harness.wait_for(page, "window.__mic.firstOpenedAt !== null", 30, "the microphone to open")
        room = harness.mic_opened_at(page)
        statuses: list[tuple[float, str]] = []
        end = room + spans[-1][1] + gap_s
        while time.time() < end:
            statuses.append((time.time(), harness.status_text(page)))
            time.sleep(0.2)
        sounding = {e["turn"]: e["sounding"] for e in harness.live_events(page, "sounding")}
        chat = harness.chat_counts(page)["bot_text"]
    ready_at = engine_ready_at(OUTPUT / log_name)
    turns = []
    for number, (_, stop) in enumerate(spans, start=1):
        speech_end = room + stop
        next_start = room + spans[number][0] if number < len(spans) else end
        sound = capture.first_sound_after(speech_end)
        waited = [at for at, line in statuses if speech_end <= at < next_start and "Waiting for the model" in line]
        turns.append(
            {
                "answered": number in sounding,
                "speech_end_to_sound_s": round(sound - speech_end, 3)
                if sound is not None and sound < next_start
                else None,
                "waited_for_the_model_s": round(waited[-1] - waited[0] + 0.2, 1) if waited else 0.0,
                "loading_steps_seen": sorted(
                    {
                        m.group(1)
                        for at, line in statuses
                        if speech_end <= at < next_start
                        for m in [re.search(r"Waiting for the model to load \((.*?)\)", line)]
                        if m
                    }
                ),
            }
        )
    return {
        "app_start_to_engine_ready_s": round(ready_at - began, 2) if ready_at is not None else None,
        "turns": turns,
        "answered": sum(turn["answered"] for turn in turns),
        "failed": len(re.findall(r"failed", chat)),
        "lost": sum(not turn["answered"] for turn in turns),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a full-size checkpoint folder (default: write one)")
    parser.add_argument("--gap-s", type=float, default=40.0, help="seconds from one question's start to the next's")
    args = parser.parse_args()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    os.environ[turn_weights.DOWNLOAD_VARIABLE] = "0"
    result: dict = {"load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="model-in-page-") as scratch, private_pulse() as pulse:
        checkpoint = (
            with_tokenizer(args.checkpoint, Path(scratch))
            if args.checkpoint
            else write_full_checkpoint(Path(scratch) / "checkpoint")
        )
        result["echo"] = one_engine(("--engine", "echo"), pulse, args.gap_s, "model-in-page-echo.log")
        print(json.dumps({"echo": result["echo"]}), flush=True)
        result["mini_omni"] = one_engine(
            ("--engine", "mini-omni", "--checkpoint-dir", str(checkpoint)),
            pulse,
            args.gap_s,
            "model-in-page-mini-omni.log",
        )
    medians = {}
    for name in ("echo", "mini_omni"):
        heard = sorted(t["speech_end_to_sound_s"] for t in result[name]["turns"] if t["speech_end_to_sound_s"])
        medians[name] = heard[len(heard) // 2] if heard else None
    result["speech_end_to_sound_median_s"] = medians
    result["load_average_after"] = os.getloadavg()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
