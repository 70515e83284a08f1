"""Request audio → 16 kHz mono float32, decoded exactly as the reference does it, within bounds.

The reference writes the upload to a file and runs ``ffmpeg -f s16le -ac 1 -ar 16000`` on it, then scales
int16 by 1/32768. The mini-omni engine's golden test depends on those exact samples, so we do the same; the
only additions are a duration cap on the ffmpeg side (a tiny compressed upload can expand to hours), a
temp file that is always deleted (same ".wav" suffix, so ffmpeg probes it the same way), and a shortcut for
the one format clients send most (the app included): a plain 16-bit mono 16 kHz PCM WAV, whose samples
ffmpeg would pass through unchanged, is read directly. That saves starting ffmpeg, about 0.1 s of every
turn's wait on a 2-core machine; tests check both paths give the same samples.

Bounds, for an app open to anyone (the app's `chat` API decodes its uploads here too): a WAV's header is read
first, and a sample rate outside 8-96 kHz or a length over the limit is refused before anything is decoded or
resampled (a 60 KB WAV whose header says 1 Hz would otherwise resample to gigabytes). ffmpeg reads only the
container formats in AUDIO_FORMATS and only the one temporary file: an ffconcat script or a playlist sent as
"audio" would otherwise make it open files beside that file and send them back as the question.
"""

from __future__ import annotations

import base64
import binascii
import io
import subprocess
import tempfile
import wave
from dataclasses import dataclass

import numpy as np

from omni_server.protocol import INPUT_SAMPLE_RATE

FFMPEG_TIMEOUT_S = 30.0
MIN_RATE, MAX_RATE = 8_000, 96_000
# ffmpeg demuxers a question may come in: WAV and its kin, FLAC, MP3, AAC, Ogg (Vorbis/Opus), Matroska/WebM
# (what Chrome and Firefox record) and MP4/M4A (what Safari records). No concat, playlist or image demuxers.
AUDIO_FORMATS = "wav,w64,aiff,caf,au,flac,mp3,aac,ogg,matroska,webm,mov,mp4,m4a"


class UndecodableAudio(ValueError):
    """The uploaded bytes are not audio ffmpeg can read (the client's fault: a 4xx)."""


class AudioTooLong(UndecodableAudio):
    """The audio is longer than the limit (known from its header, before decoding)."""


class DecoderUnavailable(RuntimeError):
    """ffmpeg cannot be run on the server (the server's fault: a 5xx)."""


def decode_base64(text: str) -> bytes:
    """Strict standard base64 (the reference silently skips stray characters; we refuse them)."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise UndecodableAudio(
            "The audio field is not valid base64 (standard alphabet with padding, no line breaks)."
        ) from error


def decode_audio_file(data: bytes, *, max_seconds: float, trim: bool = False) -> np.ndarray:
    """Decode any ffmpeg-readable audio file to float32 mono 16 kHz, reading at most `max_seconds` + 1 s.

    The caller compares the length against its limit; decoding one second more than the limit is what
    lets it tell "too long" from "exactly at the limit". A WAV whose header says it is longer is refused
    (AudioTooLong) unless `trim`: then its first `max_seconds` + 1 s are decoded like any other file's.
    """
    if not data:
        raise UndecodableAudio("The audio file is empty.")
    header = _wav_header(data)  # None for anything but a WAV
    if header is not None:
        _check_wav_header(header, max_seconds, trim)
        data = _finite(data, header)
    pcm = _plain_wav_pcm(data)
    if pcm is not None:
        return _scaled(pcm[: round((max_seconds + 1.0) * INPUT_SAMPLE_RATE) * 2])
    with tempfile.NamedTemporaryFile(suffix=".wav") as upload:
        upload.write(data)
        upload.flush()
        command = [
            "ffmpeg",
            "-nostdin",
            "-loglevel",
            "error",
            "-threads",
            "0",
            "-format_whitelist",
            AUDIO_FORMATS,
            "-protocol_whitelist",
            "file",
            "-i",
            upload.name,
            "-t",
            f"{max_seconds + 1.0:.3f}",
            "-f",
            "s16le",
            "-ac",
            "1",
            "-acodec",
            "pcm_s16le",
            "-ar",
            str(INPUT_SAMPLE_RATE),
            "-",
        ]
        try:
            result = subprocess.run(command, capture_output=True, timeout=FFMPEG_TIMEOUT_S, check=False)
        except FileNotFoundError as error:
            raise DecoderUnavailable("ffmpeg is not installed on the server.") from error
        except OSError as error:
            raise DecoderUnavailable(f"ffmpeg could not be started on the server ({error.strerror}).") from error
        except subprocess.TimeoutExpired as error:
            raise UndecodableAudio("The audio file took too long to decode.") from error
    if result.returncode != 0:
        reason = result.stderr.decode("utf-8", "replace").replace(upload.name, "input").strip().splitlines()
        detail = f" ({reason[-1]})" if reason else ""
        raise UndecodableAudio(f"The audio could not be decoded{detail}.")
    return _scaled(result.stdout[: len(result.stdout) // 2 * 2])


@dataclass(frozen=True)
class _WavHeader:
    rate: int
    block_align: int  # bytes per frame
    float_bits: int | None  # 32 or 64 for IEEE float samples, else None
    data_start: int
    data_bytes: int


def _check_wav_header(header: _WavHeader, max_seconds: float, trim: bool) -> None:
    """Refuse a WAV whose header gives a rate outside 8-96 kHz or (unless `trim`) a length over `max_seconds`
    (other formats, and WAVs of unknown length, are bounded by ffmpeg's `-t`)."""
    if not MIN_RATE <= header.rate <= MAX_RATE:
        raise UndecodableAudio(
            f"The audio's sample rate is {header.rate} Hz; rates from {MIN_RATE // 1000} to {MAX_RATE // 1000} kHz "
            "are supported."
        )
    known_length = header.block_align and header.data_bytes != 0xFFFFFFFF
    if not trim and known_length and header.data_bytes / header.block_align / header.rate > max_seconds:
        raise AudioTooLong(f"The audio is longer than {max_seconds:g} seconds.")


def _finite(data: bytes, header: _WavHeader) -> bytes:
    """A float WAV with NaN or infinite samples, cleaned as the microphone's are (NaN -> 0, +-inf -> +-1):
    ffmpeg would turn them into full-scale samples, a thump in the question."""
    if header.float_bits is None:
        return data
    dtype = np.dtype("<f4" if header.float_bits == 32 else "<f8")
    present = min(header.data_bytes, len(data) - header.data_start)  # the header may claim more (or "unknown")
    count = present // dtype.itemsize
    end = header.data_start + count * dtype.itemsize
    samples = np.frombuffer(data, dtype=dtype, count=count, offset=header.data_start)
    if np.isfinite(samples).all():
        return data
    cleaned = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0).astype(dtype).tobytes()
    return data[: header.data_start] + cleaned + data[end:]


_FLOAT_FORMAT = 3  # WAVE_FORMAT_IEEE_FLOAT
_EXTENSIBLE_FORMAT = 0xFFFE  # its sub-format's first two bytes say which


def _wav_header(data: bytes) -> _WavHeader | None:
    """What a RIFF/WAVE header says; None if it is not one."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    position, fmt = 12, None
    while position + 8 <= len(data):
        kind, size = data[position : position + 4], int.from_bytes(data[position + 4 : position + 8], "little")
        body = data[position + 8 : position + 8 + size]
        if kind == b"fmt " and len(body) >= 16:
            fmt = body
        elif kind == b"data":
            if fmt is None:
                return None
            tag, bits = int.from_bytes(fmt[0:2], "little"), int.from_bytes(fmt[14:16], "little")
            if tag == _EXTENSIBLE_FORMAT and len(fmt) >= 26:
                tag = int.from_bytes(fmt[24:26], "little")
            return _WavHeader(
                rate=int.from_bytes(fmt[4:8], "little"),
                block_align=int.from_bytes(fmt[12:14], "little"),
                float_bits=bits if tag == _FLOAT_FORMAT and bits in (32, 64) else None,
                data_start=position + 8,
                data_bytes=size,
            )
        position += 8 + size + (size & 1)  # chunks are padded to an even length
    return None


def _plain_wav_pcm(data: bytes) -> bytes | None:
    """The samples of a well-formed 16-bit mono PCM WAV at 16 kHz, exactly as ffmpeg would output them;
    None for anything else (ffmpeg decides about those)."""
    try:
        with wave.open(io.BytesIO(data)) as reader:
            if (reader.getcomptype(), reader.getnchannels(), reader.getsampwidth(), reader.getframerate()) != (
                "NONE",
                1,
                2,
                INPUT_SAMPLE_RATE,
            ):
                return None
            frames = reader.getnframes()
            pcm = reader.readframes(frames)
    except (wave.Error, EOFError, ValueError):
        return None
    return pcm if len(pcm) == 2 * frames else None


def _scaled(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
