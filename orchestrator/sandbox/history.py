"""Deterministic synthetic journey history, rendered as the download call streams it.

The rows of an hour depend only on (seed, hour, rows_per_hour): two sandboxes built
with the same seed answer the same bytes for the same window, whatever their clocks.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import operator
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from orchestrator import sfmc
from orchestrator.sandbox.cache import Lru
from orchestrator.sandbox.catalogue import (
    CLIENT_STATUSES,
    TAGS,
    Catalogue,
    build_catalogue,
    guid,
)

logger = logging.getLogger(__name__)

Row = tuple[str, ...]
Filters = Mapping[str, Sequence[str]]
FilterKey = tuple[tuple[str, frozenset[str]], ...]
Search = Callable[[str], re.Match[str] | None]

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
BOM = b"\xef\xbb\xbf"
EMPTY_SHARE = 0.07
QUIET_HOURS = frozenset(range(6))
BUSY_HOURS = frozenset((9, 10, 11, 14, 15, 16))
FILTER_COLUMNS = {
    "statuses": "Status",
    "activityTypes": "ActivityType",
    "definitionIds": "DefinitionId",
    "definitionInstanceIds": "DefinitionInstanceId",
    "activityIds": "ActivityId",
    "contactKeys": "ContactKey",
}
COLUMN_INDEX = {name: index for index, name in enumerate(sfmc.COLUMNS)}
TIME_INDEX = COLUMN_INDEX[sfmc.TIME_COLUMN]
DELIMITERS = {"csv": ",", "tsv": "\t"}
OPEN_STATUSES = frozenset(("Active", "Waiting", "WaitingForAsync"))
MAIN_STATUSES = {"Complete": 80, "Active": 40, "Waiting": 30, "Failed": 20}
STATUS_TABLE = tuple(
    [name for name, weight in MAIN_STATUSES.items() for _ in range(weight)]
    + [name for name in sfmc.STATUSES if name not in MAIN_STATUSES]
)
in_columns_order = operator.itemgetter(*sfmc.COLUMNS)
_BREAKS_OR_QUOTES = re.compile('["\r\n]').search


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
            cached = _draw_hour(self._catalogue, self.seed, hour_ms, self.rows_per_hour)
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


def render(
    rows: Sequence[Row],
    columns: Sequence[str],
    fmt: str,
    *,
    newline: str = "\n",
    bom: bool = False,
    header: bool = True,
) -> bytes:
    """Render rows as the download file: minimal quoting, `"` doubled, UTF-8.

    Raises ValueError for an unknown column or format.
    """
    parts = [BOM] if bom else []
    if header:
        parts.append(render_header(columns, fmt, newline=newline))

    parts.extend(encode_rows(rows, columns, fmt, newline=newline))
    return b"".join(parts)


def render_header(columns: Sequence[str], fmt: str, *, newline: str = "\n") -> bytes:
    """The header line: the requested column names in the requested order."""
    _column_indexes(columns)
    delimiter = _delimiter(fmt)
    return (_line(columns, delimiter, _quoting(delimiter)) + newline).encode()


def encode_rows(
    rows: Sequence[Row], columns: Sequence[str], fmt: str, *, newline: str = "\n"
) -> list[bytes]:
    """Each row rendered as one UTF-8 line, in order.

    A field is quoted when it holds the delimiter, a quote, CR or LF; a lone empty
    field is written `""` so that the line is not blank.
    """
    pick = _picker(_column_indexes(columns))
    delimiter = _delimiter(fmt)
    special = _quoting(delimiter)
    return [(_line(pick(row), delimiter, special) + newline).encode() for row in rows]


def _line(fields: Sequence[str], delimiter: str, special: Search) -> str:
    line = delimiter.join(fields)
    if line.count(delimiter) != len(fields) - 1 or _BREAKS_OR_QUOTES(line):
        return delimiter.join([_quote(f) if special(f) else f for f in fields])

    return line or '""'


def _quoting(delimiter: str) -> Search:
    return re.compile(f'[{re.escape(delimiter)}"\r\n]').search


def _quote(field: str) -> str:
    return '"' + field.replace('"', '""') + '"'


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


def _delimiter(fmt: str) -> str:
    if fmt not in DELIMITERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of csv, tsv")

    return DELIMITERS[fmt]


def _column_indexes(columns: Sequence[str]) -> list[int]:
    unknown = [name for name in columns if name not in COLUMN_INDEX]
    if unknown or not columns:
        raise ValueError(f"unknown column {unknown[0] if unknown else ''!r}")

    return [COLUMN_INDEX[name] for name in columns]


def _picker(indexes: list[int]) -> Callable[[Row], Sequence[str]]:
    if len(indexes) == 1:
        only = indexes[0]
        return lambda row: (row[only],)

    return operator.itemgetter(*indexes)


def _checks(key: FilterKey) -> list[tuple[int, frozenset[str], bool]]:
    return [
        (COLUMN_INDEX[FILTER_COLUMNS[name]], values, name == "statuses")
        for name, values in key
    ]


def _keep(row: Row, checks: list[tuple[int, frozenset[str], bool]]) -> bool:
    for index, values, fold in checks:
        value = row[index].casefold() if fold else row[index]
        if value not in values:
            return False

    return True


def _rendered_weight(rendered: _Rendered) -> int:
    return len(rendered.body) + 72 * len(rendered.offsets)


def _draw_hour(catalogue: Catalogue, seed: int, hour_ms: int, per_hour: int) -> _Hour:
    """Draw one hour's rows from a generator seeded by (seed, hour, rows_per_hour)."""
    started = time.perf_counter()
    rng = random.Random(f"hour:{seed}:{hour_ms}:{per_hour}")
    count = _row_count(rng, hour_ms, per_hour)
    boundary = min(count, rng.randint(1, 2))
    times = [hour_ms] * boundary
    times.extend(
        hour_ms + 1 + rng.randrange(HOUR_MS - 1) for _ in range(count - boundary)
    )
    times.sort(reverse=True)
    rows = _draw_rows(rng, catalogue, hour_ms, times)
    logger.debug(
        "drew %d rows for hour %s in %.1f ms",
        count,
        sfmc.format_time(hour_ms),
        (time.perf_counter() - started) * 1000,
    )
    return _Hour([-moment for moment in times], rows)


def _row_count(rng: random.Random, hour_ms: int, per_hour: int) -> int:
    if rng.random() < EMPTY_SHARE or per_hour <= 0:
        return 0

    hour_of_day = hour_ms // HOUR_MS % 24
    factor = 1.0
    if hour_of_day in QUIET_HOURS:
        factor = 0.2
    elif hour_of_day in BUSY_HOURS:
        factor = 2.0

    return max(2, round(per_hour * factor * rng.uniform(0.85, 1.15)))


def _draw_rows(
    rng: random.Random, catalogue: Catalogue, hour_ms: int, times: list[int]
) -> list[Row]:
    """Draw one row per time; activity starts and journey entries come from pools."""
    starts = [sfmc.format_time(hour_ms - rng.randrange(2 * HOUR_MS)) for _ in range(64)]
    created = [
        sfmc.format_time(hour_ms - 2 * HOUR_MS - rng.randrange(7 * DAY_MS))
        for _ in range(32)
    ]
    draw, bits = rng.random, rng.getrandbits
    versions, contacts = catalogue.versions, catalogue.contacts
    messages, notes = catalogue.result_messages, catalogue.notes
    rows = []
    for moment in times:
        version = versions[int(draw() * len(versions))]
        activities = version.activities
        step = int(draw() * len(activities))
        activity = activities[step]
        status = STATUS_TABLE[int(draw() * len(STATUS_TABLE))]
        failed = status not in OPEN_STATUSES and status != "Complete"
        is_open = status in OPEN_STATUSES
        stamp = sfmc.format_time(moment)
        has_next = step + 1 < len(activities) and not failed
        named = status == "Complete" or draw() > 0.03
        values = {
            "ActivityId": activity.id,
            "ActivityName": activity.name if named else "",
            "ActivityType": activity.type,
            "ClientStatus": CLIENT_STATUSES[int(draw() * len(CLIENT_STATUSES))],
            "ContactKey": contacts[int(draw() * len(contacts))],
            "CreatedDate": created[int(draw() * len(created))],
            "DefinitionId": version.definition_id,
            "DefinitionInstanceId": version.instance_ids[int(draw() * 2)],
            "DefinitionName": version.name,
            "EndDate": "" if is_open else stamp,
            "EntrySource": version.entry_source,
            "EpochTimeInMilliseconds": str(moment),
            "EventId": guid(bits(128)),
            "EventName": version.event_name,
            "Id": guid(bits(128)),
            "Message": notes[int(draw() * len(notes))] if draw() < 0.15 else "",
            "OutcomeActivityId": activities[step + 1].id if has_next else "",
            "SourceType": version.source_type,
            "StartDate": starts[int(draw() * len(starts))],
            "Status": status,
            "TransactionTime": stamp,
            "Result.Messages": messages[int(draw() * len(messages))]
            if draw() < 0.8
            else "",
            "Result.Outcome": "Failure"
            if failed
            else "Pending"
            if is_open
            else "Success",
            "Result.Status": "Failed"
            if failed
            else "InProgress"
            if is_open
            else "Succeeded",
            "Result.Tags": TAGS[int(draw() * len(TAGS))],
        }
        rows.append(in_columns_order(values))

    return rows
