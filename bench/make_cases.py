"""Synthesize spoken test cases for tuning pause detection, with their ground truth.

Each case is a WAV (48 kHz mono int16, like a browser microphone, so the detector's resampling is exercised) of
turns spoken by espeak-ng, with silence, hesitations, mid-sentence pauses, a quiet speaker, noise, key clicks and
beeps placed where we choose. Because we build the audio, we know where every turn's speech starts and ends.
`cases.json` beside the WAVs lists them; `bench/vad_tradeoff.py` reads it (so a hand-labelled recording can be
added to the list in the same format).

    python bench/make_cases.py [--out test-output/vad_cases]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.speech import RATE, silence, speak, trim, write_wav  # noqa: E402

WAV_RATE = 48_000
DEFAULT_OUT = REPO_ROOT / "test-output" / "vad_cases"


@dataclass(frozen=True)
class CaseSpec:
    """Turns of phrases; each turn is one sentence with a pause of `inner_pause_secs` (plus espeak's own clause
    pause) where its phrases meet."""

    name: str
    description: str
    turns: tuple[tuple[str, ...], ...]
    voice: str = "en-us"
    words_per_minute: int = 160
    lead_secs: float = 1.0  # silence before the first turn
    gap_secs: float = 2.5  # silence between turns
    inner_pause_secs: float = 0.6
    speech_gain: float = 1.0
    noise_snr_db: float | None = None  # white noise under everything, relative to the speech's RMS
    hum: bool = False  # mains hum and a low fan rumble
    clicks_per_sec: float = 0.0  # key clicks in the silences
    beeps: bool = False  # notification beeps in the silences


CASES = (
    CaseSpec(
        "us_two_questions",
        "en-us at 160 wpm, two questions 2.5 s apart",
        (("What time does the museum open on Saturday?",), ("And how much is a ticket for a student?",)),
    ),
    CaseSpec(
        "gb_fast",
        "en-gb at 220 wpm, one 0.7 s mid-sentence pause",
        (("So if I take the early train", "will I still make the connection in Leeds?"),),
        voice="en-gb",
        words_per_minute=220,
        inner_pause_secs=0.7,
    ),
    CaseSpec(
        "slow_female",
        "en-us female variant at 115 wpm, one 0.8 s mid-sentence pause",
        (("Could you remind me", "what we said about the budget for next year?"),),
        voice="en-us+f3",
        words_per_minute=115,
        inner_pause_secs=0.8,
    ),
    CaseSpec(
        "hesitant_start",
        "3.5 s of silence, a lone 'um', a 0.7 s pause, then the question",
        (("Um", "which of these two laptops would you recommend for programming?"),),
        lead_secs=3.5,
        voice="en-us+m3",
        inner_pause_secs=0.7,
    ),
    CaseSpec(
        "mid_pauses",
        "received pronunciation, two 0.6 s pauses inside one sentence",
        (("I was wondering", "whether it would be possible", "to move our meeting to Thursday afternoon."),),
        voice="en-gb-x-rp",
        words_per_minute=150,
        inner_pause_secs=0.6,
    ),
    CaseSpec(
        "quiet",
        "New York voice at -26 dB (a quiet speaker far from the microphone), two turns",
        (
            ("Is it going to rain this evening?",),
            ("Then I will take the bus", "instead of walking home."),
        ),
        voice="en-us-nyc",
        speech_gain=0.05,
    ),
    CaseSpec(
        "noisy",
        "Caribbean English voice over white noise at 10 dB SNR, one 0.7 s mid-sentence pause",
        (("Tell me a short story", "about a fox who learns to swim."),),
        voice="en-029",
        noise_snr_db=10.0,
        inner_pause_secs=0.7,
    ),
    CaseSpec(
        "clicks",
        "Scottish voice, key clicks (5 per second) in the 3 s lead and between the turns",
        (
            ("How do I reset my password?",),
            ("I tried the link in the email", "but it has expired."),
        ),
        voice="en-gb-scotland",
        lead_secs=3.0,
        gap_secs=3.0,
        clicks_per_sec=5.0,
        inner_pause_secs=0.9,
    ),
    CaseSpec(
        "beeps",
        "en-us female variant, notification beeps in the lead and between the turns",
        (("Please add milk and eggs to my shopping list.",), ("Also remind me to call my sister.",)),
        voice="en-us+f2",
        lead_secs=2.5,
        gap_secs=3.0,
        beeps=True,
    ),
    CaseSpec(
        "hum_fast_pauses",
        "en-us at 200 wpm over mains hum and fan rumble, two 0.6 s pauses",
        (("Okay so first", "preheat the oven", "and then what do I do with the butter?"),),
        words_per_minute=200,
        hum=True,
        inner_pause_secs=0.6,
    ),
    CaseSpec(
        "table_for_two",
        "en-us male variant, 'I would like to... book a table for two' with a 0.8 s pause, then a yes-or-no question",
        (("I would like to", "book a table for two."), ("Do you have one at eight?",)),
        voice="en-us+m1",
        inner_pause_secs=0.8,
    ),
    CaseSpec(
        "short_answers",
        "en-gb female variant answering 'Yes.', 'No, thanks.' and 'Sure.', 2 s apart",
        (("Yes.",), ("No, thanks.",), ("Sure.",)),
        voice="en-gb+f4",
        gap_secs=2.0,
    ),
)


def render(spec: CaseSpec, seed: int) -> tuple[np.ndarray, list[dict[str, float]]]:
    """The case's 16 kHz samples and, per turn, where its speech starts and ends (seconds)."""
    rng = np.random.default_rng(seed)
    parts = [silence(spec.lead_secs)]
    position = len(parts[0])
    truth = []
    for turn_index, phrases in enumerate(spec.turns):
        if turn_index:
            parts.append(silence(spec.gap_secs))
            position += len(parts[-1])
        # One sentence, paused where the phrases meet: said in one breath, so the words before a pause sound
        # unfinished, as a person's do (phrases spoken one by one would each end on a final fall).
        text = f' <break time="{round(spec.inner_pause_secs * 1000)}ms"/> '.join(phrases)
        voiced = trim(speak(text, voice=spec.voice, words_per_minute=spec.words_per_minute)) * spec.speech_gain
        truth.append({"speech_start_s": position / RATE, "speech_end_s": (position + len(voiced)) / RATE})
        parts.append(voiced)
        position += len(voiced)
    parts.append(silence(2.5))
    speech = np.concatenate(parts).astype(np.float32)
    background = np.zeros_like(speech)
    speech_mask = np.zeros(len(speech), dtype=bool)
    for turn in truth:
        speech_mask[round(turn["speech_start_s"] * RATE) : round(turn["speech_end_s"] * RATE)] = True
    if spec.noise_snr_db is not None:
        speech_rms = float(np.sqrt(np.mean(speech[speech_mask] ** 2)))
        background += rng.normal(0, speech_rms * 10 ** (-spec.noise_snr_db / 20), len(speech)).astype(np.float32)
    if spec.hum:
        t = np.arange(len(speech)) / RATE
        rumble = np.convolve(rng.normal(0, 0.05, len(speech)), np.ones(40) / 40, mode="same")
        background += (0.02 * np.sin(2 * np.pi * 50 * t) + 0.01 * np.sin(2 * np.pi * 150 * t) + rumble).astype(
            np.float32
        )
    quiet_starts = _quiet_stretches(speech_mask)
    if spec.clicks_per_sec:
        for start, stop in quiet_starts:
            for at in rng.uniform(start, stop - 0.01, size=int((stop - start) * spec.clicks_per_sec)):
                first = int(at * RATE)
                burst = rng.normal(0, 0.5, 120) * np.exp(-np.arange(120) / 25)
                background[first : first + 120] += burst.astype(np.float32)
    if spec.beeps:
        for start, stop in quiet_starts:
            if stop - start > 1.0:
                first = int((start + 0.4) * RATE)
                t = np.arange(int(0.3 * RATE)) / RATE
                beep = 0.3 * np.sin(2 * np.pi * 880 * t) * np.minimum(1, np.minimum(t, t[::-1]) / 0.01)
                background[first : first + len(beep)] += beep.astype(np.float32)
    return np.clip(speech + background, -1, 1), truth


def _quiet_stretches(speech_mask: np.ndarray) -> list[tuple[float, float]]:
    """(start, stop) seconds of the silences between turns, keeping 0.3 s clear of speech."""
    edges = np.flatnonzero(np.diff(np.concatenate([[1], speech_mask.astype(np.int8), [1]])))
    stretches = []
    for start, stop in zip(edges[::2], edges[1::2]):
        start_s, stop_s = start / RATE + 0.3, stop / RATE - 0.3
        if stop_s - start_s > 0.2:
            stretches.append((start_s, stop_s))
    return stretches


def build_cases(out: Path) -> Path:
    """Write every case's WAV and the manifest; return the manifest's path."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for seed, spec in enumerate(CASES):
        samples, truth = render(spec, seed)
        wav = write_wav(out / f"{spec.name}.wav", soxr.resample(samples, RATE, WAV_RATE), WAV_RATE)
        manifest.append({"name": spec.name, "wav": wav.name, "description": spec.description, "turns": truth})
    path = out / "cases.json"
    path.write_text(json.dumps(manifest, indent=1))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the WAVs and cases.json")
    args = parser.parse_args()
    path = build_cases(args.out)
    cases = json.loads(path.read_text())
    print(json.dumps({"manifest": str(path), "cases": len(cases), "turns": sum(len(c["turns"]) for c in cases)}))


if __name__ == "__main__":
    main()
