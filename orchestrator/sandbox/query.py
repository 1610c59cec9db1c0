"""Reading a download, estimate or truth request: the query string and the JSON body."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from orchestrator import sfmc

BAD_BODY = 10000
BAD_TIME = 10001
BAD_COLUMN = 10002
BAD_FORMAT = 10003
BAD_FILTER = 10004
NO_DIRECT_PIPE = 10005
TOO_LARGE = 10006


class BadRequest(Exception):
    """A request the API answers with 400 and an errorcode in 10000-10006."""

    def __init__(self, errorcode: int, message: str) -> None:
        super().__init__(message)
        self.errorcode = errorcode
        self.message = message


@dataclass(frozen=True, slots=True)
class DownloadQuery:
    """What a download asks for; times in epoch milliseconds (UTC)."""

    start_ms: int
    end_ms: int
    columns: tuple[str, ...]
    fmt: str
    filters: Mapping[str, tuple[str, ...]]


def parse_time(text: object) -> int:
    """Epoch milliseconds of an ISO 8601 time; no offset means UTC.

    Raises ValueError when `text` is not an ISO 8601 string, or names a moment
    whose UTC date is before year 1 or after year 9999.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected an ISO 8601 string, got {text!r}")

    moment = dt.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)

    try:
        moment = moment.astimezone(dt.UTC)
    except OverflowError:
        raise ValueError(f"{text!r} is out of range in UTC") from None

    return (moment - sfmc.EPOCH) // dt.timedelta(milliseconds=1)


async def read_query(request: web.Request) -> DownloadQuery:
    """Read and check the query and body. Raises BadRequest."""
    fmt = request.query.get("format", "csv").strip().lower()
    if fmt not in sfmc.FORMATS:
        raise BadRequest(BAD_FORMAT, f"Unknown format {fmt!r}; use csv or tsv.")

    columns = _columns(request.query.get("columns"))
    body = _body(await request.read())
    start_ms, end_ms = _time(body, "start"), _time(body, "end")
    if start_ms > end_ms:
        raise BadRequest(BAD_TIME, "The start must not be later than the end.")

    return DownloadQuery(start_ms, end_ms, columns, fmt, _filters(body))


def _columns(text: str | None) -> tuple[str, ...]:
    if text is None:
        return sfmc.DEFAULT_COLUMNS

    columns = tuple(name.strip() for name in text.split(","))
    for name in columns:
        if name not in sfmc.COLUMNS:
            raise BadRequest(BAD_COLUMN, f"Unknown column {name!r} in columns.")

    return columns


def _body(raw: bytes) -> dict[str, object]:
    try:
        body = json.loads(raw) if raw.strip() else None
    except ValueError:
        body = None

    if not isinstance(body, dict):
        raise BadRequest(BAD_BODY, "The request body must be a JSON object.")

    return body


def _time(body: Mapping[str, object], name: str) -> int:
    if name not in body:
        raise BadRequest(BAD_TIME, f"The {name} date is required.")

    try:
        return parse_time(body[name])
    except ValueError:
        text = f"The {name} date {body[name]!r} is not a valid ISO 8601 date."
        raise BadRequest(BAD_TIME, text) from None


def _filters(body: Mapping[str, object]) -> dict[str, tuple[str, ...]]:
    filters = {}
    for name in sfmc.FILTER_KEYS.values():
        values = body.get(name)
        if values is None:
            continue

        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise BadRequest(
                BAD_FILTER, f"The {name} filter must be a list of strings."
            )

        filters[name] = tuple(values)

    return filters
