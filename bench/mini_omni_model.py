"""Model-core speed: load, whisper encode, prefill and decode step of the mini-omni GPT (no SNAC, no HTTP).

Usage: python bench/mini_omni_model.py CHECKPOINT_DIR [--dtype float32|bfloat16] [--steps 64] [--requests 2]
CHECKPOINT_DIR holds a recipe checkpoint (`python -m omni_server.mini_omni.recipe DIR --seed 7 --eoa6-gain 0.3
--whisper-fp16`). Prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omni_server.mini_omni import recipe  # noqa: E402
from omni_server.mini_omni.generate import MiniOmniModel, generate_steps, prompt_length  # noqa: E402


def rss_gb() -> tuple[float, float]:
    """(current, peak) resident set size in GB."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return int(fields["VmRSS"].split()[0]) / 1e6, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def test_audio(seconds: float = 1.941375) -> np.ndarray:
    """A deterministic stand-in for output1.wav (same length, so T = 101)."""
    t = np.arange(round(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * (200 + 150 * t) * t)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    folder = args.checkpoint

    began = time.perf_counter()
    model = MiniOmniModel.load(
        folder / recipe.GPT_FILE, folder / recipe.CONFIG_FILE, folder / recipe.WHISPER_FILE, args.device, dtype
    )
    load_s = time.perf_counter() - began
    rss_after_load = rss_gb()[0]

    audio = test_audio()
    max_tokens = prompt_length(audio) + 1 + args.steps
    requests = []
    for _ in range(args.requests):
        began = time.perf_counter()
        generation = generate_steps(model, audio, max_tokens)
        stamps = [time.perf_counter() for _ in generation]
        steps = np.diff(stamps)
        requests.append(
            {
                "whisper_encode_ms": generation.encode_seconds * 1e3,
                "prefill_ms": generation.prefill_seconds * 1e3,
                "first_step_s": stamps[0] - began,
                "decode_steps": len(steps),
                "decode_step_ms_mean": float(steps.mean() * 1e3),
                "decode_step_ms_median": float(statistics.median(steps) * 1e3),
                "decode_step_ms_min": float(steps.min() * 1e3),
                "stop_reason": generation.stop_reason.value,
            }
        )
    print(
        json.dumps(
            {
                "dtype": args.dtype,
                "device": args.device,
                "threads": torch.get_num_threads(),
                "load_s": load_s,
                "rss_after_load_gb": rss_after_load,
                "peak_rss_gb": rss_gb()[1],
                "requests": requests,
            }
        )
    )


if __name__ == "__main__":
    main()
