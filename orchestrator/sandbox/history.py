"""Deterministic synthetic journey history, rendered as the download call streams it.

The rows of an hour depend only on (seed, hour, rows_per_hour): two sandboxes built
with the same seed answer the same bytes for the same window, whatever their clocks.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from orchestrator import sfmc
from orchestrator.sandbox.cache import Lru
from orchestrator.sandbox.catalogue import Catalogue, build_catalogue
from orchestrator.sandbox.drawing import DAY_MS, HOUR_MS, Row, draw_hour
from orchestrator.sandbox.render import (
    BOM,
    COLUMN_INDEX,
    encode_rows,
    render,
    render_header,
)

__all__ = [
    "BOM",
    "DAY_MS",
    "FILTER_COLUMNS",
    "HOUR_MS",
    "History",
    "Row",
    "Window",
    "filter_key",
    "hour_floor",
    "render",
]

Filters = Mapping[str, Sequence[str]]
FilterKey = tuple[tuple[str, frozenset[str]], ...]
Check = tuple[int, frozenset[str], bool]

FILTER_COLUMNS = {
    "statuses": "Status",
    "activityTypes": "ActivityType",
    "definitionIds": "DefinitionId",
    "definitionInstanceIds": "DefinitionInstanceId",
    "activityIds": "ActivityId",
    "contactKeys": "ContactKey",
}


@dataclass(frozen=True, slots=True)
class Window:
    """A rendered download body and the number of data rows in it."""

    body: bytes
    row_count: int


@dataclass(frozen=True, slots=True)
class _Hour:
    """The rows of one hour, newest first, with their negated times for bisecting."""

    negated_times: list[int]
    rows: list[Row]


@dataclass(frozen=True, slots=True)
class _Rendered:
    """One hour rendered: the row bytes and where each row starts."""

    negated_times: list[int]
    offsets: list[int]
    body: bytes


def hour_floor(moment_ms: int) -> int:
    """The start of the UTC hour holding `moment_ms`."""
    return moment_ms - moment_ms % HOUR_MS


class History:
    """The journey history of one seeded sandbox.

    Rows exist for the hours from the floor of (now - retention) up to now; when
    `now_ms` is None the clock is read on every call.
    """

    def __init__(
        self,
        seed: int,
        rows_per_hour: int,
        *,
        now_ms: int | None = None,
        retention_days: int = sfmc.RETENTION_DAYS,
        cache_bytes: int = 256 * 2**20,
        cache_rows: int = 200_000,
    ) -> None:
        self.seed = seed
        self.rows_per_hour = rows_per_hour
        self.retention_days = retention_days
        self._now_ms = now_ms
        self._catalogue: Catalogue = build_catalogue(seed)
        self._hours: Lru[_Hour] = Lru(cache_rows, lambda hour: len(hour.rows) + 1)
        self._rendered: Lru[_Rendered] = Lru(cache_bytes, _rendered_weight)

    @property
    def catalogue(self) -> Catalogue:
        """The journeys, activities and contacts rows are drawn from."""
        return self._catalogue

    def now(self) -> int:
        """The sandbox's present, in epoch milliseconds (UTC)."""
        if self._now_ms is not None:
            return self._now_ms

        return time.time_ns() // 1_000_000

    def oldest(self) -> int:
        """The first hour still retained, in epoch milliseconds."""
        return hour_floor(self.now() - self.retention_days * DAY_MS)

    def rows(
        self,
        start_ms: int,
        end_ms: int,
        *,
        filters: Filters | None = None,
        end_inclusive: bool = False,
    ) -> list[Row]:
        """Rows with start <= TransactionTime < end (<= end if inclusive), newest first.

        Raises ValueError for an unknown filter key.
        """
        checks = _checks(filter_key(filters))
        found: list[Row] = []
        for hour, low, high in self._spans(start_ms, end_ms, end_inclusive):
            selected = hour.rows[low:high]
            found.extend(row for row in selected if _keep(row, checks))

        return found

    def expected(
        self, start_ms: int, end_ms: int, *, filters: Filters | None = None
    ) -> list[Row]:
        """The ground truth of the half-open window [start, end)."""
        return self.rows(start_ms, end_ms, filters=filters)

    def window(
        self,
        start_ms: int,
        end_ms: int,
        columns: Sequence[str],
        fmt: str,
        *,
        filters: Filters | None = None,
        end_inclusive: bool = False,
        newline: str = "\n",
        header: bool = True,
        bom: bool = False,
    ) -> Window:
        """Render a window from per-hour cached bytes, as `render` would."""
        columns = tuple(columns)
        key = filter_key(filters)
        parts: list[bytes | memoryview] = [BOM] if bom else []
        if header:
            parts.append(render_header(columns, fmt, newline=newline))

        count = 0
        for hour_ms, low, high in self._time_spans(start_ms, end_ms, end_inclusive):
            done = self._render_hour(hour_ms, columns, fmt, newline, key)
            first = bisect.bisect_right(done.negated_times, -high)
            last = bisect.bisect_right(done.negated_times, -low)
            view = memoryview(done.body)[done.offsets[first] : done.offsets[last]]
            parts.append(view)
            count += last - first

        return Window(b"".join(parts), count)

    def clip(
        self, start_ms: int, end_ms: int, *, end_inclusive: bool = False
    ) -> tuple[int, int]:
        """The half-open span [low, high) of a window that can hold rows."""
        low = max(start_ms, self.oldest())
        high = min(end_ms + 1 if end_inclusive else end_ms, self.now())
        return low, max(low, high)

    def hour(self, hour_ms: int) -> list[Row]:
        """Every row of the hour starting at `hour_ms`, newest first, ignoring now."""
        return self._hour(hour_ms).rows

    def _hour(self, hour_ms: int) -> _Hour:
        cached = self._hours.get(hour_ms)
        if cached is None:
            drawn = draw_hour(self._catalogue, self.seed, hour_ms, self.rows_per_hour)
            times, rows = drawn
            cached = _Hour([-moment for moment in times], rows)
            self._hours.put(hour_ms, cached)

        return cached

    def _time_spans(
        self, start_ms: int, end_ms: int, end_inclusive: bool
    ) -> Iterator[tuple[int, int, int]]:
        """Yield (hour, low, high) newest hour first: the clipped part of each hour."""
        low, high = self.clip(start_ms, end_ms, end_inclusive=end_inclusive)
        if low >= high:
            return

        for hour_ms in range(hour_floor(high - 1), hour_floor(low) - 1, -HOUR_MS):
            yield hour_ms, max(low, hour_ms), min(high, hour_ms + HOUR_MS)

    def _spans(
        self, start_ms: int, end_ms: int, end_inclusive: bool
    ) -> Iterator[tuple[_Hour, int, int]]:
        """Yield (hour, first, last): the row index range of each clipped hour."""
        for hour_ms, low, high in self._time_spans(start_ms, end_ms, end_inclusive):
            hour = self._hour(hour_ms)
            first = bisect.bisect_right(hour.negated_times, -high)
            last = bisect.bisect_right(hour.negated_times, -low)
            yield hour, first, last

    def _render_hour(
        self,
        hour_ms: int,
        columns: tuple[str, ...],
        fmt: str,
        newline: str,
        key: FilterKey,
    ) -> _Rendered:
        cache_key = (hour_ms, columns, fmt, newline, key)
        cached = self._rendered.get(cache_key)
        if cached is not None:
            return cached

        hour = self._hour(hour_ms)
        checks = _checks(key)
        kept = [i for i, row in enumerate(hour.rows) if _keep(row, checks)]
        lines = encode_rows([hour.rows[i] for i in kept], columns, fmt, newline=newline)
        rendered = _Rendered(
            negated_times=[hour.negated_times[i] for i in kept],
            offsets=[0, *itertools.accumulate(map(len, lines))],
            body=b"".join(lines),
        )
        self._rendered.put(cache_key, rendered)
        return rendered


def filter_key(filters: Filters | None) -> FilterKey:
    """Normalise filters to a hashable key: no empty lists, statuses case-folded.

    Raises ValueError for an unknown filter key.
    """
    normalised = []
    for name, values in sorted((filters or {}).items()):
        if name not in FILTER_COLUMNS:
            known = ", ".join(FILTER_COLUMNS)
            raise ValueError(f"unknown filter {name!r}; expected one of {known}")

        if values:
            fold = name == "statuses"
            normalised.append(
                (name, frozenset(v.casefold() if fold else v for v in values))
            )

    return tuple(normalised)


def _checks(key: FilterKey) -> list[Check]:
    return [
        (COLUMN_INDEX[FILTER_COLUMNS[name]], values, name == "statuses")
        for name, values in key
    ]


def _keep(row: Row, checks: list[Check]) -> bool:
    for index, values, fold in checks:
        value = row[index].casefold() if fold else row[index]
        if value not in values:
            return False

    return True


def _rendered_weight(rendered: _Rendered) -> int:
    return len(rendered.body) + 72 * len(rendered.offsets)
