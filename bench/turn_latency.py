"""Where the app would end each turn in a recording: tune vad.py's options on your own audio.

Feeds a WAV file to vad.PauseDetector in chunks of --chunk-secs at the file's own rate and channels (by default
the live page's 32 ms frames), restarting the detector after each turn, and reports every turn found:

  speech_start_s  where the handed-on utterance starts (pre-roll included), seconds into the file
  speech_end_s    where the detector judged speech ended (the utterance adds tail_secs after it)
  turn_end_s      end of the chunk on which the turn was declared over: the moment the app would answer
  reason          "complete" (the end-of-turn model judged it finished at a pause), "pause" (silence of
                  pause_secs, or fallback_secs with the model on), or "max_length"

With no flags but --wav it runs the app's defaults: the end-of-turn model (end_of_turn.py; its weights are
fetched once as turn_weights.py says) asked at pauses. --no-semantic gives silence alone (pause_secs), so both
can be compared on one file. Reading the result: turn_end_s minus the true end of speech is the delay the user
feels. A turn that ends in the middle of a sentence is a cut-off: raise --completion-threshold (or
--pause-secs without the model). A turn that starts on a noise is an extra turn: raise --threshold or
--start-secs. A lost first syllable: raise --pre-roll-secs. The model's own time per call is reported apart
(the delay above is in audio time; each call adds its milliseconds in the app).

Prints one line per turn, then one JSON object on the last line:
  {"turns": [{"speech_start_s", "speech_end_s", "turn_end_s", "reason"}, ...], "vad_cpu_ms_per_audio_s": float,
   "model_calls": int, "model_ms_per_call": float | null, "audio_s": float, "chunk_secs": float, "options": {...}}

Example:
  python bench/turn_latency.py --wav my_question.wav [--no-semantic] [--completion-threshold 0.7]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from end_of_turn import SharedTurnModel  # noqa: E402
from live_protocol import MIC_FRAME_SAMPLES, MIC_SAMPLE_RATE  # noqa: E402
from vad import VAD_SAMPLE_RATE, CompletionModel, PauseDetector, RecordedTurn, VadOptions, turns_in_recording  # noqa: E402

APP_CHUNK_SECS = MIC_FRAME_SAMPLES / MIC_SAMPLE_RATE  # what the live page sends: 0.032 s

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
    "check_secs": "silence at which the end-of-turn model is first asked",
    "completion_threshold": "the model's probability that ends the turn at a pause",
    "fallback_secs": "silence that ends the turn whatever the model says",
}


def read_wav(path: Path) -> tuple[int, np.ndarray]:
    """(rate, samples) of a PCM WAV: integer samples as stored, shape (frames,) or (frames, channels)."""
    with wave.open(str(path), "rb") as wav:
        rate, channels, width = wav.getframerate(), wav.getnchannels(), wav.getsampwidth()
        raw = wav.readframes(wav.getnframes())
    if width == 3:  # 24-bit: widen to int32, keeping the sign
        bytes3 = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
        samples = (
            bytes3[:, 0].astype(np.int32) << 8
            | bytes3[:, 1].astype(np.int32) << 16
            | bytes3[:, 2].astype(np.int32) << 24
        )
    else:
        samples = np.frombuffer(raw, dtype={1: np.uint8, 2: np.int16, 4: np.int32}[width])
    return rate, samples.reshape(-1, channels) if channels > 1 else samples


def warm_up(completion: CompletionModel | None = None) -> None:
    """A new process's first model calls are slow (torch and onnxruntime prepare); keep that out of the timing."""
    detector = PauseDetector()
    noise = np.random.default_rng(0).normal(0, 0.1, VAD_SAMPLE_RATE).astype(np.float32)
    for _ in range(3):
        detector.feed(VAD_SAMPLE_RATE, noise)
        if completion is not None:
            completion(noise)


@dataclass(frozen=True)
class Measured:
    turns: list[RecordedTurn]
    cpu_ms_per_audio_s: float  # the detector's, model calls included
    model_calls: int
    model_ms: float  # wall time of those calls


def measure(
    rate: int, samples: np.ndarray, chunk_secs: float, options: VadOptions, completion: CompletionModel | None
) -> Measured:
    """The turns in a recording and what finding them cost (after warm_up)."""
    detector = PauseDetector(options, completion)
    started = time.process_time()
    turns = turns_in_recording(rate, samples, chunk_secs, detector)
    cpu_ms = (time.process_time() - started) * 1000
    return Measured(turns, cpu_ms / (len(samples) / rate), detector.model_calls, detector.model_seconds * 1000)


def turn_model() -> CompletionModel:
    """The app's end-of-turn model (fetched on first use), or exit with why it cannot be had."""
    model = SharedTurnModel().load_now()
    if model.problem:
        sys.exit(f"turn_latency.py: {model.problem}. Run with --no-semantic to measure silence alone.")
    return model.completion


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="turn_latency.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--wav", type=Path, required=True, help="PCM WAV file (8/16/24/32-bit, any rate 8-96 kHz, mono or stereo)"
    )
    parser.add_argument(
        "--chunk-secs",
        type=float,
        default=APP_CHUNK_SECS,
        help=f"chunk length (default {APP_CHUNK_SECS}: the live page's frames)",
    )
    parser.add_argument("--no-semantic", action="store_true", help="end turns on silence alone (pause_secs)")
    defaults = VadOptions()
    parser.add_argument(
        "--recheck-secs",
        type=float,
        nargs="*",
        default=list(defaults.recheck_secs),
        help=f"silences at which the model is asked again (default {list(defaults.recheck_secs)})",
    )
    for name, help_text in _OPTION_HELP.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=float,
            default=getattr(defaults, name),
            help=f"{help_text} (default {getattr(defaults, name)})",
        )
    return parser.parse_args(argv)


def options_from(args: argparse.Namespace) -> VadOptions:
    return VadOptions(
        **{name: getattr(args, name) for name in _OPTION_HELP},
        semantic=not args.no_semantic,
        recheck_secs=tuple(args.recheck_secs),
    )


def main() -> None:
    args = parse_args()
    try:
        options = options_from(args)
        rate, samples = read_wav(args.wav)
    except (ValueError, OSError, wave.Error, KeyError) as error:
        sys.exit(
            f"turn_latency.py: cannot use {args.wav}: {error or type(error).__name__}. It takes PCM WAV; convert other "
            "files with: ffmpeg -i INPUT -c:a pcm_s16le OUTPUT.wav"
        )
    completion = turn_model() if options.semantic else None
    warm_up(completion)
    measured = measure(rate, samples, args.chunk_secs, options, completion)
    for number, turn in enumerate(measured.turns, 1):
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
            for turn in measured.turns
        ],
        "vad_cpu_ms_per_audio_s": round(measured.cpu_ms_per_audio_s, 3),
        "model_calls": measured.model_calls,
        "model_ms_per_call": round(measured.model_ms / measured.model_calls, 1) if measured.model_calls else None,
        "audio_s": round(len(samples) / rate, 3),
        "chunk_secs": args.chunk_secs,
        "options": dataclasses.asdict(options),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
