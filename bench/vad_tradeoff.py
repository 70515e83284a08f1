"""The pause-length trade-off: cut-offs against answer delay, on spoken cases with known ground truth.

For every pause_secs x chunk_secs pair, runs each case through bench/turn_latency.py's measurement (the
detector fed in chunks at the WAV's own rate, restarted after each turn) and scores the turns found against the
ground truth in the cases' manifest (`bench/make_cases.py` writes it, and makes the cases if they are missing):

  missed     a true turn no detected turn overlaps
  cut_offs   a true turn whose detected turn ended before the user had finished (e.g. at a mid-sentence pause)
  extra      a detected turn that overlaps no true turn (clicks, beeps, noise)
  merged     a detected turn spanning two true turns
  onset_lost a whole turn whose utterance starts after the true onset (first syllable clipped)
  delay      turn_end_s minus the true end of speech, for turns found whole: median and worst

Where a chunk boundary falls relative to the end of speech decides up to one chunk of the delay, so each case
is also run with extra leading silence (--offsets), which moves every turn to another phase of the chunk grid.

Prints a table, then one JSON object on the last line: {"cases": [...], "offsets_s": [...], "grid": [{...}, ...]}.

    python bench/vad_tradeoff.py [--cases test-output/vad_cases/cases.json] [--pause-secs 0.5 0.6 0.8 1.0]
                                 [--chunk-secs 0.25 0.5] [--offsets 0 0.1 0.2 0.3 0.4] [--details]
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
from turn_latency import measure, read_wav, warm_up  # noqa: E402

from vad import RecordedTurn, VadOptions  # noqa: E402


@dataclass
class Score:
    turns: int = 0
    missed: int = 0
    cut_offs: int = 0
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
        elif mine[0].turn_end_s < true["speech_end_s"]:
            score.cut_offs += 1
        elif sum(overlaps(mine[0], other) for other in truth) > 1:
            score.merged += 1
        else:
            delays.append(mine[0].turn_end_s - true["speech_end_s"])
            score.onset_lost += mine[0].speech_start_s > true["speech_start_s"]
    score.extra = sum(not any(overlaps(turn, true) for true in truth) for turn in found)
    return score, delays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=Path, default=DEFAULT_OUT / "cases.json", help="manifest of the cases")
    parser.add_argument("--pause-secs", type=float, nargs="+", default=[0.5, 0.6, 0.8, 1.0])
    parser.add_argument("--chunk-secs", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--offsets", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4],
                        help="seconds of extra leading silence; each case runs once per offset")
    parser.add_argument("--details", action="store_true", help="also print each case's turns per setting")
    args = parser.parse_args()
    if not args.cases.exists():
        build_cases(args.cases.parent)
    cases = json.loads(args.cases.read_text())
    audio = {case["name"]: read_wav(args.cases.parent / case["wav"]) for case in cases}
    warm_up()

    grid = []
    print(f"{'pause':>5} {'chunk':>5} {'turns':>5} {'missed':>6} {'cut':>4} {'extra':>5} {'merged':>6} {'onset':>5} "
          f"{'median':>6} {'worst':>6} {'cpu ms/s':>8}")
    for chunk_secs in args.chunk_secs:
        for pause_secs in args.pause_secs:
            options = VadOptions(pause_secs=pause_secs, tail_secs=min(VadOptions().tail_secs, pause_secs))
            total, delays, cpu = Score(), [], []
            for case in cases:
                for offset in args.offsets:
                    rate, samples = audio[case["name"]]
                    samples = np.concatenate([np.zeros((round(offset * rate), *samples.shape[1:]), samples.dtype), samples])
                    truth = [{key: value + offset for key, value in turn.items()} for turn in case["turns"]]
                    found, cpu_ms_per_s = measure(rate, samples, chunk_secs, options)
                    score, case_delays = score_case(truth, found, options.tail_secs)
                    total.add(score)
                    delays += case_delays
                    cpu.append(cpu_ms_per_s)
                    if args.details:
                        spans = ", ".join(f"{t.speech_start_s:.2f}-{t.speech_end_s:.2f}@{t.turn_end_s:.2f}" for t in found)
                        print(f"    {case['name']} +{offset}s: {score} found [{spans}]")
            row = {
                "pause_secs": pause_secs,
                "chunk_secs": chunk_secs,
                **vars(total),
                "median_delay_s": round(statistics.median(delays), 3) if delays else None,
                "worst_delay_s": round(max(delays), 3) if delays else None,
                "cpu_ms_per_audio_s": round(float(np.median(cpu)), 3),
            }
            grid.append(row)
            print(f"{pause_secs:>5} {chunk_secs:>5} {total.turns:>5} {total.missed:>6} {total.cut_offs:>4} "
                  f"{total.extra:>5} {total.merged:>6} {total.onset_lost:>5} {row['median_delay_s']!s:>6} "
                  f"{row['worst_delay_s']!s:>6} {row['cpu_ms_per_audio_s']:>8}")
    print(json.dumps({"cases": [case["name"] for case in cases], "offsets_s": args.offsets, "grid": grid}))


if __name__ == "__main__":
    main()
