"""End of turn by silence alone against the end-of-turn model: cut-offs against answer delay, on spoken cases
with known ground truth, side by side in one run.

Each setting runs every case through bench/turn_latency.py's measurement (the detector fed in the live page's
32 ms frames at the WAV's own rate, restarted after each turn) and scores the turns found against the ground
truth in the cases' manifest (`bench/make_cases.py` writes it, and makes the cases if they are missing):

  missed     a true turn no detected turn overlaps
  cut_offs   a true turn whose detected turn ended before the user had finished (e.g. at a mid-sentence pause)
  resumed    a true turn the model ended too soon, then continued when the user went on (VadOptions.resume_secs):
             found whole, but the app had begun to answer (and stopped as the user spoke again)
  extra      a detected turn that overlaps no true turn (clicks, beeps, noise)
  merged     a detected turn spanning two true turns
  onset_lost a whole turn whose utterance starts after the true onset (first syllable clipped)
  delay      turn_end_s minus the true end of speech, for turns found whole: median and worst
  model      end-of-turn model calls per true turn, their ms per call, and the detector's CPU ms per turn and
             per audio second (silero and the model together)

Settings: silence alone at each --pause-secs, and the model at each --thresholds x --fallback-secs x --resume-secs
(labelled "model THRESHOLD / FALLBACK / RESUME"). Each case is
also run with extra leading silence (--offsets), which moves every turn to another phase of the frame grid.

Prints a table, then one JSON object on the last line: {"cases": [...], "offsets_s": [...], "grid": [{...}, ...]}.

    python bench/vad_tradeoff.py [--cases test-output/vad_cases/cases.json] [--pause-secs 0.5 0.6 0.8]
                                 [--thresholds 0.5 0.7 0.9] [--fallback-secs 1.5 2.0] [--offsets 0 0.1] [--details]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_cases import DEFAULT_OUT, build_cases  # noqa: E402
from real_speech import DEFAULT_OUT as REAL_OUT  # noqa: E402
from real_speech import build as build_real  # noqa: E402
from turn_latency import APP_CHUNK_SECS, measure, read_wav, turn_model, warm_up  # noqa: E402

from vad import RecordedTurn, VadOptions  # noqa: E402


@dataclass
class Score:
    turns: int = 0
    missed: int = 0
    cut_offs: int = 0
    resumed: int = 0
    extra: int = 0
    merged: int = 0
    onset_lost: int = 0

    def add(self, other: Score) -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def score_case(truth: list[dict[str, float]], found: list[RecordedTurn], tail_secs: float) -> tuple[Score, list[float]]:
    """Compare detected turns with the true ones; return the counts and the delays of turns found whole."""
    score = Score(turns=len(truth))
    delays = []

    def overlaps(turn: RecordedTurn, true: dict[str, float]) -> bool:
        return turn.speech_start_s < true["speech_end_s"] and turn.speech_end_s + tail_secs > true["speech_start_s"]

    for true in truth:
        mine = [turn for turn in found if overlaps(turn, true)]
        if not mine:
            score.missed += 1
            continue
        # Turns that continue the one before them (the model ended it, the user went on) make one chain.
        whole = mine[-1] if all(turn.utterance.continues for turn in mine[1:]) else mine[0]
        if whole.turn_end_s < true["speech_end_s"]:
            score.cut_offs += 1
        elif sum(overlaps(whole, other) for other in truth) > 1:
            score.merged += 1
        else:
            delays.append(whole.turn_end_s - true["speech_end_s"])
            score.onset_lost += whole.speech_start_s > true["speech_start_s"]
            score.resumed += len(mine) > 1
    score.extra = sum(not any(overlaps(turn, true) for true in truth) for turn in found)
    return score, delays


def settings(args: argparse.Namespace) -> list[tuple[str, VadOptions]]:
    silence_only = [
        (f"silence {pause}", VadOptions(semantic=False, pause_secs=pause, tail_secs=min(VadOptions().tail_secs, pause)))
        for pause in args.pause_secs
    ]
    semantic = [
        (
            f"model {threshold} / {fallback} / {resume}",
            VadOptions(
                completion_threshold=threshold,
                fallback_secs=fallback,
                resume_secs=resume,
                recheck_secs=tuple(args.recheck_secs),
            ),
        )
        for threshold in args.thresholds
        for fallback in args.fallback_secs
        for resume in args.resume_secs
    ]
    return silence_only + semantic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cases",
        type=Path,
        nargs="+",
        default=[DEFAULT_OUT / "cases.json", REAL_OUT / "cases.json"],
        help="manifests of the cases (default: espeak's, made if missing, and the real speech's, fetched if missing)",
    )
    parser.add_argument("--pause-secs", type=float, nargs="+", default=[0.5, 0.6, 0.8])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--fallback-secs", type=float, nargs="+", default=[1.5, 2.0])
    parser.add_argument("--recheck-secs", type=float, nargs="*", default=list(VadOptions().recheck_secs))
    parser.add_argument(
        "--resume-secs",
        type=float,
        nargs="+",
        default=[0.0, VadOptions().resume_secs],
        help="each model setting with each (0: a turn the model ended is never continued)",
    )
    parser.add_argument("--chunk-secs", type=float, default=APP_CHUNK_SECS)
    parser.add_argument(
        "--offsets",
        type=float,
        nargs="+",
        default=[0.0, 0.1],
        help="seconds of extra leading silence; each case runs once per offset",
    )
    parser.add_argument("--details", action="store_true", help="also print each case's turns per setting")
    args = parser.parse_args()
    cases, audio = [], {}
    for manifest in args.cases:
        if not manifest.exists():
            {DEFAULT_OUT: build_cases, REAL_OUT: build_real}[manifest.parent](manifest.parent)
        for case in json.loads(manifest.read_text()):
            cases.append(case)
            audio[case["name"]] = read_wav(manifest.parent / case["wav"])
    completion = turn_model()
    warm_up(completion)

    grid = []
    print(
        f"{'setting':>22} {'turns':>5} {'missed':>6} {'cut':>4} {'resumed':>7} {'extra':>5} {'merged':>6} {'onset':>5} "
        f"{'median':>6} {'worst':>6} {'calls/turn':>10} {'ms/call':>7} {'cpu ms/turn':>11}"
    )
    for label, options in settings(args):
        total, delays, cpu_ms, calls, model_ms, audio_s = Score(), [], 0.0, 0, 0.0, 0.0
        for case in cases:
            for offset in args.offsets:
                rate, samples = audio[case["name"]]
                samples = np.concatenate([np.zeros((round(offset * rate), *samples.shape[1:]), samples.dtype), samples])
                truth = [{key: value + offset for key, value in turn.items()} for turn in case["turns"]]
                measured = measure(rate, samples, args.chunk_secs, options, completion if options.semantic else None)
                score, case_delays = score_case(truth, measured.turns, options.tail_secs)
                total.add(score)
                delays += case_delays
                cpu_ms += measured.cpu_ms_per_audio_s * len(samples) / rate
                audio_s += len(samples) / rate
                calls += measured.model_calls
                model_ms += measured.model_ms
                if args.details:
                    spans = ", ".join(
                        f"{t.speech_start_s:.2f}-{t.speech_end_s:.2f}@{t.turn_end_s:.2f}({t.utterance.reason.value})"
                        for t in measured.turns
                    )
                    print(f"    {case['name']} +{offset}s: {score} found [{spans}]")
        row = {
            "setting": label,
            "semantic": options.semantic,
            "pause_secs": options.pause_secs,
            "completion_threshold": options.completion_threshold if options.semantic else None,
            "fallback_secs": options.fallback_secs if options.semantic else None,
            "resume_secs": options.resume_secs if options.semantic else None,
            **vars(total),
            "median_delay_s": round(statistics.median(delays), 3) if delays else None,
            "worst_delay_s": round(max(delays), 3) if delays else None,
            "model_calls_per_turn": round(calls / total.turns, 2),
            "model_ms_per_call": round(model_ms / calls, 1) if calls else None,
            "cpu_ms_per_turn": round(cpu_ms / total.turns, 1),
            "cpu_ms_per_audio_s": round(cpu_ms / audio_s, 1),
        }
        grid.append(row)
        print(
            f"{label:>22} {total.turns:>5} {total.missed:>6} {total.cut_offs:>4} {total.resumed:>7} {total.extra:>5} "
            f"{total.merged:>6} "
            f"{total.onset_lost:>5} {row['median_delay_s']!s:>6} {row['worst_delay_s']!s:>6} "
            f"{row['model_calls_per_turn']:>10} {row['model_ms_per_call']!s:>7} {row['cpu_ms_per_turn']:>11}"
        )
    print(
        json.dumps(
            {
                "cases": [case["name"] for case in cases],
                "offsets_s": args.offsets,
                "chunk_secs": args.chunk_secs,
                "grid": grid,
            }
        )
    )


if __name__ == "__main__":
    main()
