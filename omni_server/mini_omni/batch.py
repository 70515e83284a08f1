"""Continuous batching: every generation on one model runs in one loop, one forward for all of their steps.

The model's KV cache has `slots` slots. A generation waits for a free slot in arrival order and is admitted:
its whisper encoding and prefill run block by block between batch steps, taking about as long as the steps,
so the replies already playing slow down instead of stopping. It then decodes one step per batch step until
it stops or is cancelled, and its slot is free for the next at once. No row of a batch step depends on how
many requests are busy, so what a request hears does not depend on who else is served (docs/mini-omni.md §17).

The loop runs on a thread of its own while there is work, holding the model's cache lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from omni_server.mini_omni.config import AUDIO_LAYERS, PAD_A, PAD_T, STREAMS, audio_offset
from omni_server.mini_omni.generate import Generation, Phase
from omni_server.mini_omni.gpt import ITEMS, MiniOmniModel

log = logging.getLogger(__name__)


def idle_ids() -> torch.Tensor:
    """[2, 8, 1] ids for an idle slot's rows: any valid ids do (their outputs are never read); pads."""
    ids = torch.full((ITEMS, STREAMS, 1), PAD_T, dtype=torch.long)
    for layer in range(AUDIO_LAYERS):
        ids[:, layer] = PAD_A + audio_offset(layer)
    return ids


@dataclass
class StepLog:
    """The batch steps run, by how many requests each decoded: counts and seconds (read by tests and benches)."""

    counts: Counter[int] = field(default_factory=Counter)
    seconds: defaultdict[int, float] = field(default_factory=lambda: defaultdict(float))

    def record(self, size: int, seconds: float) -> None:
        self.counts[size] += 1
        self.seconds[size] += seconds

    def mean_ms(self, size: int) -> float | None:
        return 1000 * self.seconds[size] / self.counts[size] if self.counts[size] else None

    def clear(self) -> None:
        self.counts.clear()
        self.seconds.clear()


class Batcher:
    """Runs the generations submitted on one model, up to `model.gpt.slots` at once."""

    def __init__(self, model: MiniOmniModel) -> None:
        self.model = model
        self.slots = model.gpt.slots
        self._lock = threading.Lock()
        self._waiting: deque[Generation] = deque()
        self._running = False
        self._idle_ids = idle_ids().repeat(self.slots, 1, 1)
        self.steps = StepLog()

    def submit(self, generation: Generation) -> Generation:
        """Queue `generation` for a slot and return it, to be iterated for its steps."""
        with self._lock:
            self._waiting.append(generation)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="mini-omni-batch", daemon=True).start()
        return generation

    def _run(self) -> None:
        occupants: list[Generation | None] = [None] * self.slots
        try:
            with torch.inference_mode(), self.model.cache_lock:
                self._serve(occupants)
        except BaseException as error:  # a fault of the loop itself: no consumer may wait forever for a step
            log.exception("the batch loop failed")
            with self._lock:
                stranded = [g for g in occupants if g is not None] + list(self._waiting)
                self._waiting.clear()
                self._running = False
            for generation in stranded:
                if generation.phase is not Phase.DONE:
                    generation.fail(error)

    def _serve(self, occupants: list[Generation | None]) -> None:
        """Admit, step and retire until no generation is left; `occupants[slot]` is the slot's generation."""
        admissions: dict[int, Iterator[None]] = {}  # slot -> the parts left of its admission, oldest first
        while True:
            with self._lock:
                for slot in range(self.slots):
                    if occupants[slot] is None and self._waiting:
                        generation = self._waiting.popleft()
                        occupants[slot] = generation
                        admissions[slot] = generation.admit(slot)
                if not any(occupants):
                    self._running = False
                    return
            for slot, occupant in enumerate(occupants):
                if occupant is not None and occupant.cancelled and occupant.phase is not Phase.DONE:
                    admissions.pop(slot, None)
                    occupant.finish(None)
            decoding = {s: g for s, g in enumerate(occupants) if g is not None and g.phase is Phase.DECODING}
            step_seconds = self._step(decoding) if decoding else 0.0
            admitting_until = time.perf_counter() + step_seconds
            while admissions:  # about as long on admissions as on the step: at least one part
                self._admit_part(admissions, occupants)
                if time.perf_counter() >= admitting_until:
                    break
            for slot, occupant in enumerate(occupants):
                if occupant is not None and occupant.phase is Phase.DONE:
                    occupants[slot] = None

    def _step(self, decoding: dict[int, Generation]) -> float:
        """One forward for the decoding generations (docs/mini-omni.md §17); each takes its picks. Its seconds."""
        ids = self._idle_ids.clone()
        positions = {}
        for slot, generation in decoding.items():
            ids[ITEMS * slot : ITEMS * slot + ITEMS], positions[slot] = generation.decode_input()
        gpt = self.model.gpt
        began = time.perf_counter()
        try:
            picks = gpt.select_slots(gpt.decode(ids.to(self.model.device), positions), decoding)
        except Exception as error:  # the forward is shared: every generation in it fails
            log.exception("a batch step failed")
            for generation in decoding.values():
                generation.fail(error)
            return time.perf_counter() - began
        seconds = time.perf_counter() - began
        self.steps.record(len(decoding), seconds)
        for slot, generation in decoding.items():
            generation.advance(picks[slot])
        return seconds

    def _admit_part(self, admissions: dict[int, Iterator[None]], occupants: list[Generation | None]) -> None:
        """Run the next part of the oldest admission."""
        slot = next(iter(admissions))
        generation = occupants[slot]
        assert generation is not None
        try:
            next(admissions[slot])
        except StopIteration:
            del admissions[slot]
        except Exception as error:
            log.exception("admitting a request failed")
            del admissions[slot]
            generation.fail(error)


def generate_steps(
    model: MiniOmniModel,
    audio_16k: np.ndarray,
    max_tokens: int,
    features: torch.Tensor | None = None,
    batcher: Batcher | None = None,
) -> Generation:
    """Start a generation (raises ValueError if `max_tokens` leaves no room) on `batcher`, or on a batcher of its
    own; iterate it for the steps."""
    generation = Generation(model, audio_16k, max_tokens, features)
    return (batcher or Batcher(model)).submit(generation)
