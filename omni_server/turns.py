"""As many generations at a time as the engine serves (its `max_batch`), granted strictly in arrival order.

A plain semaphore would do "N at a time" but not "in order" (a request that arrives while a turn is being
handed over can barge in). Here every request takes a ticket at arrival; the first `capacity()` tickets of
the line hold a turn, and leaving the line (done, failed or client gone) wakes everyone behind to see their
new place. All methods run on the event loop thread.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class Ticket:
    """A place in line; `moved` is set whenever the line ahead of it changes."""

    def __init__(self) -> None:
        self.moved = asyncio.Event()


class TurnQueue:
    def __init__(self, capacity: Callable[[], int] = lambda: 1) -> None:
        """`capacity()`: how many tickets hold a turn at once (asked each time: it is known once the engine is)."""
        self._line: deque[Ticket] = deque()
        self._capacity = capacity

    def join(self) -> Ticket:
        ticket = Ticket()
        self._line.append(ticket)
        return ticket

    def ahead_of(self, ticket: Ticket) -> int:
        """How many requests must leave before this one holds a turn (0: it holds one)."""
        return max(self._line.index(ticket) - self._capacity() + 1, 0)

    async def wait_turn(self, ticket: Ticket, timeout: float) -> bool:
        """Wait until `ticket` holds the turn or `timeout` passes; True when it holds the turn."""
        if self.ahead_of(ticket) == 0:
            return True
        ticket.moved.clear()
        try:
            await asyncio.wait_for(ticket.moved.wait(), timeout)
        except TimeoutError:
            pass
        return self.ahead_of(ticket) == 0

    def leave(self, ticket: Ticket) -> None:
        """Give up the turn or the place in line (idempotent)."""
        if ticket in self._line:
            self._line.remove(ticket)
            for waiting in self._line:
                waiting.moved.set()

    @property
    def busy(self) -> bool:
        return bool(self._line)

    @property
    def waiting(self) -> int:
        """Requests in line behind the ones being served."""
        return max(len(self._line) - self._capacity(), 0)
