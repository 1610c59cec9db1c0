from __future__ import annotations

import datetime as dt
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator import sfmc
from orchestrator.config import ExportRequest, RunSettings
from orchestrator.credentials import Credentials
from orchestrator.planner import plan_windows
from orchestrator.sandbox import History, SandboxServer, render
from orchestrator.timeparse import to_millis

HOUR = dt.timedelta(hours=1)


def hour_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)


def credentials_for(sandbox: SandboxServer) -> Credentials:
    return Credentials(
        client_id=sandbox.settings.client_id,
        client_secret=sandbox.settings.client_secret,
        auth_url=sandbox.auth_url,
    )


def run_settings(
    output: Path,
    start: dt.datetime,
    end: dt.datetime,
    *,
    request: ExportRequest | None = None,
    **options: Any,
) -> RunSettings:
    return RunSettings(
        start=start,
        end=end,
        output=output,
        request=request or ExportRequest(),
        **options,
    )


def expected_output(
    history: History,
    start: dt.datetime,
    end: dt.datetime,
    *,
    span: dt.timedelta = HOUR,
    columns: Sequence[str] = sfmc.DEFAULT_COLUMNS,
    fmt: str = "csv",
    newline: str = "\n",
    filters: dict[str, list[str]] | None = None,
) -> bytes:
    """The exact bytes a correct export must write: header, then windows in order."""
    delimiter = "\t" if fmt == "tsv" else ","
    out = [(delimiter.join(columns) + newline).encode()]
    for window in plan_windows(start, end, span):
        rows = history.expected(
            to_millis(window.start), to_millis(window.end), filters=filters
        )
        out.append(render(rows, columns, fmt, newline=newline, header=False))
    return b"".join(out)


def find_range_with_empty_hour(history: History, hours: int = 5) -> dt.datetime:
    """A start hour such that [start, start + hours) has empty and busy hours."""
    now = hour_now()
    for back in range(hours + 2, 24 * 20):
        start = now - back * HOUR
        counts = [
            len(
                history.expected(
                    to_millis(start + i * HOUR), to_millis(start + (i + 1) * HOUR)
                )
            )
            for i in range(hours)
        ]
        if 0 in counts[1:-1] and max(counts) > 0:
            return start
    raise AssertionError("the sandbox history has no empty hour in 20 days")


def expected_row_count(
    history: History, start: dt.datetime, end: dt.datetime, *, span: dt.timedelta = HOUR
) -> int:
    return sum(
        len(history.expected(to_millis(w.start), to_millis(w.end)))
        for w in plan_windows(start, end, span)
    )


def draw_columns(rng: random.Random, end_inclusive: bool) -> tuple[str, ...]:
    """Columns for a chaos scenario: the defaults, all 25, or a few in any order."""
    choice = rng.random()
    if choice < 0.4:
        return sfmc.DEFAULT_COLUMNS

    if choice < 0.7:
        return sfmc.COLUMNS  # Result.Messages: quotes, separators, line breaks

    picked = rng.sample(sfmc.COLUMNS, rng.randint(2, 10))
    if sfmc.TIME_COLUMN not in picked and (end_inclusive or rng.random() < 0.5):
        # Without TransactionTime an inclusive end repeats boundary rows (README).
        picked.insert(rng.randrange(len(picked) + 1), sfmc.TIME_COLUMN)

    return tuple(picked)
