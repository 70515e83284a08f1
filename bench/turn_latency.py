"""Where pause detection would end each turn in a recording: tune vad.py's options on your own audio.

Feeds a WAV file to vad.PauseDetector in chunks of --chunk-secs at the file's own rate and channels (the live
page sends 0.032 s), restarting the detector after each turn, and reports every turn found:

  speech_start_s  where the handed-on utterance starts (pre-roll included), seconds into the file
  speech_end_s    where the detector judged speech ended (the utterance adds tail_secs after it)
  turn_end_s      end of the chunk on which the turn was declared over: the moment the app would answer
  reason          "pause", or "max_length" for a turn that reached max_utterance_secs

Reading the result: turn_end_s minus the true end of speech is the delay the user feels (about pause_secs plus
up to one chunk). A turn that ends in the middle of a sentence is a cut-off: raise --pause-secs. A turn that
starts on a noise is an extra turn: raise --threshold or --start-secs. A lost first syllable: raise
--pre-roll-secs. In the app, --chunk-secs is the microphone's stream_every.

Prints one line per turn, then one JSON object on the last line:
  {"turns": [{"speech_start_s", "speech_end_s", "turn_end_s", "reason"}, ...], "vad_cpu_ms_per_audio_s": float,
   "audio_s": float, "chunk_secs": float, "options": {...}}

Example:
  python bench/turn_latency.py --wav my_question.wav --chunk-secs 0.5 --pause-secs 0.8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import wave
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vad import VAD_SAMPLE_RATE, PauseDetector, RecordedTurn, VadOptions, turns_in_recording  # noqa: E402

_OPTION_HELP = {
    "start_secs": "seconds of speech before a turn starts (ignores clicks and coughs)",
    "start_gap_secs": "while counting that speech, dips this short do not restart the count",
    "pause_secs": "seconds of silence after speech that end the turn",
    "pre_roll_secs": "seconds kept before the detected start of speech",
    "tail_secs": "seconds kept after the end of speech (at most --pause-secs)",
    "max_utterance_secs": "a turn that never pauses ends at this length",
    "threshold": "silero speech probability that starts or resumes speech",
    "off_threshold": "lower probability that keeps ongoing speech going (hysteresis)",
    "barge_in_threshold": "the app's raised bar for speech over a reply (unused in a recording)",
    "barge_in_secs": "how long speech over a reply must clear that bar (unused in a recording)",
}


def read_wav(path: Path) -> tuple[int, np.ndarray]:
    """(rate, samples) of a PCM WAV: integer samples as stored, shape (frames,) or (frames, channels)."""
    with wave.open(str(path), "rb") as wav:
        rate, channels, width = wav.getframerate(), wav.getnchannels(), wav.getsampwidth()
        raw = wav.readframes(wav.getnframes())
    if width == 3:  # 24-bit: widen to int32, keeping the sign
        bytes3 = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
        samples = (bytes3[:, 0].astype(np.int32) << 8 | bytes3[:, 1].astype(np.int32) << 16 | bytes3[:, 2].astype(np.int32) << 24)
    else:
        samples = np.frombuffer(raw, dtype={1: np.uint8, 2: np.int16, 4: np.int32}[width])
    return rate, samples.reshape(-1, channels) if channels > 1 else samples


def warm_up() -> None:
    """A new process's first model calls are slow (torch prepares the network); keep that out of the timing."""
    detector = PauseDetector()
    noise = np.random.default_rng(0).normal(0, 0.1, VAD_SAMPLE_RATE).astype(np.float32)
    for _ in range(3):
        detector.feed(VAD_SAMPLE_RATE, noise)


def measure(rate: int, samples: np.ndarray, chunk_secs: float, options: VadOptions) -> tuple[list[RecordedTurn], float]:
    """The turns in a recording, and the detector's CPU milliseconds per second of audio (after warm_up)."""
    detector = PauseDetector(options)
    started = time.process_time()
    turns = turns_in_recording(rate, samples, chunk_secs, detector)
    cpu_ms = (time.process_time() - started) * 1000
    return turns, cpu_ms / (len(samples) / rate)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="turn_latency.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--wav", type=Path, required=True, help="PCM WAV file (8/16/24/32-bit, any rate 8-96 kHz, mono or stereo)")
    parser.add_argument("--chunk-secs", type=float, default=0.5, help="chunk length, as the app's stream_every (default 0.5)")
    defaults = VadOptions()
    for field in dataclasses.fields(VadOptions):
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=float,
            default=getattr(defaults, field.name),
            help=f"{_OPTION_HELP[field.name]} (default {getattr(defaults, field.name)})",
        )
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    try:
        options = VadOptions(**{field.name: getattr(args, field.name) for field in dataclasses.fields(VadOptions)})
        rate, samples = read_wav(args.wav)
    except (ValueError, OSError, wave.Error, KeyError) as error:
        sys.exit(
            f"turn_latency.py: cannot use {args.wav}: {error or type(error).__name__}. It takes PCM WAV; convert other "
            "files with: ffmpeg -i INPUT -c:a pcm_s16le OUTPUT.wav"
        )
    warm_up()
    turns, cpu_ms_per_s = measure(rate, samples, args.chunk_secs, options)
    for number, turn in enumerate(turns, 1):
        print(
            f"turn {number}: utterance from {turn.speech_start_s:.2f} s, speech ended {turn.speech_end_s:.2f} s, "
            f"turn over at {turn.turn_end_s:.2f} s ({turn.utterance.reason.value})"
        )
    result = {
        "turns": [
            {
                "speech_start_s": round(turn.speech_start_s, 4),
                "speech_end_s": round(turn.speech_end_s, 4),
                "turn_end_s": round(turn.turn_end_s, 4),
                "reason": turn.utterance.reason.value,
            }
            for turn in turns
        ],
        "vad_cpu_ms_per_audio_s": round(cpu_ms_per_s, 3),
        "audio_s": round(len(samples) / rate, 3),
        "chunk_secs": args.chunk_secs,
        "options": dataclasses.asdict(options),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
