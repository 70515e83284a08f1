"""Finding (and where needed downloading) the files mini-omni runs on (docs/mini-omni.md §2).

A checkpoint directory holds `lit_model.pth`, `model_config.yaml` and `tokenizer.json`. The whisper-small
encoder comes from the directory's `small.pt` when present, else from openai-whisper's own download (cached
in ~/.cache/whisper, checked against the sha256 in its URL; `OMNI_WHISPER_URL` names a mirror). SNAC comes
from the directory's `snac_24khz/` when present, else from the Hub. With no directory, or a missing or empty
one, `gpt-omni/mini-omni` is downloaded from the Hub. Every download reports "downloading NAME: X of Y MB".
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omni_server.mini_omni.codec import SNAC_HUB_REPO

MINI_OMNI_HUB_REPO = "gpt-omni/mini-omni"
GPT_FILE = "lit_model.pth"
CONFIG_FILE = "model_config.yaml"
TOKENIZER_FILE = "tokenizer.json"
WHISPER_FILE = "small.pt"
SNAC_DIR = "snac_24khz"
SNAC_FILES = ("config.json", "pytorch_model.bin")

# openai-whisper's multilingual "small" checkpoint; the path segment before the file name is its sha256.
WHISPER_SMALL_URL = (
    "https://openaipublic.azureedge.net/main/whisper/models/"
    "9ecf779972d90ba49c06d968637d720dd632c55bbf19d441fb42bf17a411e794/small.pt"
)
WHISPER_URL_VARIABLE = "OMNI_WHISPER_URL"  # a mirror of that file, for machines that cannot reach openai's CDN
PROGRESS_EVERY_S = 1.0

Progress = Callable[[str], None]


@dataclass(frozen=True)
class CheckpointFiles:
    gpt: Path
    config: Path
    tokenizer: Path
    whisper: Path
    snac: Path  # a folder with config.json and pytorch_model.bin


class CheckpointError(FileNotFoundError):
    """The checkpoint directory lacks a file the model needs."""


def locate(checkpoint_dir: Path | None, progress: Progress) -> CheckpointFiles:
    """All model files, downloading what is neither in `checkpoint_dir` nor cached (reporting "downloading").

    No directory: the Hub's copy in the Hugging Face cache. A directory that does not exist or is empty is
    filled from the Hub (as the reference fills `./checkpoint`); one with other files is used as it is."""
    if checkpoint_dir is None or not Path(checkpoint_dir).is_dir() or not any(Path(checkpoint_dir).iterdir()):
        progress("downloading")
        checkpoint_dir = download_mini_omni(checkpoint_dir, progress)
    directory = Path(checkpoint_dir)
    missing = [name for name in (GPT_FILE, CONFIG_FILE, TOKENIZER_FILE) if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint directory {directory} lacks {', '.join(missing)}")
    return CheckpointFiles(
        gpt=directory / GPT_FILE,
        config=directory / CONFIG_FILE,
        tokenizer=directory / TOKENIZER_FILE,
        whisper=_whisper_file(directory, progress),
        snac=_snac_folder(directory, progress),
    )


def _whisper_file(directory: Path, progress: Progress) -> Path:
    local = directory / WHISPER_FILE
    if local.is_file():
        return local
    url = whisper_url()
    cached = whisper_cache_dir() / Path(url).name
    if cached.is_file() and _sha256(cached) == _expected_sha256(url):
        return cached
    return download_verified(url, cached, progress)


def _snac_folder(directory: Path, progress: Progress) -> Path:
    local = directory / SNAC_DIR
    if all((local / name).is_file() for name in SNAC_FILES):
        return local
    return hub_download(SNAC_HUB_REPO, progress, allow_patterns=list(SNAC_FILES))


def download_mini_omni(local_dir: Path | None = None, progress: Progress = lambda _: None) -> Path:
    """`gpt-omni/mini-omni` from the Hub: into `local_dir`, or the Hugging Face cache when None."""
    return hub_download(MINI_OMNI_HUB_REPO, progress, local_dir=local_dir)


def hub_download(
    repo: str, progress: Progress, *, local_dir: Path | None = None, allow_patterns: list[str] | None = None
) -> Path:
    """`snapshot_download` with byte progress. The Hub's progress bars are terminal widgets (and xet reports
    elsewhere), so the total comes from a dry run's file sizes and the bytes so far from the folder's growth."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.file_download import repo_folder_name

    plan = snapshot_download(repo, local_dir=local_dir, allow_patterns=allow_patterns, dry_run=True)
    total = sum(file.file_size or 0 for file in plan if file.will_download)
    folder = (
        Path(local_dir)
        if local_dir is not None
        else (Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model"))
    )
    with folder_growth(folder, repo.split("/")[-1], total, progress, PROGRESS_EVERY_S):
        return Path(snapshot_download(repo, local_dir=local_dir, allow_patterns=allow_patterns))


@contextmanager
def folder_growth(folder: Path, name: str, total: int, progress: Progress, every_s: float) -> Iterator[None]:
    """While the body runs, report the bytes `folder` has gained ("downloading NAME: X of Y MB") whenever
    the megabyte count changes, checking every `every_s`; the last line is said when the body ends."""
    start = _bytes_in(folder)
    said: list[str] = []

    def report() -> None:
        line = download_line(name, _bytes_in(folder) - start, total)
        if not said or said[-1] != line:
            said.append(line)
            progress(line)

    done = threading.Event()

    def watch() -> None:
        while not done.wait(every_s):
            report()

    report()
    watcher = threading.Thread(target=watch, name="download-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
    report()


def download_line(name: str, done: int, total: int) -> str:
    """The progress line: "downloading NAME: X of Y MB", or "X MB" when the total is unknown (0)."""
    of_total = f" of {total / 1e6:.0f} MB" if total else " MB"
    return f"downloading {name}: {max(0, done) / 1e6:.0f}{of_total}"


def _bytes_in(folder: Path) -> int:
    """Bytes of the regular files under `folder` (symlinks, as in the Hub cache's snapshots, not counted)."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            try:
                if not os.path.islink(path):
                    total += os.path.getsize(path)
            except OSError:  # a part file renamed or removed under us
                pass
    return total


def whisper_url() -> str:
    """Where whisper-small is downloaded from: `OMNI_WHISPER_URL` (a mirror) or openai's CDN. Either way the
    URL's last folder is the file's sha256, which the download is checked against."""
    url = os.environ.get(WHISPER_URL_VARIABLE) or WHISPER_SMALL_URL
    digest = _expected_sha256(url)
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise CheckpointError(f"{WHISPER_URL_VARIABLE} must end in /<sha256 of the file>/small.pt, got {url}")
    return url


def whisper_cache_dir() -> Path:
    """Where openai-whisper keeps its models, so a copy it already downloaded is reused."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "whisper"


def download_verified(url: str, target: Path, progress: Progress = lambda _: None) -> Path:
    """Download `url` to `target` via a temporary file, keeping it only if its sha256 matches the URL's;
    `progress` hears "downloading NAME: X of Y MB" at the start, every PROGRESS_EVERY_S and at the end."""
    expected = _expected_sha256(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    name = Path(url).name
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as part:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                total = int(response.headers.get("Content-Length") or 0)
                done, said_at = 0, time.monotonic()
                progress(download_line(name, done, total))
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    part.write(chunk)
                    done += len(chunk)
                    if time.monotonic() - said_at >= PROGRESS_EVERY_S:
                        progress(download_line(name, done, total))
                        said_at = time.monotonic()
                progress(download_line(name, done, total))
        except BaseException:
            os.unlink(part.name)
            raise
    if digest.hexdigest() != expected:
        os.unlink(part.name)
        raise OSError(f"download of {url} has sha256 {digest.hexdigest()}, expected {expected}")
    os.replace(part.name, target)
    return target


def _expected_sha256(url: str) -> str:
    return url.rsplit("/", 2)[-2]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
