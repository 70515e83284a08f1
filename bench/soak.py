"""Soak: many turns through the `chat` API while the model server is killed and frozen and bad uploads arrive.

Runs `python app.py --engine echo` (its own temporary folder, under a private TMPDIR), then --clients threads,
each sending --turns questions through gradio_client's `chat` API. On a schedule spread over the run: the
launched model server is killed (SIGKILL) --kills times and frozen (SIGSTOP, then left to the app's watchdog)
--freezes times, and --bad-uploads of the turns send something that is not a question (a WAV whose header says
1 Hz, a 10-minute WAV, an ffconcat script, a text file; and a float WAV full of NaN, which must be answered:
its samples are cleaned to silence).

Every turn ends one of three ways: answered (an MP3 and text), failed with a sentence (gradio_client's AppError
carrying the app's words), or lost (anything else: a timeout, an empty reply to a good question, an error with
no sentence). The target is 0 lost. Memory: the app's and the server's resident set (VmRSS) after a warm-up
and at the end; a killed or frozen server is replaced, so the server's figure is the latest one's.

Prints one JSON object on the last line:
  {"turns", "answered", "failed_with_sentence", "lost", "lost_examples", "bad_uploads_refused",
   "app_rss_mb": {"after_warmup", "end", "growth"}, "server_rss_mb": {...}, "kills", "freezes",
   "files_left", "wall_s"}

    python bench/soak.py [--clients 3] [--turns 100] [--kills 10] [--freezes 5] [--bad-uploads 50]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from tests import browser_harness as harness  # noqa: E402
from tests.speech import float_wav, silence, speak, trim, write_wav  # noqa: E402

OUTPUT = ROOT / "test-output" / "soak"
TURN_TIMEOUT_S = 60.0
CLEANED = "nan.wav"  # the one "bad" upload that must be answered: its NaN samples are cleaned, not refused


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return None
    return None


def server_pid(app_pid: int) -> int | None:
    """The app's launched model server: its child running `-m omni_server`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) == app_pid and b"omni_server" in (entry / "cmdline").read_bytes():
                return int(entry.name)
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return None


def bad_uploads(folder: Path) -> list[Path]:
    """Things that are not a question, each once."""
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "notes.wav"
    text.write_text("these are my notes, not a recording")
    script = folder / "playlist.wav"
    script.write_bytes(b"ffconcat version 1.0\nfile 'question.wav'\n")
    nan_wav = folder / "nan.wav"
    nan_wav.write_bytes(float_wav(np.full(16_000, np.nan, np.float32)))
    return [
        write_wav(folder / "one-hertz.wav", np.zeros(30_000, np.float32), rate=1),
        write_wav(folder / "ten-minutes.wav", np.zeros(600 * 8_000, np.float32), rate=8_000),
        script,
        text,
        nan_wav,
    ]


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.answered = self.failed_with_sentence = self.lost = self.bad_refused = 0
        self.lost_examples: list[str] = []

    def add(self, outcome: str, detail: str = "") -> None:
        with self.lock:
            setattr(self, outcome, getattr(self, outcome) + 1)
            if outcome == "lost" and len(self.lost_examples) < 5:
                self.lost_examples.append(detail[:200])


def client_turns(
    url: str, turns: int, bad_at: set[int], question: Path, bads: list[Path], tally: Tally, downloads: Path
) -> None:
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(url, verbose=False, download_files=str(downloads))
    for number in range(turns):
        bad = number in bad_at
        upload = bads[number % len(bads)] if bad else question
        try:
            job = client.submit(handle_file(str(upload)), api_name="/chat")
            mp3, text = job.result(timeout=TURN_TIMEOUT_S)
        except AppError as error:  # the app's own sentence
            sentence = str(error).strip()
            if bad and upload.name != CLEANED:
                tally.add("bad_refused")
            tally.add("failed_with_sentence" if sentence and "upstream" not in sentence else "lost", sentence)
            continue
        except Exception as error:  # a timeout, a dropped connection: lost
            tally.add("lost", f"{type(error).__name__}: {error}")
            continue
        if bad and upload.name != CLEANED:
            tally.add("lost", f"a bad upload was answered: {upload.name}")
        elif bad:
            tally.add("answered")  # NaN samples are cleaned to silence, and silence is a question
        elif mp3 and Path(mp3).stat().st_size > 0:
            tally.add("answered")
        else:
            tally.add("lost", f"no reply audio for a good question (text {text!r})")


def faults(app_pid: int, kills: int, freezes: int, run_s: float, done: threading.Event, log: list[str]) -> None:
    """Kill and freeze the launched server at even intervals over about `run_s` seconds."""
    schedule = ["kill"] * kills + ["freeze"] * freezes
    random.Random(0).shuffle(schedule)
    interval = run_s / (len(schedule) + 1)
    for fault in schedule:
        if done.wait(interval):
            return
        pid = server_pid(app_pid)
        if pid is None:
            log.append(f"{fault}: no server running")
            continue
        os.kill(pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        log.append(f"{fault} {pid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--turns", type=int, default=100, help="per client")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--freezes", type=int, default=5)
    parser.add_argument("--bad-uploads", type=int, default=50, help="in all, spread over the clients")
    parser.add_argument("--expected-s", type=float, default=400.0, help="the run's length, to spread the faults")
    args = parser.parse_args()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    os.environ["TMPDIR"] = str(tmp)  # the app's own folder goes here, to count what it leaves
    os.environ["OMNI_TURN_MODEL_DOWNLOAD"] = "0"
    os.environ["OMNI_FILE_TTL_S"] = "60"
    question = write_wav(
        OUTPUT / "question.wav",
        np.concatenate([silence(0.2), trim(speak("What is the capital of France?")), silence(0.2)]),
    )
    bads = bad_uploads(OUTPUT / "bad")
    rng = random.Random(1)
    all_turns = [(client, number) for client in range(args.clients) for number in range(args.turns)]
    bad_set = set(rng.sample(all_turns, min(args.bad_uploads, len(all_turns))))
    tally, fault_log = Tally(), []
    started = time.monotonic()
    with harness.running_app(OUTPUT / "app.log") as app:
        # Warm-up: a few questions and each kind of bad upload once, so the baseline holds what any first use
        # of those paths allocates (pools, caches), and the growth after it is what repetition costs.
        warm = threading.Thread(
            target=client_turns,
            args=(app.url, 3 + len(bads), set(range(3, 3 + len(bads))), question, bads, Tally(), tmp / "warm"),
        )
        warm.start()
        warm.join()
        app_rss = {"after_warmup": rss_mb(app.pid)}
        spid = server_pid(app.pid)
        server_rss = {"after_warmup": rss_mb(spid) if spid else None}
        done = threading.Event()
        faulting = threading.Thread(
            target=faults, args=(app.pid, args.kills, args.freezes, args.expected_s, done, fault_log)
        )
        faulting.start()
        clients = [
            threading.Thread(
                target=client_turns,
                args=(
                    app.url,
                    args.turns,
                    {n for c, n in bad_set if c == client},
                    question,
                    bads,
                    tally,
                    tmp / f"client-{client}",
                ),
            )
            for client in range(args.clients)
        ]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        done.set()
        faulting.join()
        app_rss["end"] = rss_mb(app.pid)
        deadline = time.monotonic() + 30  # a server killed or frozen last may still be on its way back
        while server_pid(app.pid) is None and time.monotonic() < deadline:
            time.sleep(0.5)
        spid = server_pid(app.pid)
        server_rss["end"] = rss_mb(spid) if spid else None
        run_dirs = list(tmp.glob("omni-voice-chat-*"))
        files_left = sum(1 for folder in run_dirs for path in folder.rglob("*") if path.is_file())
    for figures in (app_rss, server_rss):
        if figures["after_warmup"] is not None and figures["end"] is not None:
            figures["growth"] = round(figures["end"] - figures["after_warmup"], 1)
    result = {
        "turns": len(all_turns),
        "answered": tally.answered,
        "failed_with_sentence": tally.failed_with_sentence,
        "lost": tally.lost,
        "lost_examples": tally.lost_examples,
        "bad_uploads": len(bad_set),
        "bad_uploads_refused": tally.bad_refused,
        "app_rss_mb": app_rss,
        "server_rss_mb": server_rss,
        "faults": fault_log,
        "files_left_while_running": files_left,
        "files_left_after_exit": sum(1 for path in tmp.glob("omni-voice-chat-*/**/*") if path.is_file()),
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
