"""Parse the times and durations users write on the command line and in configs.

Every time is returned as an aware UTC ``datetime``.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo

from orchestrator.errors import UsageError

UTC = dt.UTC
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)

_DURATION = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_SECONDS = 3650 * 86400
_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")

TIME_HELP = (
    "write it as ISO 8601 with Z or an offset (2026-11-03T05:00:00Z, "
    "2026-11-03T00:00-05:00), a date (2026-11-03, midnight UTC), now, today, "
    "yesterday, or a time ago (-24h, -90m, -7d)"
)


def parse_duration(text: str, *, name: str = "duration") -> dt.timedelta:
    """Parse ``90s``, ``30m``, ``1h`` or ``2d``."""
    match = _DURATION.match(text)
    if match is None:
        raise UsageError(
            f"{name} {text!r} is not a duration: write a number and s, m, h or d "
            "(90s, 30m, 1h)"
        )

    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds > MAX_SECONDS:
        raise UsageError(f"{name} {text!r} is too long: at most 3650d")

    return dt.timedelta(seconds=seconds)


def parse_time(
    text: str, *, now: dt.datetime, name: str = "time", zone: dt.tzinfo = UTC
) -> dt.datetime:
    """Parse an absolute or relative time; ``now`` anchors the relative forms.

    Dates, ``today`` and ``yesterday`` are midnight in ``zone`` (UTC unless asked),
    so a local day across a daylight-saving change is 23 or 25 hours long.
    """
    try:
        return _parse_time(text.strip(), text, now=now, name=name, zone=zone)
    except OverflowError:
        raise UsageError(
            f"{name} {text!r} is out of range: give a time within SFMC's retention"
        ) from None


def _parse_time(
    value: str, text: str, *, now: dt.datetime, name: str, zone: dt.tzinfo
) -> dt.datetime:
    relative = _parse_relative(value, now, zone)
    if relative is not None:
        return relative

    if _DATE_ONLY.match(value):
        try:
            return _midnight(dt.date.fromisoformat(value), zone)
        except ValueError as error:
            raise UsageError(f"{name} {text!r} is not a date: {error}") from None

    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{name} {text!r} is not a time: {TIME_HELP}") from None

    if moment.tzinfo is None:
        raise UsageError(
            f"{name} {text!r} has no offset, so it could be any time zone: "
            f"write {value}Z for UTC or {value}-05:00 for an offset"
        )

    return moment.astimezone(UTC)


def _parse_relative(
    value: str, now: dt.datetime, zone: dt.tzinfo
) -> dt.datetime | None:
    today = now.astimezone(zone).date()
    if value == "now":
        return now.astimezone(UTC)

    if value == "today":
        return _midnight(today, zone)

    if value == "yesterday":
        return _midnight(today - dt.timedelta(days=1), zone)

    if value.startswith("-") and _DURATION.match(value[1:]):
        return now.astimezone(UTC) - parse_duration(value[1:])

    return None


def _midnight(day: dt.date, zone: dt.tzinfo) -> dt.datetime:
    local = dt.datetime(day.year, day.month, day.day, tzinfo=zone)
    return local.astimezone(UTC)


def load_zone(name: str) -> dt.tzinfo:
    """The time zone called ``name`` (IANA, e.g. Europe/Paris), or UsageError."""
    if name.upper() == "UTC":
        return UTC

    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise UsageError(
            f"time zone {name!r} is unknown: use an IANA name such as Europe/Paris "
            "(if every name fails, install the tz database: pip install tzdata)"
        ) from None


def to_millis(moment: dt.datetime) -> int:
    """Epoch milliseconds of an aware datetime."""
    return (moment - EPOCH) // dt.timedelta(milliseconds=1)


def from_millis(millis: int) -> dt.datetime:
    """The aware UTC datetime of epoch milliseconds."""
    return EPOCH + dt.timedelta(milliseconds=millis)


def iso(moment: dt.datetime) -> str:
    """Compact ISO 8601 in UTC for logs and the manifest: 2026-11-03T05:00:00Z."""
    text = moment.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.replace(".000+00:00", "Z").replace("+00:00", "Z")
