"""CPU cost of pause detection per second of audio, for utterances of 5, 30 and 120 s, side by side.

Both approaches get the same synthesized speech (short pauses only, so the turn never ends) as 48 kHz mono
int16 chunks of 0.5 s, as a browser microphone sends it:

  detector      vad.PauseDetector: each new window scored once, state carried across chunks.
  whole_buffer  the omni-mini Space's way: on every chunk, resample the whole recording so far and rerun
                silero-vad's get_speech_timestamps over all of it with fresh state; the turn ends when
                (duration - speech) > 1 s. Its cost per chunk grows with the recording.

Also reported, as this machine's yardstick: the stock silero model called window by window on 16 kHz audio
(the issue's "silero floor", about 2.5 ms per audio second on the machine it was measured on).

Also the detector fed the live page's 32 ms frames (one window per frame, so the per-call cost is what counts).
The torch models run with one torch thread (what `import silero_vad` sets); the detector runs silero's ONNX
model with one onnxruntime thread.
CPU time is the process's (time.process_time). The machine may be shared and noisy: compare the numbers of one
run with each other. Whole-buffer chunks are independent of each other (fresh state every time), so for long
recordings only every k-th chunk is timed and the sum scaled by k (`whole_buffer_chunk_stride`; --full times all).

Last line: {"detector": {"5": ms, "30": ms, "120": ms}, "whole_buffer": {...}, "stock_silero_window_by_window": ms,
            "detector_32ms_frames": ms,
            "detector_120_vs_5": ratio, "whole_buffer_120_vs_5": ratio,
            "detector_120s_by_20s_segment": [ms, ...] (the 120 s utterance's chunks, median per 20 s), ...}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import soxr
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import silero_vad  # noqa: E402
from turn_latency import APP_CHUNK_SECS, measure  # noqa: E402  (bench/ is on sys.path: it is this script's folder)

from tests.speech import RATE, join, silence, speak, to_int16, trim  # noqa: E402
from vad import PauseDetector, VadOptions  # noqa: E402

LENGTHS = (5, 30, 120)
CHUNK_SECS = 0.5
MIC_RATE = 48_000
ONE_LONG_TURN = VadOptions(max_utterance_secs=10_000)  # max_utterance_secs out of the way: the turn never ends
PHRASES = (
    "so we drove up the coast road in the morning",
    "and stopped at every little harbour along the way",
    "because my brother wanted to see the fishing boats come in",
)


def monologue(seconds: float) -> np.ndarray:
    """`seconds` of speech at 48 kHz int16: phrases with 0.3 s pauses, never long enough to end a turn."""
    voiced = [trim(speak(text)) for text in PHRASES]
    parts, length = [], 0
    while length < seconds * RATE:
        for phrase in voiced:
            parts += [phrase, silence(0.3)]
            length += len(phrase) + len(parts[-1])
    speech = join(*parts)[: round(seconds * RATE)]
    return to_int16(soxr.resample(speech, RATE, MIC_RATE))


def detector_ms_per_s(audio: np.ndarray, chunk_secs: float = CHUNK_SECS) -> tuple[float, int]:
    """CPU ms per audio second of the streaming detector, measured as bench/turn_latency.py does, and the
    turns it ended (0 expected: the whole recording is one turn in progress)."""
    measured = measure(MIC_RATE, audio, chunk_secs, ONE_LONG_TURN, completion=None)
    return measured.cpu_ms_per_audio_s, len(measured.turns)


def detector_cost_along(audio: np.ndarray, segment_secs: float = 20.0) -> list[float]:
    """Median CPU ms per audio second of the chunks in each `segment_secs` of one long utterance: flat if the
    cost of a chunk does not depend on how long the user has been talking."""
    detector = PauseDetector(ONE_LONG_TURN)
    chunk = round(CHUNK_SECS * MIC_RATE)
    costs = []
    for begin in range(0, len(audio), chunk):
        started = time.process_time()
        detector.feed(MIC_RATE, audio[begin : begin + chunk])
        costs.append((time.process_time() - started) * 1000 / CHUNK_SECS)
    per_segment = round(segment_secs / CHUNK_SECS)
    return [round(statistics.median(costs[i : i + per_segment]), 3) for i in range(0, len(costs), per_segment)]


class WholeBufferVad:
    """The whole-buffer approach: everything recomputed from the start of the recording on every chunk."""

    def __init__(self) -> None:
        self._model = silero_vad.load_silero_vad()
        self._chunks: list[np.ndarray] = []

    def append(self, chunk: np.ndarray) -> None:
        self._chunks.append(chunk)

    def turn_is_over(self) -> bool:
        recording = np.concatenate(self._chunks).astype(np.float32) / 32768.0
        audio = soxr.resample(recording, MIC_RATE, RATE)
        self._model.reset_states()
        spans = silero_vad.get_speech_timestamps(torch.from_numpy(audio), self._model, sampling_rate=RATE)
        speech_s = sum(span["end"] - span["start"] for span in spans) / RATE
        return len(audio) / RATE - speech_s > 1.0


def whole_buffer_ms_per_s(audio: np.ndarray, stride: int) -> float:
    vad = WholeBufferVad()
    chunk = round(CHUNK_SECS * MIC_RATE)
    cpu = 0.0
    for number, begin in enumerate(range(0, len(audio), chunk)):
        vad.append(audio[begin : begin + chunk])
        if number % stride == stride - 1:
            started = time.process_time()
            vad.turn_is_over()
            cpu += time.process_time() - started
    return cpu * stride * 1000 / (len(audio) / MIC_RATE)


def stock_window_by_window_ms_per_s(audio: np.ndarray) -> float:
    samples = soxr.resample(audio.astype(np.float32) / 32768.0, MIC_RATE, RATE)
    model = silero_vad.load_silero_vad()
    windows = len(samples) // 512
    started = time.process_time()
    with torch.inference_mode():
        for index in range(windows):
            model(torch.from_numpy(samples[index * 512 : (index + 1) * 512]), RATE)
    return (time.process_time() - started) * 1000 / (windows * 512 / RATE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="detector runs per length; the median is reported")
    parser.add_argument("--full", action="store_true", help="time every whole-buffer chunk (slow: minutes at 120 s)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    audio = {seconds: monologue(seconds) for seconds in LENGTHS}
    detector_ms_per_s(audio[5])  # warm-up: a new process's first model calls are slow
    stock = stock_window_by_window_ms_per_s(audio[30])
    page_frames = statistics.median(detector_ms_per_s(audio[30], APP_CHUNK_SECS)[0] for _ in range(args.repeats))
    runs: dict[int, list[float]] = {seconds: [] for seconds in LENGTHS}
    turns: dict[str, int] = {}
    for _ in range(args.repeats):  # round robin, so a change in the machine's load hits every length alike
        for seconds in LENGTHS:
            cost, turns[str(seconds)] = detector_ms_per_s(audio[seconds])
            runs[seconds].append(cost)
    detector = {str(seconds): round(statistics.median(runs[seconds]), 3) for seconds in LENGTHS}
    along = detector_cost_along(audio[LENGTHS[-1]])
    strides = {str(seconds): 1 if args.full else max(1, seconds // 15) for seconds in LENGTHS}
    whole_buffer = {str(s): round(whole_buffer_ms_per_s(audio[s], strides[str(s)]), 3) for s in LENGTHS}
    for seconds in LENGTHS:
        print(f"{seconds:>4} s: detector {detector[str(seconds)]} ms/s, whole buffer {whole_buffer[str(seconds)]} ms/s")
    print(
        f"stock silero, window by window: {stock:.3f} ms/s; "
        f"the detector on the page's 32 ms frames: {page_frames:.3f} ms/s"
    )
    print(
        json.dumps(
            {
                "detector": detector,
                "whole_buffer": whole_buffer,
                "stock_silero_window_by_window": round(stock, 3),
                "detector_32ms_frames": round(page_frames, 3),
                "detector_120_vs_5": round(detector["120"] / detector["5"], 2),
                "whole_buffer_120_vs_5": round(whole_buffer["120"] / whole_buffer["5"], 2),
                f"detector_{LENGTHS[-1]}s_by_20s_segment": along,
                "detector_turns_ended": turns,
                "whole_buffer_chunk_stride": strides,
                "chunk_secs": CHUNK_SECS,
                "input": f"{MIC_RATE} Hz mono int16",
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
