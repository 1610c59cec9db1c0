"""The API's hard edges end to end: the size cap, retention, freshness, encodings."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator.commands import exit_code_of, summary_line
from orchestrator.config import ExportRequest, RunSettings
from orchestrator.errors import ExitCode, ManifestError, UsageError
from orchestrator.export import Hooks, run_export
from orchestrator.job import ExportJob, ExportResult
from orchestrator.manifest import ExportPaths, Manifest, WindowRecord
from orchestrator.sandbox import History, SandboxServer, SandboxSettings, parse_faults
from orchestrator.timeparse import iso, to_millis
from tests.conftest import (
    HOUR,
    credentials_for,
    expected_output,
    expected_row_count,
    find_range_with_empty_hour,
    hour_now,
    run_settings,
)
from tests.test_faults_e2e import FAST_RETRY, no_wait

MINUTE = dt.timedelta(minutes=1)


def busy_start(sandbox: SandboxServer, hours: int = 3) -> dt.datetime:
    """An hour-aligned start whose hours all hold rows."""
    now = hour_now()
    for back in range(hours + 3, 24 * 20):
        start = now - back * HOUR
        counts = [
            len(
                sandbox.history.expected(
                    to_millis(start + i * HOUR), to_millis(start + (i + 1) * HOUR)
                )
            )
            for i in range(hours)
        ]
        if min(counts) > 50:
            return start
    raise AssertionError("no busy range")


async def export(
    sandbox: SandboxServer,
    output: Path,
    start: dt.datetime,
    end: dt.datetime,
    **options: Any,
) -> Any:
    return await run_export(
        run_settings(output, start, end, **options), credentials_for(sandbox)
    )


async def test_windows_estimated_over_the_cap_are_split_before_download(
    tmp_path: Path,
) -> None:
    async with SandboxServer(SandboxSettings(rows_per_hour=200)) as sandbox:
        start = busy_start(sandbox)
        end = start + 3 * HOUR
        output = tmp_path / "o.csv"
        result = await export(
            sandbox, output, start, end, cap_bytes=4_000, keep_parts=True
        )
        attempts = sum(sandbox.stats.downloads.values())

    manifest = Manifest.load(ExportPaths(output).manifest)
    assert result.complete
    assert len(manifest.windows) > 3
    assert all(r.attempts == 1 for r in manifest.windows)
    assert attempts == len(manifest.windows)
    assert output.read_bytes() == expected_output(sandbox.history, start, end)


@pytest.mark.parametrize("behaviour", ["cut", "error"])
async def test_a_download_reaching_the_cap_is_split_and_requested_again(
    tmp_path: Path, behaviour: str
) -> None:
    settings = SandboxSettings(
        rows_per_hour=200,
        cap_bytes=6_000,
        cap_behaviour=behaviour,  # type: ignore[arg-type]
    )
    async with SandboxServer(settings) as sandbox:
        start = busy_start(sandbox)
        end = start + 3 * HOUR
        output = tmp_path / "o.csv"
        result = await export(
            sandbox, output, start, end, cap_bytes=6_000, estimate=False
        )

    manifest = Manifest.load(ExportPaths(output).manifest)
    assert result.complete
    assert len(manifest.windows) > 3
    assert output.read_bytes() == expected_output(sandbox.history, start, end)


async def test_a_compressed_body_cut_at_the_same_size_twice_is_split(
    tmp_path: Path,
) -> None:
    # The server's limit is far below our safety cap: its cuts, framing whole, end
    # the gzip stream early at the same size on every attempt.
    settings = SandboxSettings(rows_per_hour=200, cap_bytes=6_000, cap_behaviour="cut")
    async with SandboxServer(settings) as sandbox:
        start = busy_start(sandbox)
        end = start + 3 * HOUR
        output = tmp_path / "o.csv"
        result = await export(sandbox, output, start, end, estimate=False)

    manifest = Manifest.load(ExportPaths(output).manifest)
    assert result.complete
    assert len(manifest.windows) > 3
    assert output.read_bytes() == expected_output(sandbox.history, start, end)


async def test_a_window_that_cannot_be_split_further_fails_saying_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = SandboxSettings(rows_per_hour=200, cap_bytes=50, cap_behaviour="error")
    async with SandboxServer(settings) as sandbox:
        start = busy_start(sandbox, hours=1)
        result = await export(
            sandbox,
            tmp_path / "o.csv",
            start,
            start + HOUR,
            cap_bytes=50,
            estimate=False,
            min_window=dt.timedelta(minutes=15),
        )

    assert not result.complete
    assert result.failed
    assert all("cannot be split further" in e for e in result.failed.values())
    assert exit_code_of(result) == ExitCode.USAGE  # only a smaller --min-window helps
    events = [
        getattr(r, "event", None) for r in caplog.records if r.levelname == "ERROR"
    ]
    assert events.count("window_failed") == len(result.failed)  # for --log-format json


async def test_a_smallest_window_cut_alike_again_and_again_is_asked_again(
    tmp_path: Path,
) -> None:
    # Cuts at the same size look like a size limit, but at the smallest window they
    # may be faults: it is asked again like any cut body, never refused (exit 2).
    faults = parse_faults(["cut_gzip@1", "cut_gzip@2", "cut_gzip@3"])
    settings = SandboxSettings(rows_per_hour=200, faults=faults)
    minute = MINUTE
    async with SandboxServer(settings) as sandbox:
        hour = busy_start(sandbox, hours=1)
        start = next(
            hour + i * minute
            for i in range(60)
            if expected_row_count(
                sandbox.history, hour + i * minute, hour + (i + 1) * minute
            )
        )
        output = tmp_path / "o.csv"
        options = {"window": minute, "min_window": minute, "estimate": False}
        done = await export(
            sandbox, output, start, start + minute, retry=FAST_RETRY, **options
        )

    assert done.complete
    assert Manifest.load(ExportPaths(output).manifest).windows[0].attempts == 4
    assert output.read_bytes() == expected_output(
        sandbox.history, start, start + minute
    )


@pytest.mark.parametrize("cut", [True, False])
async def test_a_body_cut_at_a_rows_end_far_short_of_its_estimate_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, cut: bool
) -> None:
    # A server limit under --safety-cap-mb that cuts an uncompressed body right
    # after a row leaves a body that looks whole; only the estimate tells.
    history = History(7, 12_000)
    start = next(  # an hour of over 1.5 MB: its estimate is checked
        begin
        for begin in (hour_now() - back * HOUR for back in range(5, 29))
        if len(history.expected(to_millis(begin), to_millis(begin + HOUR))) > 10_000
    )
    body = expected_output(history, start, start + HOUR)
    row_end = next(
        at
        for at in range(len(body) // 3, len(body))
        if body[at] == ord("\n") and body[: at + 1].count(b'"') % 2 == 0
    )
    limit = row_end + 1 if cut else None
    settings = SandboxSettings(rows_per_hour=12_000, cap_bytes=limit)
    async with SandboxServer(settings) as sandbox:
        output = tmp_path / "o.csv"
        result = await export(sandbox, output, start, start + HOUR, compression="none")

    assert result.complete
    assert (output.stat().st_size == row_end + 1) == cut
    warned = "under half its estimate" in caplog.text
    assert warned == cut


@pytest.mark.parametrize("shape", ["b", "garbage"])
async def test_estimates_of_another_shape_or_unreadable_do_not_stop_the_run(
    tmp_path: Path, shape: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = SandboxSettings(rows_per_hour=50, estimate_shape=shape)  # type: ignore[arg-type]
    async with SandboxServer(settings) as sandbox:
        start = find_range_with_empty_hour(sandbox.history)
        output = tmp_path / "o.csv"
        result = await export(sandbox, output, start, start + 3 * HOUR)

    assert result.complete
    assert output.read_bytes() == expected_output(
        sandbox.history, start, start + 3 * HOUR
    )
    understood = "estimate answer not understood" not in caplog.text
    assert understood == (shape == "b")


async def test_a_range_past_retention_is_refused_naming_the_lost_part(
    tmp_path: Path,
) -> None:
    async with SandboxServer(SandboxSettings(rows_per_hour=10)) as sandbox:
        end = hour_now() - 29 * 24 * HOUR
        start = end - 3 * 24 * HOUR
        with pytest.raises(
            UsageError, match=r"past SFMC's 30-day retention.*--retained-only"
        ):
            await export(sandbox, tmp_path / "o.csv", start, end)
        assert sum(sandbox.stats.downloads.values()) == 0
    assert not ExportPaths(tmp_path / "o.csv").manifest.exists()  # nothing left over


async def test_retained_only_exports_what_is_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with SandboxServer(SandboxSettings(rows_per_hour=10)) as sandbox:
        end = hour_now() - 29 * 24 * HOUR
        start = end - 3 * 24 * HOUR
        output = tmp_path / "o.csv"
        result = await export(
            sandbox, output, start, end, retained_only=True, estimate=False
        )

    assert result.complete
    assert result.expired >= 2 * 24 - 1
    assert result.windows < 2 * 24
    warned = [r for r in caplog.records if "--retained-only" in r.getMessage()]
    assert len(warned) == 1  # once, for the windows left out


async def test_the_last_30_days_are_not_refused_for_the_moments_spent_starting(
    tmp_path: Path,
) -> None:
    start = dt.datetime.now(dt.UTC) - 30 * 24 * HOUR  # as --start -30d reads it
    await anyio.sleep(0.05)
    async with SandboxServer(SandboxSettings(rows_per_hour=10)) as sandbox:
        result = await export(
            sandbox, tmp_path / "o.csv", start, start + HOUR, estimate=False
        )

    assert result.complete


async def test_a_history_lag_beyond_retention_is_not_believed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    absurd = SandboxSettings(rows_per_hour=10, history_lag_seconds=10**20)
    async with SandboxServer(absurd) as sandbox:
        start = hour_now() - 5 * HOUR
        result = await export(
            sandbox, tmp_path / "o.csv", start, start + HOUR, estimate=False
        )

    assert result.complete
    assert "freshness answer not understood; assuming 7200 s" in caplog.text


async def test_retained_only_refuses_a_range_wholly_past_retention(
    tmp_path: Path,
) -> None:
    async with SandboxServer(SandboxSettings(rows_per_hour=10)) as sandbox:
        end = hour_now() - 31 * 24 * HOUR
        with pytest.raises(UsageError, match="nothing is left to export"):
            await export(
                sandbox, tmp_path / "o.csv", end - 24 * HOUR, end, retained_only=True
            )
        assert sum(sandbox.stats.downloads.values()) == 0

    assert not (tmp_path / "o.csv").exists()


def cut_inside_a_row(
    history: History, *, in_last_field: bool = False
) -> tuple[dt.datetime, int]:
    """An hour, and a server cap that cuts its body a few bytes into a row (the
    row then lacks fields), or a few bytes before a row's end (inside its last
    field), while both halves of the hour fit under that cap."""
    columns = ExportRequest().columns

    def body(start: dt.datetime, end: dt.datetime) -> bytes:
        return history.window(to_millis(start), to_millis(end), columns, "csv").body

    for back in range(3, 24 * 20):
        start = hour_now() - back * HOUR
        whole = body(start, start + HOUR)
        halves = body(start, start + HOUR / 2), body(start + HOUR / 2, start + HOUR)
        row = whole.find(b"\n", max(map(len, halves))) + 1  # the next row starts
        row_end = whole.find(b"\n", row)
        if 0 < row < len(whole) - 10 and row_end > 0:
            return start, row_end - 3 if in_last_field else row + 5

    raise AssertionError("no hour whose body can be cut so")


async def test_a_body_cut_below_our_cap_is_caught_by_its_unfinished_last_row(
    tmp_path: Path,
) -> None:
    start, cap = cut_inside_a_row(History(7, 200))
    settings = SandboxSettings(rows_per_hour=200, cap_bytes=cap, cap_behaviour="cut")
    async with SandboxServer(settings) as sandbox:
        output = tmp_path / "o.csv"
        result = await export(
            sandbox, output, start, start + HOUR, estimate=False, compression="none"
        )
        downloads = sum(sandbox.stats.downloads.values())

    manifest = Manifest.load(ExportPaths(output).manifest)
    assert result.complete
    assert downloads == 3  # cut once, then each half whole
    assert len(manifest.windows) == 2  # split, as for a cut at our own cap
    assert output.read_bytes() == expected_output(sandbox.history, start, start + HOUR)


async def test_a_body_cut_inside_its_last_field_is_kept_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Documented: a cap at or below the server's own is what prevents this loss.
    start, cap = cut_inside_a_row(History(7, 200), in_last_field=True)
    settings = SandboxSettings(rows_per_hour=200, cap_bytes=cap, cap_behaviour="cut")
    async with SandboxServer(settings) as sandbox:
        result = await export(
            sandbox, tmp_path / "o.csv", start, start + HOUR, compression="none"
        )

    assert result.complete
    assert result.unended == 1
    assert "1 without a final newline" in summary_line(result)
    window = f"{iso(start)}/{iso(start + HOUR)}"
    assert f"window {window}: the body does not end with a newline" in caplog.text


async def test_a_request_too_large_for_the_server_fails_without_splitting(
    tmp_path: Path,
) -> None:
    keys = tuple(f"contact-{number:014d}@example.com" for number in range(40_000))
    async with SandboxServer(SandboxSettings(rows_per_hour=30)) as sandbox:
        start = busy_start(sandbox, hours=2)
        result = await export(
            sandbox,
            tmp_path / "o.csv",
            start,
            start + 2 * HOUR,
            request=ExportRequest(contact_keys=keys),  # over 1 MB in every body
            estimate=False,
        )

    assert result.windows == 2  # not split down to --min-window
    assert len(result.failed) == 2
    assert all("split the contact keys file" in e for e in result.failed.values())
    assert exit_code_of(result) == ExitCode.USAGE  # rerunning as is cannot help
    assert "2 refused" in summary_line(result)
    assert "rerunning as is fails the same way" in summary_line(result)


# The same command: with a fixed --end, or with --end left at now (the rerun's end
# is then a minute later, but it refreshes the recorded export all the same).
@pytest.mark.parametrize(
    ("as_given", "moved"), [(None, dt.timedelta(0)), (("-2h", "now"), MINUTE)]
)
async def test_recent_windows_are_provisional_and_requested_again(
    tmp_path: Path, as_given: tuple[str, str] | None, moved: dt.timedelta
) -> None:
    async with SandboxServer(SandboxSettings(rows_per_hour=30)) as sandbox:
        end = dt.datetime.now(dt.UTC).replace(microsecond=0)
        start = hour_now() - 2 * HOUR
        output = tmp_path / "o.csv"
        settings = run_settings(output, start, end, range_as_given=as_given)
        first = await run_export(settings, credentials_for(sandbox))
        downloads = sum(sandbox.stats.downloads.values())

        rerun = run_settings(output, start, end + moved, range_as_given=as_given)
        later = Hooks(now=lambda: dt.datetime.now(dt.UTC) + 2 * HOUR)
        second = await run_export(rerun, credentials_for(sandbox), hooks=later)
        again = sum(sandbox.stats.downloads.values()) - downloads

    assert first.complete and first.provisional >= 1
    assert again == first.provisional
    assert second.complete and second.provisional == 0
    assert output.read_bytes() == expected_output(sandbox.history, start, end)


@pytest.mark.parametrize(
    ("changes", "compression"),
    [
        ({}, "gzip"),
        ({}, "deflate"),
        ({"deflate_raw": True}, "deflate"),
        ({"honour_accept_encoding": False}, "gzip"),
        ({}, "none"),
        ({"transfer": "length"}, "gzip"),
    ],
)
async def test_every_encoding_is_decoded(
    tmp_path: Path, changes: dict[str, Any], compression: str
) -> None:
    async with SandboxServer(SandboxSettings(rows_per_hour=60, **changes)) as sandbox:
        start = find_range_with_empty_hour(sandbox.history)
        output = tmp_path / "o.csv"
        result = await export(
            sandbox, output, start, start + 3 * HOUR, compression=compression
        )

    assert result.complete
    assert output.read_bytes() == expected_output(
        sandbox.history, start, start + 3 * HOUR
    )


async def test_a_body_claiming_gzip_it_is_not_fails_clearly(tmp_path: Path) -> None:
    async with SandboxServer(
        SandboxSettings(rows_per_hour=60, false_encoding=True)
    ) as sandbox:
        start = busy_start(sandbox, hours=2)
        output = tmp_path / "o.csv"
        result = await export(sandbox, output, start, start + 2 * HOUR)

    assert not result.complete
    assert not output.exists()
    for error in result.failed.values():
        assert "claims gzip encoding but is not gzip data" in error


async def test_tsv_values_with_quotes_round_trip(tmp_path: Path) -> None:
    request = ExportRequest(
        format="tsv", columns=("TransactionTime", "ContactKey", "Message")
    )
    async with SandboxServer(SandboxSettings(rows_per_hour=80)) as sandbox:
        start = busy_start(sandbox, hours=2)
        output = tmp_path / "o.tsv"
        await export(sandbox, output, start, start + 2 * HOUR, request=request)

    expected = expected_output(
        sandbox.history,
        start,
        start + 2 * HOUR,
        columns=request.columns,
        fmt="tsv",
    )
    assert output.read_bytes() == expected
    assert b'""' in expected


async def export_failing_one_hour(
    sandbox: SandboxServer, output: Path, start: dt.datetime, failing: int
) -> None:
    """Export six hours from ``start`` with hour ``failing`` answering 500."""
    moment = iso(start + failing * HOUR)
    sandbox.update(faults=parse_faults(f"error500@*@{moment}"))
    await run_export(
        run_settings(output, start, start + 6 * HOUR, retry=FAST_RETRY),
        credentials_for(sandbox),
        hooks=Hooks(sleep=no_wait),
    )
    sandbox.update(faults=parse_faults(""))


async def failed_hour_now_past_retention(
    sandbox: SandboxServer, output: Path
) -> tuple[dt.datetime, Hooks]:
    """Export six busy hours whose fourth fails; return their start, and a clock
    moved on until the failed hour has left retention (the hours after it have
    not)."""
    start = busy_start(sandbox, hours=6)
    await export_failing_one_hour(sandbox, output, start, failing=3)
    later = start + 30 * 24 * HOUR + 4 * HOUR + 30 * MINUTE
    return start, Hooks(sleep=no_wait, now=lambda: later)


async def test_retained_only_leaves_out_a_failed_window_inside_an_export(
    tmp_path: Path,
) -> None:
    output = tmp_path / "o.csv"
    async with SandboxServer(SandboxSettings(rows_per_hour=60)) as sandbox:
        start, hooks = await failed_hour_now_past_retention(sandbox, output)
        states = [r.state for r in Manifest.load(ExportPaths(output).manifest).windows]
        assert states[3] == "failed"

        settings = run_settings(output, start, start + 6 * HOUR, retained_only=True)
        done = await run_export(settings, credentials_for(sandbox), hooks=hooks)
        published = output.read_bytes()
        again = await run_export(settings, credentials_for(sandbox), hooks=hooks)

    assert done.complete and done.expired == 1
    assert again.complete and output.read_bytes() == published
    before = expected_output(sandbox.history, start, start + 3 * HOUR)
    after = expected_output(sandbox.history, start + 4 * HOUR, start + 6 * HOUR)
    assert published == before + after.split(b"\n", 1)[1]  # one header


async def test_a_redo_past_retention_is_refused_before_the_output_is_cut(
    tmp_path: Path,
) -> None:
    output = tmp_path / "o.csv"
    async with SandboxServer(SandboxSettings(rows_per_hour=60)) as sandbox:
        start = busy_start(sandbox, hours=6)
        end = start + 6 * HOUR
        assert (await export(sandbox, output, start, end)).complete
        published = output.read_bytes()

        later = start + 30 * 24 * HOUR + 3 * HOUR
        hooks = Hooks(sleep=no_wait, now=lambda: later)
        redo = (f"{iso(start + HOUR)}/{iso(start + 2 * HOUR)}",)
        with pytest.raises(UsageError, match=r"--redo names .* past SFMC's 30-day"):
            await run_export(
                run_settings(output, start, end, redo=redo),
                credentials_for(sandbox),
                hooks=hooks,
            )
        again = await run_export(
            run_settings(output, start, end), credentials_for(sandbox), hooks=hooks
        )

    assert Manifest.load(ExportPaths(output).manifest).complete
    assert again.complete and output.read_bytes() == published


async def test_redo_failed_leaves_a_failed_window_past_retention_to_the_usual_check(
    tmp_path: Path,
) -> None:
    output = tmp_path / "o.csv"
    async with SandboxServer(SandboxSettings(rows_per_hour=60)) as sandbox:
        start, hooks = await failed_hour_now_past_retention(sandbox, output)
        end = start + 6 * HOUR
        with pytest.raises(UsageError, match="--retained-only"):
            await run_export(
                run_settings(output, start, end, redo=("failed",)),
                credentials_for(sandbox),
                hooks=hooks,
            )
        done = await run_export(
            run_settings(output, start, end, redo=("failed",), retained_only=True),
            credentials_for(sandbox),
            hooks=hooks,
        )

    assert done.complete and done.expired == 1


async def export_busy_hours(
    sandbox: SandboxServer,
    output: Path,
    *,
    hours: int,
    retained_only: bool,
    after: dt.timedelta,
) -> tuple[RunSettings, ExportResult]:
    """Export ``hours`` busy hours with the tool's clock ``after`` past their end."""
    start = busy_start(sandbox, hours=hours)
    end = start + hours * HOUR
    settings = run_settings(output, start, end, retained_only=retained_only)
    hooks = Hooks(sleep=no_wait, now=lambda: end + after)
    return settings, await run_export(settings, credentials_for(sandbox), hooks=hooks)


async def refused_for_the_rows_it_holds(
    sandbox: SandboxServer, settings: RunSettings
) -> None:
    """Rerun once the windows put back have left retention: refused."""
    later = Hooks(sleep=no_wait, now=lambda: settings.end + 30 * 24 * HOUR + HOUR)
    with pytest.raises(UsageError, match="still holds their rows"):
        await run_export(settings, credentials_for(sandbox), hooks=later)


@pytest.mark.parametrize("retained_only", [False, True])
async def test_provisional_windows_past_retention_keep_their_rows(
    tmp_path: Path, retained_only: bool
) -> None:
    output = tmp_path / "o.csv"
    async with SandboxServer(SandboxSettings(rows_per_hour=60)) as sandbox:
        settings, first = await export_busy_hours(
            sandbox, output, hours=6, retained_only=retained_only, after=5 * MINUTE
        )
        start, end = settings.start, settings.end
        assert first.complete and first.provisional >= 1
        published = output.read_bytes()

        # The provisional windows have left retention since: nothing to refresh.
        later = Hooks(sleep=no_wait, now=lambda: end + 30 * 24 * HOUR + 10 * MINUTE)
        again = await run_export(settings, credentials_for(sandbox), hooks=later)
        assert again.complete and not again.provisional

        # The same command with relative times now names another range: refused.
        moved = run_settings(output, start + 24 * HOUR, end + 24 * HOUR)
        refused = r"already holds a complete export.*keep that file"
        with pytest.raises(ManifestError, match=refused):
            await run_export(moved, credentials_for(sandbox), hooks=later)

    assert output.read_bytes() == published
    assert Manifest.load(ExportPaths(output).manifest).complete


class Killed(BaseException):
    """The process dying at that very step."""


@pytest.mark.parametrize("retained_only", [False, True])
async def test_rows_held_by_the_output_survive_a_refresh_stopped_until_too_late(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, retained_only: bool
) -> None:
    output = tmp_path / "o.csv"
    async with SandboxServer(SandboxSettings(rows_per_hour=60)) as sandbox:
        settings, first = await export_busy_hours(
            sandbox, output, hours=6, retained_only=retained_only, after=5 * MINUTE
        )
        assert first
        published = output.read_bytes()

        async def stop(*args: Any) -> None:
            raise Killed

        # The refresh of the provisional windows stops before it gets them...
        an_hour_on = Hooks(sleep=no_wait, now=lambda: settings.end + HOUR)
        with monkeypatch.context() as patched:
            patched.setattr(ExportJob, "_fetch", stop)
            with pytest.raises((Killed, BaseExceptionGroup)):  # from a worker
                await run_export(settings, credentials_for(sandbox), hooks=an_hour_on)

        # ...and the next run comes once they have left retention.
        await refused_for_the_rows_it_holds(sandbox, settings)

    assert output.read_bytes() == published


async def test_a_start_minutes_before_the_30_day_line_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with SandboxServer(SandboxSettings(rows_per_hour=10)) as sandbox:
        now = dt.datetime.now(dt.UTC)
        start = now - 30 * 24 * HOUR - 3 * MINUTE
        await run_export(
            run_settings(tmp_path / "o.csv", start, start + HOUR, estimate=False),
            credentials_for(sandbox),
            hooks=Hooks(now=lambda: now),
        )

    assert "just before SFMC's 30-day line" in caplog.text


@pytest.mark.parametrize("retained_only", [False, True])
async def test_rows_held_by_the_output_survive_a_redo_split_then_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, retained_only: bool
) -> None:
    output = tmp_path / "o.csv"
    async with SandboxServer(SandboxSettings(rows_per_hour=200)) as sandbox:
        settings, first = await export_busy_hours(
            sandbox, output, hours=3, retained_only=retained_only, after=5 * HOUR
        )
        assert first
        start, end = settings.start, settings.end
        final = Hooks(sleep=no_wait, now=lambda: end + 5 * HOUR)
        published = output.read_bytes()
        fetch = ExportJob._fetch
        fetched: list[WindowRecord] = []

        async def once(job: ExportJob, record: WindowRecord) -> Any:
            fetched.append(record)
            if len(fetched) > 1:
                raise Killed

            return await fetch(job, record)  # over the cap: split, and saved

        # A --redo with a smaller cap splits its window, then stops.
        redo = (f"{iso(start)}/{iso(start + HOUR)}",)
        smaller = dataclasses.replace(settings, redo=redo, cap_bytes=4_000)
        with monkeypatch.context() as patched:
            patched.setattr(ExportJob, "_fetch", once)
            with pytest.raises((Killed, BaseExceptionGroup)):  # from a worker
                await run_export(smaller, credentials_for(sandbox), hooks=final)

        await refused_for_the_rows_it_holds(sandbox, settings)

    assert output.read_bytes() == published
