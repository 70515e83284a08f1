"""Several conversations at once: what a second and a fourth simultaneous request cost each other.

For each engine, a real omni_server on 127.0.0.1 (in this process, under uvicorn) gets 1, 2 and 4 identical
requests at the same moment through the app's own client (omni_client.stream_reply). Per request: first audio
(send -> first PCM byte) and seconds of reply audio; per level: wall time, aggregate seconds of reply audio
per wall second, and the ratio of that to one request's. Engines:
- echo: the echo engine as the app launches it (4 at once), paced like the model;
- mini-omni-tiny: the mini-omni engine on a tiny recipe checkpoint (built here, no download), its decode
  batched (4 at once on a CPU); "three identical requests at once / serially" is the ratio the batching is
  to bring to <= 0.5.

With --full-size DTYPE..., also the mini-omni engine itself (no HTTP) on full-size recipe weights (built in
a temporary folder, as bench/engine.py does): 1, 2 and 4 requests at once of --steps decode steps each,
with each request's real-time factor and first audio, the aggregate throughput, and the mean batch step
time at each batch size.

With --server-url, the same against a running server, e.g. Serve's proxy in front of 2 echo replicas, beside
the in-process echo server: the ratio of first audio is what the proxy adds.

Usage: python bench/concurrency.py [--levels 1 2 4] [--server-url URL] [--full-size fp32 bf16] [--steps 48]
                                  [--checkpoint DIR]
Prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from omni_client import ReplyAudio, fetch_health, stream_reply, utterance_wav  # noqa: E402
from omni_server.echo import EchoEngine  # noqa: E402
from omni_server.engine import AudioPiece, ChatRequest, Engine  # noqa: E402
from omni_server.mini_omni.engine import MiniOmniEngine  # noqa: E402
from omni_server.mini_omni.generate import prompt_length  # noqa: E402
from omni_server.protocol import OUTPUT_SAMPLE_RATE  # noqa: E402
from tests.mini_omni_helpers import chirp_audio, write_tiny_checkpoint  # noqa: E402
from tests.servers import serving_engine  # noqa: E402


def one_request(url: str, wav: bytes, began: float) -> dict:
    first, samples, pcm = None, 0, bytearray()  # the app's request: stride 4, max_tokens 2048
    for event in stream_reply(url, wav):
        if isinstance(event, ReplyAudio):
            first = first if first is not None else time.perf_counter() - began
            samples += len(event.pcm) // 2
            pcm += event.pcm
    return {
        "first_audio_s": round(first or -1.0, 3),
        "audio_s": round(samples / OUTPUT_SAMPLE_RATE, 2),
        "done_s": round(time.perf_counter() - began, 3),
        "pcm": bytes(pcm),
    }


def in_threads(count: int, request: Callable[[float], dict]) -> tuple[list[dict], float]:
    """`count` calls of `request(began)` on threads started together; their results and the wall seconds."""
    results: list[dict] = [{} for _ in range(count)]
    began = time.perf_counter()

    def run(index: int) -> None:
        results[index] = request(began)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - began


def at_once(url: str, wav: bytes, count: int) -> dict:
    results, wall = in_threads(count, lambda began: one_request(url, wav, began))
    audio = sum(result["audio_s"] for result in results)
    return {
        "requests": count,
        "wall_s": round(wall, 3),
        "audio_s_per_wall_s": round(audio / wall, 3),
        "first_audio_s": sorted(result["first_audio_s"] for result in results),
        "replies_identical": len({result["pcm"] for result in results}) == 1,
    }


def measure(url: str, wav: bytes, levels: list[int]) -> dict:
    one_request(url, wav, time.perf_counter())  # the first call's costs, paid once
    rows = [at_once(url, wav, count) for count in levels]
    serial_began = time.perf_counter()
    for _ in range(3):
        one_request(url, wav, time.perf_counter())
    serial_s = time.perf_counter() - serial_began
    three = at_once(url, wav, 3)
    single = rows[0]["audio_s_per_wall_s"]
    for row in rows:
        row["throughput_vs_one"] = round(row["audio_s_per_wall_s"] / single, 2)
    return {
        "max_batch": fetch_health(url).max_batch,
        "levels": rows,
        "three_at_once_over_serial": round(three["wall_s"] / serial_s, 2),
        "three_at_once_last_first_audio_s": three["first_audio_s"][-1],
        "three_at_once_identical": three["replies_identical"],
    }


def measure_engine(engine: Engine, wav: bytes, levels: list[int]) -> dict:
    with serving_engine(engine) as url:
        return measure(url, wav, levels)


def engine_at_once(engine: MiniOmniEngine, audio: np.ndarray, count: int, steps: int) -> dict:
    """`count` requests of `steps` decode steps each, sent to the engine at the same moment."""
    request = ChatRequest(audio=audio, max_tokens=prompt_length(audio) + 1 + steps)

    def one(began: float) -> dict:
        first, samples = None, 0
        for piece in engine.generate(request):
            if isinstance(piece, AudioPiece):
                first = first if first is not None else time.perf_counter() - began
                samples += len(piece.pcm) // 2
        done = time.perf_counter() - began
        audio_s = round(samples / OUTPUT_SAMPLE_RATE, 2)
        return {"first_audio_s": round(first or -1.0, 2), "audio_s": audio_s, "done_s": done}

    engine.steps.clear()
    results, wall = in_threads(count, one)
    return {
        "requests": count,
        "wall_s": round(wall, 2),
        "audio_s_per_wall_s": round(sum(r["audio_s"] for r in results) / wall, 3),
        "rtf": sorted(round(r["done_s"] / r["audio_s"], 2) for r in results),  # wall from sending / audio
        "first_audio_s": sorted(r["first_audio_s"] for r in results),
        "step_ms_by_batch": {size: round(engine.steps.mean_ms(size) or 0, 1) for size in sorted(engine.steps.counts)},
    }


def measure_full_size(dtypes: list[str], levels: list[int], steps: int, checkpoint: Path | None) -> dict:
    from bench.engine import write_full_checkpoint  # full-size recipe weights, as bench/engine.py builds them

    audio = chirp_audio(2.0)
    result: dict = {"steps": steps, "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="concurrency-full-") as scratch:
        checkpoint = checkpoint or write_full_checkpoint(Path(scratch) / "full")
        for dtype in dtypes:
            engine = MiniOmniEngine(checkpoint, device="cpu", dtype=dtype)
            engine.load(lambda _: None)
            engine_at_once(engine, audio, 1, 8)  # the first call's costs, paid once
            rows = [engine_at_once(engine, audio, count, steps) for count in levels]
            for row in rows:
                row["throughput_vs_one"] = round(row["audio_s_per_wall_s"] / rows[0]["audio_s_per_wall_s"], 2)
            result[dtype] = {"max_batch": engine.max_batch, "levels": rows}
            print(json.dumps({"full_size": result}), flush=True)
            del engine
            gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--server-url", help="also measure this running server (e.g. Serve's proxy)")
    parser.add_argument("--full-size", nargs="*", default=[], metavar="DTYPE", help="also full-size, per dtype")
    parser.add_argument("--steps", type=int, default=48, help="decode steps per full-size request")
    parser.add_argument("--checkpoint", type=Path, help="a full-size checkpoint folder (default: write one)")
    args = parser.parse_args()
    if args.full_size:
        full_size = measure_full_size(args.full_size, args.levels, args.steps, args.checkpoint)
    wav = utterance_wav(chirp_audio(2.0))
    result: dict = {"echo": measure_engine(EchoEngine(), wav, args.levels)}
    print(json.dumps(result), flush=True)
    if args.server_url:
        result["server_url"] = measure(args.server_url, wav, args.levels)
        ratio = result["server_url"]["levels"][0]["first_audio_s"][0] / result["echo"]["levels"][0]["first_audio_s"][0]
        result["server_url_first_audio_over_echo_alone"] = round(ratio, 3)
        print(json.dumps(result), flush=True)
    with tempfile.TemporaryDirectory(prefix="concurrency-") as scratch:
        engine = MiniOmniEngine(write_tiny_checkpoint(Path(scratch) / "tiny"), device="cpu")
        engine.load(lambda _: None)
        result["mini_omni_tiny"] = measure_engine(engine, wav, args.levels)
    if args.full_size:
        result["mini_omni_full_size"] = full_size
    print(json.dumps(result))


if __name__ == "__main__":
    main()
