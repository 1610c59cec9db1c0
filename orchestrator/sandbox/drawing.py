"""Drawing the rows of one hour from the catalogue, with a generator seeded per hour."""

from __future__ import annotations

import logging
import operator
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from orchestrator import sfmc
from orchestrator.sandbox.catalogue import (
    CLIENT_STATUSES,
    TAGS,
    Catalogue,
    JourneyVersion,
    guid,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
Row = tuple[str, ...]
Draw = Callable[[], float]

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
EMPTY_SHARE = 0.07
QUIET_HOURS = frozenset(range(6))
BUSY_HOURS = frozenset((9, 10, 11, 14, 15, 16))
OPEN_STATUSES = frozenset(("Active", "Waiting", "WaitingForAsync"))
MAIN_STATUSES = {"Complete": 80, "Active": 40, "Waiting": 30, "Failed": 20}
STATUS_TABLE = tuple(
    [name for name, weight in MAIN_STATUSES.items() for _ in range(weight)]
    + [name for name in sfmc.STATUSES if name not in MAIN_STATUSES]
)
# Result.Outcome and Result.Status by how far the contact got.
RESULTS = {
    "failed": ("Failure", "Failed"),
    "open": ("Pending", "InProgress"),
    "done": ("Success", "Succeeded"),
}
in_columns_order = operator.itemgetter(*sfmc.COLUMNS)


@dataclass(frozen=True, slots=True)
class _Pools:
    """Per-hour times shared by many rows: activity starts and journey entries."""

    starts: list[str]
    created: list[str]


def draw_hour(
    catalogue: Catalogue, seed: int, hour_ms: int, per_hour: int
) -> tuple[list[int], list[Row]]:
    """The times (descending) and rows of the hour starting at `hour_ms`.

    Depends only on the arguments. A non-empty hour has one or two rows at exactly
    `hour_ms`; the other times are spread over the rest of the hour.
    """
    started = time.perf_counter()
    rng = random.Random(f"hour:{seed}:{hour_ms}:{per_hour}")
    count = row_count(rng, hour_ms, per_hour)
    boundary = min(count, rng.randint(1, 2))
    times = [hour_ms] * boundary
    times.extend(
        hour_ms + 1 + rng.randrange(HOUR_MS - 1) for _ in range(count - boundary)
    )
    times.sort(reverse=True)
    pools = _pools(rng, hour_ms)
    rows = [_draw_row(rng, catalogue, pools, moment) for moment in times]
    elapsed_ms = (time.perf_counter() - started) * 1000
    logger.debug("drew %d rows for %s in %.1f ms", count, hour_ms, elapsed_ms)
    return times, rows


def row_count(rng: random.Random, hour_ms: int, per_hour: int) -> int:
    """How many rows an hour holds: quiet nights, busy hours, some hours empty."""
    if rng.random() < EMPTY_SHARE or per_hour <= 0:
        return 0

    hour_of_day = hour_ms // HOUR_MS % 24
    factor = 1.0
    if hour_of_day in QUIET_HOURS:
        factor = 0.2
    elif hour_of_day in BUSY_HOURS:
        factor = 2.0

    return max(2, round(per_hour * factor * rng.uniform(0.85, 1.15)))


def _pools(rng: random.Random, hour_ms: int) -> _Pools:
    starts = [hour_ms - rng.randrange(2 * HOUR_MS) for _ in range(64)]
    created = [hour_ms - 2 * HOUR_MS - rng.randrange(7 * DAY_MS) for _ in range(32)]
    return _Pools(
        starts=[sfmc.format_time(moment) for moment in starts],
        created=[sfmc.format_time(moment) for moment in created],
    )


def _pick(draw: Draw, choices: Sequence[T]) -> T:
    return choices[int(draw() * len(choices))]


def _draw_row(
    rng: random.Random, catalogue: Catalogue, pools: _Pools, moment: int
) -> Row:
    draw = rng.random
    version = _pick(draw, catalogue.versions)
    status = _pick(draw, STATUS_TABLE)
    phase = "open" if status in OPEN_STATUSES else "done"
    if status not in OPEN_STATUSES and status != "Complete":
        phase = "failed"

    values = _journey_fields(draw, version, status, phase)
    values.update(_event_fields(rng, catalogue, pools, moment, phase))
    row: Row = in_columns_order(values)
    return row


def _journey_fields(
    draw: Draw, version: JourneyVersion, status: str, phase: str
) -> dict[str, str]:
    """Where the row happened: journey version, activity, entry source, status."""
    step = int(draw() * len(version.activities))
    activity = version.activities[step]
    following = version.activities[step + 1 :][:1]
    named = status == "Complete" or draw() > 0.03
    return {
        "ActivityId": activity.id,
        "ActivityName": activity.name if named else "",
        "ActivityType": activity.type,
        "DefinitionId": version.definition_id,
        "DefinitionInstanceId": _pick(draw, version.instance_ids),
        "DefinitionName": version.name,
        "EntrySource": version.entry_source,
        "EventName": version.event_name,
        "OutcomeActivityId": following[0].id if following and phase != "failed" else "",
        "SourceType": version.source_type,
        "Status": status,
    }


def _event_fields(
    rng: random.Random, catalogue: Catalogue, pools: _Pools, moment: int, phase: str
) -> dict[str, str]:
    """What happened: who, when, with which ids and result messages."""
    draw = rng.random
    stamp = sfmc.format_time(moment)
    outcome, result = RESULTS[phase]
    note = _pick(draw, catalogue.notes) if draw() < 0.15 else ""
    messages = _pick(draw, catalogue.result_messages) if draw() < 0.8 else ""
    return {
        "ClientStatus": _pick(draw, CLIENT_STATUSES),
        "ContactKey": _pick(draw, catalogue.contacts),
        "CreatedDate": _pick(draw, pools.created),
        "EndDate": "" if phase == "open" else stamp,
        "EpochTimeInMilliseconds": str(moment),
        "EventId": guid(rng.getrandbits(128)),
        "Id": guid(rng.getrandbits(128)),
        "Message": note,
        "StartDate": _pick(draw, pools.starts),
        "TransactionTime": stamp,
        "Result.Messages": messages,
        "Result.Outcome": outcome,
        "Result.Status": result,
        "Result.Tags": _pick(draw, TAGS),
    }
