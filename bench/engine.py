"""The mini-omni engine end to end on the full-size config: load, whisper, prefill, steps, first PCM piece.

Usage: python bench/engine.py [--checkpoint DIR] [--device cpu|cuda] [--steps 64] [--requests 2]
                              [--dtypes fp32 bf16] [--threads N]

Without --checkpoint, writes recipe weights of the real size (docs/mini-omni.md §2-§3, §15: seed 7, eoa gain 0.3,
whisper-small in fp16, SNAC, a word tokenizer) to a temporary folder outside the repo; no download. Each
precision runs in its own subprocess so its peak RSS is its own. With ../shared present it also reports
bench/mini_omni_bf16_agreement.py (golden-A steps that bf16 keeps identical to fp32). Prints one JSON object
on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from omni_server.engine import AudioPiece, ChatRequest  # noqa: E402
from omni_server.mini_omni import recipe  # noqa: E402
from omni_server.mini_omni.batch import generate_steps  # noqa: E402
from omni_server.mini_omni.checkpoint import TOKENIZER_FILE  # noqa: E402
from omni_server.mini_omni.config import WHISPER_SMALL, real_config  # noqa: E402
from omni_server.mini_omni.engine import MiniOmniEngine  # noqa: E402
from omni_server.mini_omni.generate import prompt_length  # noqa: E402
from tests.mini_omni_helpers import chirp_audio, word_tokenizer  # noqa: E402

SPEED_SEED = 7
OUTPUT1_SECONDS = 31062 / 16000  # the golden input's length: prompt T = 101 (docs/mini-omni.md §15)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def rss_gb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1e6


# ------------------------------------------------------------------------------------------ worker


def measure(checkpoint: Path, device: str, dtype: str, steps: int, requests: int, stride: int) -> dict:
    """One precision in this process: load (with its phases), then `requests` identical requests."""
    marks: dict[str, float] = {}
    began = time.perf_counter()
    engine = MiniOmniEngine(checkpoint, device=device, dtype=dtype)
    engine.load(lambda stage: marks.setdefault(stage, time.perf_counter() - began))
    load_s = time.perf_counter() - began
    rss_after_load = rss_gb()

    audio = chirp_audio(OUTPUT1_SECONDS)
    max_tokens = prompt_length(audio) + 1 + steps
    replies = []
    for _ in range(requests):
        request = ChatRequest(audio=audio, stream_stride=stride, max_tokens=max_tokens, stream_text=True)
        engine.check(request)
        started = time.perf_counter()
        first_piece = None
        for piece in engine.generate(request):
            if first_piece is None and isinstance(piece, AudioPiece):
                first_piece = time.perf_counter() - started
        stats = engine.last_reply
        model_only = model_step_ms(engine, audio, max_tokens)
        replies.append(
            {
                "model_only_ms_per_decode_step": model_only,
                "first_pcm_s": round(first_piece, 3),
                "whisper_encode_ms": round(1000 * stats.encode_s, 1),
                "prefill_ms": round(1000 * stats.prefill_s, 1),
                "decode_steps": stats.decode_steps,
                "ms_per_decode_step": round(1000 * stats.decode_s / stats.decode_steps, 1),
                "snac_ms_per_step": round(1000 * stats.snac_s / stats.decode_steps, 1),
                "audio_s": round(stats.audio_seconds, 3),
                "total_s": round(stats.total_s, 3),
                "real_time_factor": round(stats.total_s / stats.audio_seconds, 3),
                "stop": stats.stop,
            }
        )
    return {
        "device": str(engine.device),
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "load_s": round(load_s, 2),
        "load_phases_s": {k: round(v, 2) for k, v in marks.items()},
        "rss_after_load_gb": round(rss_after_load, 2),
        "peak_rss_gb": round(peak_rss_gb(), 2),
        **cuda_memory(engine.device),
        "prompt_positions": prompt_length(audio),
        "stream_stride": stride,
        "requests": replies,
        "median": {
            key: statistics.median(r[key] for r in replies)
            for key in (
                "first_pcm_s",
                "whisper_encode_ms",
                "prefill_ms",
                "ms_per_decode_step",
                "model_only_ms_per_decode_step",
                "snac_ms_per_step",
                "real_time_factor",
            )
        },  # fmt: skip
    }


def model_step_ms(engine: MiniOmniEngine, audio, max_tokens: int) -> float:
    """The same decode steps with the model alone (no SNAC, no text), right after the engine's reply: the
    side-by-side check that the engine adds nothing to a step on this (shared, noisy) machine."""
    steps = iter(generate_steps(engine.model, audio, max_tokens))
    next(steps)  # whisper and prefill
    began = time.perf_counter()
    count = sum(1 for _ in steps)
    return round(1000 * (time.perf_counter() - began) / count, 1)


def cuda_memory(device: torch.device) -> dict:
    """Peak GPU memory, where the model runs on one (host RSS says little there)."""
    if device.type != "cuda":
        return {}
    return {"cuda_peak_allocated_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2)}


# --------------------------------------------------------------------------------------- controller


def write_full_checkpoint(directory: Path) -> Path:
    recipe.write_checkpoint(
        directory,
        real_config(),
        WHISPER_SMALL,
        SPEED_SEED,
        recipe=recipe.GPTRecipe(eoa6_gain=0.3),
        whisper_dtype=torch.float16,
    )
    word_tokenizer(directory / TOKENIZER_FILE)
    return directory


def with_tokenizer(checkpoint: Path, scratch: Path) -> Path:
    """`checkpoint` itself if it has a tokenizer, else a folder of links to its files plus a word tokenizer."""
    if (checkpoint / TOKENIZER_FILE).is_file():
        return checkpoint
    linked = scratch / "linked"
    linked.mkdir()
    for item in checkpoint.iterdir():
        (linked / item.name).symlink_to(item.resolve())
    word_tokenizer(linked / TOKENIZER_FILE)
    return linked


def golden_bf16_agreement(shared: Path) -> dict | None:
    """bench/mini_omni_bf16_agreement.py's answer: golden-A steps that bf16 keeps identical to fp32."""
    if not (shared / "mini-omni" / "golden").is_dir():
        return None
    command = [sys.executable, str(REPO / "bench" / "mini_omni_bf16_agreement.py"), str(shared)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_worker(checkpoint: Path, dtype: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", "--checkpoint", str(checkpoint), "--device", args.device,
               "--dtypes", dtype,
               "--steps", str(args.steps), "--requests", str(args.requests), "--stride", str(args.stride),
               "--threads", str(args.threads)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        return {"dtype": dtype, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a full-size checkpoint folder (default: write one)")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu", help="cpu (the default, as the issue's targets) or cuda")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per worker")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.checkpoint, args.device, args.dtypes[0], args.steps, args.requests, args.stride)))
        return

    result: dict = {"load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="mini-omni-bench-") as scratch:
        if args.checkpoint:
            checkpoint = with_tokenizer(args.checkpoint, Path(scratch))
        else:
            began = time.perf_counter()
            checkpoint = write_full_checkpoint(Path(scratch) / "checkpoint")
            result["write_checkpoint_s"] = round(time.perf_counter() - began, 1)
        for dtype in args.dtypes:
            result[dtype] = run_worker(checkpoint, dtype, args)
    result["golden_A_bf16_vs_fp32"] = golden_bf16_agreement(args.shared)
    result["load_average_after"] = os.getloadavg()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
