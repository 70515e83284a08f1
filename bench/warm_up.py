"""What the engine's warm-up buys: the first user's first audio with and without it, beside what it costs.

Each variant runs in a fresh process (first-call costs are per process): load the mini-omni engine without
warming up, then warm up (or not), then send 2 identical requests and time each one's first PCM piece.
Without --checkpoint it writes recipe weights of the real size to a temporary folder (bench/engine.py's).

Usage: python bench/warm_up.py [--checkpoint DIR] [--dtype fp32|bf16] [--device cpu|cuda]
Prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = ("none", "warm_up")


def first_audio_s(engine, audio) -> float:
    from omni_server.engine import AudioPiece, ChatRequest

    began = time.perf_counter()
    pieces = engine.generate(ChatRequest(audio=audio, stream_stride=4, max_tokens=2048))
    try:
        for piece in pieces:
            if isinstance(piece, AudioPiece):
                return time.perf_counter() - began
    finally:
        pieces.close()
    raise RuntimeError("the reply had no audio")


def worker(checkpoint: Path, device: str, dtype: str, variant: str) -> dict:
    from omni_server.mini_omni.engine import MiniOmniEngine
    from tests.mini_omni_helpers import chirp_audio

    engine = MiniOmniEngine(checkpoint, device=device, dtype=dtype)
    began = time.perf_counter()
    engine.warm_up = lambda: None  # load() without its warm-up: timed apart below
    engine.load(lambda _: None)
    result = {"variant": variant, "load_s": round(time.perf_counter() - began, 2)}
    began = time.perf_counter()
    if variant == "warm_up":
        MiniOmniEngine.warm_up(engine)
    result["warm_up_s"] = round(time.perf_counter() - began, 2)
    audio = chirp_audio(2.0)
    result["first_audio_s"] = [round(first_audio_s(engine, audio), 3) for _ in range(2)]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a full-size checkpoint folder (default: write one)")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2, help="each variant this many times, interleaved")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.checkpoint, args.device, args.dtype, args.worker)))
        return
    from bench.engine import with_tokenizer, write_full_checkpoint

    with tempfile.TemporaryDirectory(prefix="warm-up-bench-") as scratch:
        checkpoint = (
            with_tokenizer(args.checkpoint, Path(scratch))
            if args.checkpoint
            else write_full_checkpoint(Path(scratch) / "checkpoint")
        )
        runs = []
        for _ in range(args.rounds):
            for variant in VARIANTS:
                command = [
                    sys.executable,
                    __file__,
                    "--worker",
                    variant,
                    "--checkpoint",
                    str(checkpoint),
                    "--dtype",
                    args.dtype,
                    "--device",
                    args.device,
                ]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(runs[-1]), flush=True)
    summary = {}
    for variant in VARIANTS:  # medians over rounds: this is a noisy, shared machine
        mine = [run for run in runs if run["variant"] == variant]
        summary[variant] = {
            "warm_up_s": statistics.median(run["warm_up_s"] for run in mine),
            "first_request_first_audio_s": statistics.median(run["first_audio_s"][0] for run in mine),
            "first_minus_second_request_s": round(
                statistics.median(run["first_audio_s"][0] - run["first_audio_s"][1] for run in mine), 3
            ),
        }
    print(json.dumps({"dtype": args.dtype, "device": args.device, "runs": runs, "summary": summary}))


if __name__ == "__main__":
    main()
