"""Work written in parts: a generator that pauses with bare `yield`s between its parts and returns its result.

The batch loop interleaves such work (a question's whisper encoding and prefill) with its decode steps;
everyone else runs it straight through with `run_to_end`.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TypeVar, cast

T = TypeVar("T")


def run_to_end(parts: Generator[None, None, T]) -> T:
    """Run work written in parts (a generator that pauses with bare `yield`s) without pausing; its result."""
    while True:
        try:
            next(parts)
        except StopIteration as done:
            return cast(T, done.value)
