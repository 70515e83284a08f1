"""Seams between streamed pieces: the reference's independent windows vs the default mode's context decode.

Usage: python bench/mini_omni_seams.py [--stride 4] [--threads N] [--shared ../shared]
Feeds golden case A's token lists (or, without ../shared, random codes) through both streamers with the
recipe SNAC (seed 1234) and SNAC noise zero, and compares each with one whole-utterance decode:
- `max_dev_lsb`: the largest |piece sample − whole-decode sample|, in int16 steps;
- `boundary_jump_ratio`: |x[b] − x[b−1]| at each piece boundary b over the median |x[i] − x[i−1]| of the
  whole decode (1 ≈ an ordinary step; the recipe SNAC's audio is noise-like, so real speech would show
  boundary clicks more plainly than this ratio does);
- SNAC milliseconds per piece for each streamer, side by side in this run.
Prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omni_server.mini_omni.codec import (  # noqa: E402
    FRAME_SAMPLES,
    ReferenceStreamer,
    SeamlessStreamer,
    SnacCodec,
    ZeroNoise,
    pcm_rounded,
)
from omni_server.mini_omni.recipe import write_snac  # noqa: E402
from tests.mini_omni_helpers import all_frames, golden_steps  # noqa: E402


def token_steps(shared: Path) -> tuple[str, list[tuple[int, ...]]]:
    golden = shared / "mini-omni" / "golden" / "golden_A.json"
    if golden.is_file():
        return "golden_A", golden_steps(json.loads(golden.read_text()))
    rng = np.random.default_rng(0)
    return "random", [tuple(int(a) for a in rng.integers(0, 4096, 7)) for _ in range(43)]


def run(streamer, steps) -> tuple[list[np.ndarray], list[float]]:
    pieces, seconds = [], []
    for audio in [*steps, None]:
        began = time.perf_counter()
        produced = list(streamer.push(audio) if audio is not None else streamer.finish())
        if produced:
            seconds.append(time.perf_counter() - began)
        pieces += [np.frombuffer(p, dtype="<i2").astype(np.int64) for p in produced]
    return pieces, seconds


def seam_facts(pieces: list[np.ndarray], whole: np.ndarray, seconds: list[float]) -> dict:
    joined = np.concatenate(pieces)
    typical = float(np.median(np.abs(np.diff(whole))))
    bounds = np.cumsum([len(p) for p in pieces])[:-1]
    jumps = [abs(int(joined[b]) - int(joined[b - 1])) / typical for b in bounds]
    return {
        "pieces": len(pieces),
        "samples": int(len(joined)),
        "max_dev_lsb": int(np.abs(joined - whole[: len(joined)]).max()),
        "max_dev_lsb_within_64_of_boundary": int(
            max(np.abs(joined[b - 64 : b + 64] - whole[b - 64 : b + 64]).max() for b in bounds)
        ),
        "boundary_jump_ratio_max": round(max(jumps), 2),
        "boundary_jump_ratio_mean": round(statistics.mean(jumps), 2),
        "snac_ms_per_piece_median": round(1000 * statistics.median(seconds), 1),
        "snac_ms_total": round(1000 * sum(seconds), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parent.parent.parent / "shared")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source, steps = token_steps(args.shared)
    with tempfile.TemporaryDirectory() as folder:
        write_snac(Path(folder) / "snac", 1234)
        codec = SnacCodec.load(Path(folder) / "snac")
    frames = all_frames(steps)
    whole_float = codec.decode(frames, 0, ZeroNoise())
    whole = np.frombuffer(pcm_rounded(whole_float), dtype="<i2").astype(np.int64)
    reference_pieces, reference_seconds = run(ReferenceStreamer(codec, args.stride, ZeroNoise()), steps)
    default_pieces, default_seconds = run(SeamlessStreamer(codec, args.stride, ZeroNoise()), steps)
    result = {
        "tokens": source,
        "stride": args.stride,
        "frames": len(frames),
        "whole_decode_samples": int(len(whole)),
        "typical_step_lsb": float(np.median(np.abs(np.diff(whole)))),
        "reference": seam_facts(reference_pieces, whole, reference_seconds),
        "default": seam_facts(default_pieces, whole, default_seconds),
        "frame_ms": FRAME_SAMPLES / 24,
        "torch_threads": args.threads,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
