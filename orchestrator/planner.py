"""Split a date range into the windows a run requests.

A window is half-open, ``[start, end)``, in UTC. Boundaries fall on multiples of the
window span counted from the Unix epoch, so one-hour windows are aligned to the hour;
the first and last window may be shorter than the span.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from orchestrator.timeparse import EPOCH, iso

MIN_SPAN = dt.timedelta(minutes=1)
MAX_SPAN = dt.timedelta(days=1)


@dataclass(frozen=True, slots=True, order=True)
class Window:
    """One half-open UTC interval ``[start, end)`` requested in one download."""

    start: dt.datetime
    end: dt.datetime

    @property
    def key(self) -> str:
        """A stable name, used in the manifest, part file names and logs."""
        return f"{iso(self.start)}/{iso(self.end)}"

    @classmethod
    def from_key(cls, key: str) -> Window:
        """The window a :attr:`key` names; ValueError if it names none."""
        start, end = str(key).split("/")
        return cls(dt.datetime.fromisoformat(start), dt.datetime.fromisoformat(end))

    @property
    def span(self) -> dt.timedelta:
        return self.end - self.start

    def halves(self) -> tuple[Window, Window]:
        """The two halves of this window, split at its midpoint (whole seconds)."""
        middle = self.start + (self.span / 2)
        middle = middle.replace(microsecond=0)
        if middle <= self.start:
            middle = self.start + dt.timedelta(seconds=1)

        return Window(self.start, middle), Window(middle, self.end)

    def __str__(self) -> str:
        return self.key


def plan_windows(
    start: dt.datetime, end: dt.datetime, span: dt.timedelta
) -> list[Window]:
    """Cut ``[start, end)`` into windows of ``span``, oldest first."""
    windows: list[Window] = []
    cursor = start
    while cursor < end:
        boundary = _next_boundary(cursor, span)
        windows.append(Window(cursor, min(boundary, end)))
        cursor = boundary

    return windows


def _next_boundary(moment: dt.datetime, span: dt.timedelta) -> dt.datetime:
    elapsed = moment - EPOCH
    return EPOCH + (elapsed // span + 1) * span
