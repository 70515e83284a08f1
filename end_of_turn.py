"""Has the user finished their turn? An audio-native model judges from the sound of the turn, not the silence.

People pause inside a sentence for longer than they pause after a finished question, so no fixed pause is both
quick and safe. Smart Turn v3.2 (Daily's, from the pipecat project, BSD-2-Clause) hears whether a turn sounds
finished: whisper-tiny's encoder and a small classifier, 8 M parameters, int8 ONNX run by onnxruntime. It takes
the turn's last 8 s at 16 kHz (zeros in front when shorter), normalised to zero mean and unit variance, as an
80 x 800 whisper log-mel, and gives the probability that the turn is complete.

The detector (vad.py) asks only at pauses, a few times per turn, each time on at most 8 s of audio, so the cost
is flat in the turn's length. Calls run on one thread of their own, so a check never waits behind, nor holds up,
the silero calls that carry every tab's audio.
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from omni_server.mini_omni.whisper import HOP, N_FFT, mel_filterbank
from turn_weights import WeightsUnavailable, default_path, ensure, fetching_allowed

SAMPLE_RATE = 16_000
WINDOW_SAMPLES = 8 * SAMPLE_RATE  # the model hears the turn's last 8 s
FRAMES = WINDOW_SAMPLES // HOP  # 800 log-mel frames
_NORMALISE_EPS = 1e-7
# Hugging Face's whisper feature extractor (the one Smart Turn was trained with) computes in float64. The int8
# network is sensitive to its input's rounding: a float32 front end (3e-5 from these features) moved some
# probabilities by 0.1-0.2 on our speech, enough to flip a verdict.
_MEL_FILTERS = mel_filterbank(dtype=np.float64)
_WINDOW = np.hanning(N_FFT + 1)[:-1]  # periodic Hann, as torch.hann_window


def turn_features(audio_16k: np.ndarray) -> np.ndarray:
    """[80, 800] float32 log-mel of the turn's last 8 s, as the model was trained on."""
    audio = np.asarray(audio_16k, dtype=np.float32)[-WINDOW_SAMPLES:]
    audio = np.pad(audio, (WINDOW_SAMPLES - len(audio), 0))
    audio = (audio - audio.mean()) / np.sqrt(audio.var() + _NORMALISE_EPS)
    padded = np.pad(audio.astype(np.float64), N_FFT // 2, mode="reflect")  # frames centred on their hop
    frames = sliding_window_view(padded, N_FFT)[::HOP][:FRAMES]  # whisper drops the 801st frame
    power = np.abs(np.fft.rfft(frames * _WINDOW, axis=-1)) ** 2  # [800, 201]
    log_mel = np.log10(np.maximum(_MEL_FILTERS @ power.T, 1e-10))  # [80, 800]
    log_mel = np.maximum(log_mel, log_mel.max() - 8.0)
    return ((log_mel + 4.0) / 4.0).astype(np.float32)


@functools.cache
def _model_thread() -> ThreadPoolExecutor:
    """Every tab's checks, one at a time: a call uses one core for about 0.1 s (2-core machine), so two at once
    would only slow each other and starve the audio path. Not silero's thread: a check never delays the
    frames of other tabs."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="turn-model")


os.register_at_fork(after_in_child=_model_thread.cache_clear)


class TurnModel:
    """A loaded Smart Turn network. `completion` may be called from any thread."""

    def __init__(self, path: Path) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        # One thread: 90-110 ms a call on a 2-core AVX2 machine; two took 59 ms but held both cores, so every
        # tab's silero calls (the audio path) would wait behind each check.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        self._session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def completion(self, audio_16k: np.ndarray) -> float:
        """Probability (0-1) that the turn whose audio this is has finished."""
        return _model_thread().submit(self._run, audio_16k).result()

    def _run(self, audio_16k: np.ndarray) -> float:
        (probability,) = self._session.run(None, {self._input: turn_features(audio_16k)[None]})
        return float(np.asarray(probability).reshape(-1)[0])


class SharedTurnModel:
    """The app's one turn model, fetched if need be and loaded off the audio path. Until it is ready, or when it
    cannot be had, `completion` answers None: turns then end on silence alone, and `problem` says why."""

    def __init__(self, path: Path | None = None, fetch: bool | None = None) -> None:
        """`fetch`: may the weights be downloaded when missing (default: unless $OMNI_TURN_MODEL_DOWNLOAD=0)."""
        self._path = path or default_path()
        self._fetch = fetching_allowed() if fetch is None else fetch
        self._model: TurnModel | None = None
        self.problem: str | None = None
        self._ready = threading.Event()

    def start_loading(self) -> None:
        threading.Thread(target=self._load, name="turn-model-load", daemon=True).start()

    def load_now(self) -> SharedTurnModel:
        self._load()
        return self

    def _load(self) -> None:
        try:
            path = ensure(self._path, sources=("pypi", "hub") if self._fetch else ())
            self._model = TurnModel(path)
        except WeightsUnavailable as error:
            self.problem = f"The end-of-turn model is unavailable ({error})"
        except Exception as error:  # onnxruntime raises its own types for a corrupt or incompatible file
            self.problem = f"The end-of-turn model failed to load ({type(error).__name__}: {error})"
        finally:
            self._ready.set()

    @property
    def loading(self) -> bool:
        return not self._ready.is_set()

    def completion(self, audio_16k: np.ndarray) -> float | None:
        model = self._model
        return None if model is None else model.completion(audio_16k)
