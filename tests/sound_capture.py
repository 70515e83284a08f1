"""Hear what a headless Chromium plays, on the wall clock, so browser tests can check when sound starts and stops.

A private PulseAudio daemon (socket, HOME, runtime dir and cookie in a temp folder) has one sink, the null sink `cap`,
hence the default one: a Chromium launched with `PulseAudio.chromium_launch_kwargs()` plays into it, and `parec`
records its monitor as 16 kHz mono int16, read in 10 ms blocks.

Timing. Each sample's wall time (`time.time()`: the clock `Date.now()` reads in the page) is the recording's start
plus its index / 16 kHz. The start is the earliest-arriving block's read time minus the audio before it: a read comes
a few ms late, up to ~70 ms on a busy 2-core machine, never early, so the earliest is the truest. Onsets (early) and
stops (late) are found per 10 ms block, so off by up to 10 ms each; gaps per sample. A sound is placed within about
20 ms of when it reached PulseAudio (a pacat write is heard 11 ms later); Chromium's output path adds ~20-25 ms.

Enter `recording` before the page plays: while nobody listens the null sink renders 2 s ahead, so the recording
first waits (up to 2 s) for its first block; from then on, and while it runs, the sink works in 10 ms steps.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from tests import processes

RATE = 16_000
BLOCK = 160  # samples: 10 ms
BLOCK_S = BLOCK / RATE
SINK = "cap"


def pulse_tools_missing() -> str | None:
    """Why sound cannot be captured here (a binary is missing), or None: lets tests skip with a reason."""
    missing = [tool for tool in ("pulseaudio", "pactl", "parec") if shutil.which(tool) is None]
    return f"{', '.join(missing)} not installed (apt-get install pulseaudio pulseaudio-utils)" if missing else None


@dataclass(frozen=True)
class PulseAudio:
    """A running private daemon, reached through its socket."""

    socket: Path

    @property
    def env(self) -> dict[str, str]:
        """For a client's environment: this server, and the cookie and runtime dir that libpulse would otherwise
        create under $HOME (and /tmp) kept in the daemon's folder."""
        folder = self.socket.parent
        return {
            "PULSE_SERVER": f"unix:{self.socket}",
            "PULSE_COOKIE": str(folder / "cookie"),
            "PULSE_RUNTIME_PATH": str(folder / "runtime"),
        }

    def chromium_launch_kwargs(self) -> dict[str, object]:
        """For `playwright.chromium.launch`: unmuted (Playwright mutes by default), playing into this daemon."""
        return {"ignore_default_args": ["--mute-audio"], "env": {**os.environ, **self.env}}


@contextmanager
def private_pulse(timeout_s: float = 10.0) -> Iterator[PulseAudio]:
    """Start a daemon that touches nothing outside a temp folder, wait until it answers, stop it at exit."""
    with tempfile.TemporaryDirectory(prefix="pulse-") as folder:
        pulse = PulseAudio(Path(folder) / "socket")
        # As root pulseaudio just warns, but it writes a cookie and a runtime link under $HOME: a private HOME.
        env = {**os.environ, "HOME": folder, "XDG_RUNTIME_DIR": folder, **pulse.env}
        log = Path(folder) / "daemon.log"
        with open(log, "wb") as output:
            daemon = subprocess.Popen(
                [
                    "pulseaudio",
                    "-n",
                    "--daemonize=no",
                    "--exit-idle-time=-1",
                    "--use-pid-file=no",
                    f"--load=module-native-protocol-unix socket={pulse.socket} auth-anonymous=1",
                    f"--load=module-null-sink sink_name={SINK}",
                ],
                env=env,
                stdout=output,
                stderr=output,
            )
        try:
            deadline = time.monotonic() + timeout_s
            while subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode:
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"PulseAudio did not answer within {timeout_s} s:\n{log.read_text()}")
                time.sleep(0.05)
            yield pulse
        finally:
            processes.end(daemon, grace_s=5)


class Recording:
    """Everything the sink played since the recording began, each sample on the wall clock (see the module doc)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pcm = bytearray()
        self._start = float("inf")  # wall time of sample 0

    def _read(self, stream: IO[bytes]) -> None:
        """Runs in a thread until parec stops: keeps each block and refines the start."""
        while len(block := stream.read(BLOCK * 2)) == BLOCK * 2:
            now = time.time()
            with self._lock:
                self._pcm += block
                self._start = min(self._start, now - len(self._pcm) / 2 / RATE)

    def _snapshot(self) -> tuple[float, np.ndarray]:
        with self._lock:
            return self._start, np.frombuffer(bytes(self._pcm), dtype="<i2")

    def blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """Start times (wall clock) and RMS levels (dBFS, -120 for digital silence) of the 10 ms blocks so far."""
        start, samples = self._snapshot()
        count = len(samples) // BLOCK
        return start + np.arange(count) * BLOCK_S, _db(samples[: count * BLOCK].reshape(count, BLOCK))

    def samples_between(self, start_wall: float, end_wall: float) -> np.ndarray:
        """The int16 samples that played from `start_wall` up to `end_wall`."""
        start, samples = self._snapshot()
        return samples[_index(start_wall, start, samples) : _index(end_wall, start, samples)]

    def level_db(self, start_wall: float, end_wall: float) -> float:
        """RMS level (dBFS) of what played in the span."""
        samples = self.samples_between(start_wall, end_wall)
        if not len(samples):
            raise ValueError(f"nothing was recorded between {start_wall:.3f} and {end_wall:.3f}")
        return float(_db(samples))

    def first_sound_after(self, wall_time: float, threshold_db: float = -50.0) -> float | None:
        """Start of the first block louder than the threshold, from the one holding `wall_time` on; None yet."""
        starts, levels = self.blocks()
        loud = np.flatnonzero((starts + BLOCK_S > wall_time) & (levels > threshold_db))
        return float(starts[loud[0]]) if len(loud) else None

    def sound_stopped_after(self, wall_time: float, quiet_s: float = 0.2, threshold_db: float = -50.0) -> float | None:
        """Start of the first `quiet_s` of quiet blocks, from the one holding `wall_time` on; None yet."""
        starts, levels = self.blocks()
        run = 0
        for index in np.flatnonzero(starts + BLOCK_S > wall_time):
            run = run + 1 if levels[index] <= threshold_db else 0
            if run >= round(quiet_s / BLOCK_S):
                return float(starts[index - run + 1])
        return None

    def gaps(
        self, start_wall: float, end_wall: float, threshold_db: float = -50.0, min_gap_s: float = 0.02
    ) -> list[tuple[float, float]]:
        """(start, end) of each stretch of at least `min_gap_s` in the span where every sample is below threshold.

        Sample-exact, and meant for tonal or continuous test signals: speech has quiet moments of its own.
        """
        start, samples = self._snapshot()
        first = _index(start_wall, start, samples)
        span = samples[first : _index(end_wall, start, samples)].astype(np.int32)
        quiet = np.abs(span) < 32768 * 10 ** (threshold_db / 20)
        edges = first + np.flatnonzero(np.diff(np.concatenate(([0], quiet.astype(np.int8), [0]))))
        return [
            (float(start + begin / RATE), float(start + end / RATE))
            for begin, end in zip(edges[::2], edges[1::2])
            if end - begin >= min_gap_s * RATE
        ]

    def save_wav(self, path: Path | str) -> None:
        """The whole recording as a 16 kHz mono WAV, to listen to when a test fails."""
        with wave.open(str(path), "wb") as out:
            out.setparams((1, 2, RATE, 0, "NONE", "not compressed"))
            out.writeframes(self._snapshot()[1].tobytes())


def _index(wall_time: float, start: float, samples: np.ndarray) -> int:
    """Index of the first sample at or after `wall_time`, within the recording."""
    return int(np.clip(np.ceil((wall_time - start) * RATE), 0, len(samples)))


def _db(samples: np.ndarray) -> np.ndarray:
    """RMS level in dBFS along the last axis, -120 for digital silence rather than -inf."""
    rms = np.sqrt(np.mean(np.square(samples, dtype=np.float64), axis=-1)) / 32768
    return np.maximum(20 * np.log10(np.maximum(rms, 1e-12)), -120.0)


@contextmanager
def recording(pulse: PulseAudio, timeout_s: float = 5.0) -> Iterator[Recording]:
    """Record the sink with parec: returns once audio flows (see the module doc), stops parec at exit."""
    parec = subprocess.Popen(
        [
            "parec",
            "-d",
            f"{SINK}.monitor",
            "--raw",
            "--format=s16le",
            f"--rate={RATE}",
            "--channels=1",
            "--latency-msec=10",
        ],
        env={**os.environ, **pulse.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    heard = Recording()
    reader = threading.Thread(target=heard._read, args=(parec.stdout,), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not len(heard.blocks()[0]):
            if parec.poll() is not None or time.monotonic() > deadline:
                parec.kill()
                raise RuntimeError(f"parec recorded nothing within {timeout_s} s: {parec.stderr.read().decode()}")
            time.sleep(0.01)
        yield heard
    finally:
        parec.terminate()
        parec.wait()
        reader.join()
