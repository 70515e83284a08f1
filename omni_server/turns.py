"""One generation at a time, granted strictly in arrival order.

A plain lock would do "one at a time" but not "in order" (a request that arrives while the lock is being
handed over can barge in). Here every request takes a ticket at arrival; the ticket at the head of the
line holds the turn, and leaving the line (done, failed or client gone) wakes everyone behind to see
their new place. All methods run on the event loop thread.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Ticket:
    """A place in line; `moved` is set whenever the line ahead of it changes."""

    def __init__(self) -> None:
        self.moved = asyncio.Event()


class TurnQueue:
    def __init__(self) -> None:
        self._line: deque[Ticket] = deque()

    def join(self) -> Ticket:
        ticket = Ticket()
        self._line.append(ticket)
        return ticket

    def ahead_of(self, ticket: Ticket) -> int:
        """How many requests are before this one (0: it holds the turn)."""
        return self._line.index(ticket)

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
        """Requests in line behind the one being served."""
        return max(len(self._line) - 1, 0)
