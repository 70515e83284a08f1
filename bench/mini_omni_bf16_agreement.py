"""How many golden-A steps bf16 keeps identical to fp32 (and to the reference), on this machine's CPU.

Usage: python bench/mini_omni_bf16_agreement.py [SHARED_DIR] (default ../shared). Prints one JSON object.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from omni_server.mini_omni.batch import generate_steps  # noqa: E402
from tests.mini_omni_helpers import GOLDEN, golden_a_model, load_golden, read_wav  # noqa: E402


def run(golden: dict, shared: Path, dtype: torch.dtype) -> tuple[list, str]:
    model = golden_a_model(shared, golden, dtype)
    audio = read_wav(shared / GOLDEN / golden["meta"]["wav"])
    generation = generate_steps(model, audio, golden["meta"]["max_tokens"])
    steps = [(s.audio, s.text) for s in generation]
    return steps, generation.stop_reason.value


def leading_equal(a: list, b: list) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def main() -> None:
    shared = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared"
    golden, _ = load_golden(shared, "golden_A")
    reference = [(tuple(s["sampled_audio_item0"]), s["text_recorded"]) for s in golden["steps"] if s["appended"]]
    fp32, fp32_stop = run(golden, shared, torch.float32)
    bf16, bf16_stop = run(golden, shared, torch.bfloat16)
    first_diff = leading_equal(fp32, bf16)
    audio_tokens_equal = sum(a == b for x, y in zip(fp32, bf16) for a, b in zip(x[0], y[0]))
    print(
        json.dumps(
            {
                "fp32_steps": len(fp32),
                "fp32_identical_to_reference": fp32 == reference,
                "fp32_stop": fp32_stop,
                "bf16_steps": len(bf16),
                "bf16_stop": bf16_stop,
                "bf16_leading_steps_identical_to_fp32": first_diff,
                "bf16_prefill_tokens_equal_of_8": sum(a == b for a, b in zip(fp32[0][0], bf16[0][0]))
                + (fp32[0][1] == bf16[0][1]),
                "bf16_steps_identical_to_fp32_anywhere": sum(x == y for x, y in zip(fp32, bf16)),
                "bf16_audio_tokens_equal_positionwise": audio_tokens_equal,
                "bf16_text_tokens_equal_positionwise": sum(x[1] == y[1] for x, y in zip(fp32, bf16)),
            }
        )
    )


if __name__ == "__main__":
    main()
