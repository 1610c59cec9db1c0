"""The sandbox's synthetic history: determinism, shape of the data, rendering."""

from __future__ import annotations

import csv
import io
import re
import time
from collections import Counter

import pytest

from orchestrator import sfmc
from orchestrator.sandbox.history import (
    BOM,
    DAY_MS,
    FILTER_COLUMNS,
    HOUR_MS,
    History,
    Row,
    hour_floor,
    render,
)

NOW = 1_708_084_800_000  # 2024-02-16T12:00:00.000Z
DAY_START = NOW - DAY_MS  # 2024-02-15T12:00:00.000Z
GUID = re.compile(
    r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
)
INDEX = {name: index for index, name in enumerate(sfmc.COLUMNS)}


def field(row: Row, name: str) -> str:
    return row[INDEX[name]]


def moment(row: Row) -> int:
    return int(field(row, "EpochTimeInMilliseconds"))


def day_rows(history: History) -> list[Row]:
    return history.rows(DAY_START, NOW)


def parse(body: bytes, delimiter: str = ",") -> list[list[str]]:
    text = body.decode()
    return list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))


@pytest.fixture(scope="module")
def history() -> History:
    return History(7, 200, now_ms=NOW)


def test_the_same_seed_gives_the_same_rows_whatever_the_clock() -> None:
    first = History(7, 200, now_ms=NOW)
    later = History(7, 200, now_ms=NOW + 3 * DAY_MS + 12_345)

    assert first.rows(DAY_START, NOW) == later.rows(DAY_START, NOW)
    assert first.window(DAY_START, NOW, sfmc.COLUMNS, "csv") == later.window(
        DAY_START, NOW, sfmc.COLUMNS, "csv"
    )


def test_another_seed_or_volume_gives_other_rows(history: History) -> None:
    other_seed = History(8, 200, now_ms=NOW)
    other_volume = History(7, 300, now_ms=NOW)

    assert other_seed.rows(DAY_START, NOW) != day_rows(history)
    assert other_volume.rows(DAY_START, NOW) != day_rows(history)


def test_every_non_empty_hour_has_one_or_two_rows_at_its_exact_start() -> None:
    history = History(7, 50, now_ms=NOW)
    for hour in range(NOW - 3 * DAY_MS, NOW, HOUR_MS):
        rows = history.hour(hour)
        at_start = sum(moment(row) == hour for row in rows)

        assert at_start in ((1, 2) if rows else (0,))


def test_hours_vary_quiet_busy_and_empty() -> None:
    history = History(7, 40, now_ms=NOW)
    hours = range(NOW - 30 * DAY_MS, NOW, HOUR_MS)
    counts = {hour: len(history.hour(hour)) for hour in hours}
    by_hour_of_day: dict[int, list[int]] = {}
    for hour, count in counts.items():
        by_hour_of_day.setdefault(hour // HOUR_MS % 24, []).append(count)

    def mean_of_full(hour_of_day: int) -> float:
        full = [count for count in by_hour_of_day[hour_of_day] if count]
        return sum(full) / len(full)

    empty_share = sum(count == 0 for count in counts.values()) / len(counts)
    assert 0.04 <= empty_share <= 0.11
    assert 6 <= mean_of_full(3) <= 10
    assert 68 <= mean_of_full(15) <= 92
    assert 34 <= mean_of_full(20) <= 46


def test_rows_are_newest_first_and_inside_the_window(history: History) -> None:
    start, end = DAY_START + 1_234_567, NOW - 7_654_321
    times = [moment(row) for row in history.rows(start, end)]

    assert times == sorted(times, reverse=True)
    assert start <= min(times)
    assert max(times) < end
    assert len(times) > 1000


def test_a_row_holds_25_consistent_fields(history: History) -> None:
    for row in day_rows(history):
        assert len(row) == len(sfmc.COLUMNS)
        assert all(isinstance(value, str) for value in row)
        assert field(row, "TransactionTime") == sfmc.format_time(moment(row))
        assert GUID.match(field(row, "Id"))
        assert GUID.match(field(row, "EventId"))
        assert field(row, "Status") in sfmc.STATUSES
        assert field(row, "ActivityType") in sfmc.ACTIVITY_TYPES
        assert field(row, "StartDate") <= field(row, "TransactionTime")
        assert field(row, "CreatedDate") < field(row, "StartDate")


def test_ids_come_from_a_small_fixed_cast(history: History) -> None:
    rows = day_rows(history)
    definitions = {field(row, "DefinitionId") for row in rows}
    names = {field(row, "DefinitionName") for row in rows}

    assert len(names) == 6
    assert 12 <= len(definitions) <= 24
    assert len({field(row, "DefinitionInstanceId") for row in rows}) <= 3 * 24
    assert len({field(row, "Id") for row in rows}) == len(rows)


def test_values_include_the_awkward_cases(history: History) -> None:
    rows = day_rows(history)
    keys = [field(row, "ContactKey") for row in rows]
    messages = [field(row, "Message") for row in rows]
    results = [
        field(row, "Result.Messages") for row in rows if field(row, "Result.Messages")
    ]
    statuses = Counter(field(row, "Status") for row in rows)

    assert any("," in key for key in keys)
    assert any('"' in key for key in keys)
    assert any("@" in key for key in keys)
    assert any(key.startswith("003") for key in keys)
    assert any('"' in text and "\n" in text for text in messages)
    assert any("\r\n" in text for text in messages)
    assert all(re.match(r"^(\w+:[^;|]+;?)+(\|(\w+:[^;|]+;?)+)+$", r) for r in results)
    assert any("," in result for result in results)
    assert "" in {field(row, "EndDate") for row in rows}
    main = sum(statuses[name] for name in ("Complete", "Active", "Waiting", "Failed"))
    assert main / len(rows) > 0.75


def test_completed_rows_always_name_their_activity(history: History) -> None:
    rows = day_rows(history)
    unnamed = [row for row in rows if not field(row, "ActivityName")]

    assert unnamed
    assert all(field(row, "Status") != "Complete" for row in unnamed)


def test_status_filter_ignores_case(history: History) -> None:
    failed = history.rows(DAY_START, NOW, filters={"statuses": ["failed"]})

    assert failed
    assert failed == history.rows(DAY_START, NOW, filters={"statuses": ["Failed"]})
    assert failed == [
        row for row in day_rows(history) if field(row, "Status") == "Failed"
    ]


@pytest.mark.parametrize("key", sorted(FILTER_COLUMNS))
def test_each_filter_keeps_only_matching_rows(history: History, key: str) -> None:
    column = FILTER_COLUMNS[key]
    wanted = sorted({field(row, column) for row in day_rows(history)})[:2]
    kept = history.rows(DAY_START, NOW, filters={key: wanted})

    assert kept
    assert kept == [row for row in day_rows(history) if field(row, column) in wanted]


def test_filters_combine_and_empty_lists_mean_no_filter(history: History) -> None:
    rows = day_rows(history)
    definition = field(rows[0], "DefinitionId")
    filters = {
        "definitionIds": [definition],
        "statuses": ["Complete"],
        "contactKeys": [],
    }
    kept = history.rows(DAY_START, NOW, filters=filters)

    assert kept == [
        row
        for row in rows
        if field(row, "DefinitionId") == definition
        and field(row, "Status") == "Complete"
    ]
    assert history.rows(DAY_START, NOW, filters={"statuses": []}) == rows


def test_filter_keys_match_the_request_body_names() -> None:
    assert set(FILTER_COLUMNS) == set(sfmc.FILTER_KEYS.values())
    with pytest.raises(ValueError, match="unknown filter 'status'"):
        History(7, 10, now_ms=NOW).rows(DAY_START, NOW, filters={"status": ["x"]})


def test_an_inclusive_end_adds_the_rows_at_the_end(history: History) -> None:
    hour = next(h for h in range(DAY_START, NOW, HOUR_MS) if history.hour(h + HOUR_MS))
    at_end = [
        row for row in history.hour(hour + HOUR_MS) if moment(row) == hour + HOUR_MS
    ]
    exclusive = history.rows(hour, hour + HOUR_MS)
    inclusive = history.rows(hour, hour + HOUR_MS, end_inclusive=True)

    assert inclusive == at_end + exclusive
    assert history.expected(hour, hour + HOUR_MS) == exclusive


def test_rows_exist_only_inside_retention_and_before_now() -> None:
    now = NOW + 1_800_000
    history = History(7, 5, now_ms=now, retention_days=30)
    oldest = hour_floor(now - 30 * DAY_MS)
    rows = history.rows(oldest - DAY_MS, now + DAY_MS)

    assert min(map(moment, rows)) >= oldest
    assert max(map(moment, rows)) < now
    assert history.rows(oldest - DAY_MS, oldest) == []
    assert history.rows(oldest, oldest + HOUR_MS) == history.hour(oldest)


def test_render_quotes_only_what_must_be_quoted() -> None:
    row = tuple(f"v{index}" for index in range(len(sfmc.COLUMNS)))
    values = {"ContactKey": 'Doe, "J"', "Message": "a\r\nb", "Status": "", "Id": "x\ty"}
    row = tuple(values.get(name, row[INDEX[name]]) for name in sfmc.COLUMNS)
    columns = ["ContactKey", "Message", "Status", "Id"]

    csv_body = render([row], columns, "csv")
    tsv_body = render([row], columns, "tsv", newline="\r\n", bom=True)

    assert csv_body == b'ContactKey,Message,Status,Id\n"Doe, ""J""","a\r\nb",,x\ty\n'
    assert (
        tsv_body
        == BOM
        + b'ContactKey\tMessage\tStatus\tId\r\n"Doe, ""J"""\t"a\r\nb"\t\t"x\ty"\r\n'
    )


def test_a_lone_empty_field_is_not_a_blank_line(history: History) -> None:
    rows = [row for row in day_rows(history) if not field(row, "ActivityName")][:2]

    assert render(rows, ["ActivityName"], "csv", header=False) == b'""\n""\n'


@pytest.mark.parametrize(("fmt", "delimiter"), [("csv", ","), ("tsv", "\t")])
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_render_round_trips_through_the_csv_module(
    history: History, fmt: str, delimiter: str, newline: str
) -> None:
    rows = day_rows(history)
    body = render(rows, sfmc.COLUMNS, fmt, newline=newline)

    assert parse(body, delimiter) == [list(sfmc.COLUMNS), *map(list, rows)]


def test_render_puts_the_bom_first_and_can_skip_the_header(history: History) -> None:
    rows = day_rows(history)[:3]
    body = render(rows, ["TransactionTime"], "csv", bom=True, header=False)

    assert (
        body
        == BOM + "".join(field(row, "TransactionTime") + "\n" for row in rows).encode()
    )


def test_render_refuses_unknown_columns_and_formats(history: History) -> None:
    with pytest.raises(ValueError, match="unknown column 'Nope'"):
        render([], ["Status", "Nope"], "csv")

    with pytest.raises(ValueError, match="unknown format 'xml'"):
        render([], ["Status"], "xml")


@pytest.mark.parametrize("inclusive", [False, True])
def test_window_bytes_equal_rendered_rows(history: History, inclusive: bool) -> None:
    start, end = DAY_START + 777_777, DAY_START + 5 * HOUR_MS
    filters = {"statuses": ["complete", "failed"]}
    columns = ["Status", "TransactionTime", "Result.Messages"]
    rows = history.rows(start, end, filters=filters, end_inclusive=inclusive)
    window = history.window(
        start,
        end,
        columns,
        "tsv",
        filters=filters,
        end_inclusive=inclusive,
        newline="\r\n",
    )

    assert window.row_count == len(rows)
    assert window.body == render(rows, columns, "tsv", newline="\r\n")


def test_an_empty_window_renders_the_header_alone(history: History) -> None:
    window = history.window(NOW - DAY_MS, NOW - DAY_MS, ["Status", "Id"], "csv")

    assert window.body == b"Status,Id\n"
    assert window.row_count == 0


def test_one_thousand_row_hour_draws_and_renders_fast() -> None:
    history = History(11, 1000, now_ms=NOW)
    hour = DAY_START + 8 * HOUR_MS  # 20:00 UTC, an ordinary hour
    started = time.perf_counter()
    window = history.window(hour, hour + HOUR_MS, sfmc.DEFAULT_COLUMNS, "csv")
    elapsed = time.perf_counter() - started

    assert 800 <= window.row_count <= 1200
    assert elapsed < 0.2
