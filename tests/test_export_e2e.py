"""End-to-end exports over real HTTP on 127.0.0.1 against the sandbox."""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import itertools
import os
import stat
from pathlib import Path
from typing import Literal

import pytest

from orchestrator import merger, parts, sfmc
from orchestrator.config import ExportRequest
from orchestrator.errors import CredentialsError, LockHeldError, ManifestError
from orchestrator.export import run_export
from orchestrator.lock import OutputLock
from orchestrator.manifest import ExportPaths, Manifest
from orchestrator.sandbox import SandboxServer, SandboxSettings
from orchestrator.timeparse import to_millis
from tests.conftest import (
    HOUR,
    credentials_for,
    expected_output,
    expected_row_count,
    find_range_with_empty_hour,
    run_settings,
)

SWITCHES = list(
    itertools.product(
        [False, True],  # end_inclusive
        ["header", "empty", "204"],  # empty_window
        ["lf", "crlf"],  # newline
        [False, True],  # bom
    )
)


@pytest.mark.parametrize(("end_inclusive", "empty_window", "newline", "bom"), SWITCHES)
async def test_output_equals_ground_truth_for_every_server_behaviour(
    tmp_path: Path,
    end_inclusive: bool,
    empty_window: Literal["header", "empty", "204"],
    newline: Literal["lf", "crlf"],
    bom: bool,
) -> None:
    settings = SandboxSettings(
        rows_per_hour=40,
        end_inclusive=end_inclusive,
        empty_window=empty_window,
        newline=newline,
        bom=bom,
    )
    async with SandboxServer(settings) as sandbox:
        start = find_range_with_empty_hour(sandbox.history)
        end = start + 5 * HOUR
        output = tmp_path / "out.csv"

        result = await run_export(
            run_settings(output, start, end), credentials_for(sandbox)
        )

    expected = expected_output(
        sandbox.history, start, end, newline="\r\n" if newline == "crlf" else "\n"
    )
    assert result.complete
    assert output.read_bytes() == expected
    assert result.rows == expected_row_count(sandbox.history, start, end)
    assert not ExportPaths(output).parts.exists()


async def test_boundary_rows_are_kept_once_with_an_inclusive_end(
    tmp_path: Path,
) -> None:
    async with SandboxServer(
        SandboxSettings(rows_per_hour=30, end_inclusive=True)
    ) as sandbox:
        start = find_range_with_empty_hour(sandbox.history)
        end = start + 5 * HOUR
        output = tmp_path / "out.csv"
        await run_export(
            run_settings(output, start, end, window=dt.timedelta(minutes=30)),
            credentials_for(sandbox),
        )

    boundaries = [to_millis(start + i * HOUR) for i in range(1, 5)]
    on_a_boundary = sum(len(sandbox.history.expected(t, t + 1)) for t in boundaries)
    assert on_a_boundary > 0  # the case under test is present
    assert output.read_bytes() == expected_output(
        sandbox.history, start, end, span=dt.timedelta(minutes=30)
    )


async def test_tsv_with_every_column_and_filters(tmp_path: Path) -> None:
    async with SandboxServer(SandboxSettings(rows_per_hour=60)) as sandbox:
        start = find_range_with_empty_hour(sandbox.history)
        end = start + 5 * HOUR
        statuses = ["Complete", "Failed"]
        request = ExportRequest(
            format="tsv",
            columns=sfmc.COLUMNS,
            filters=(("statuses", tuple(statuses)),),
        )
        output = tmp_path / "out.tsv"
        result = await run_export(
            run_settings(output, start, end, request=request), credentials_for(sandbox)
        )

    expected = expected_output(
        sandbox.history,
        start,
        end,
        columns=sfmc.COLUMNS,
        fmt="tsv",
        filters={"statuses": statuses},
    )
    assert result.complete
    assert output.read_bytes() == expected
    assert b'"' in expected


async def test_output_and_manifest_are_private(tmp_path: Path) -> None:
    async with SandboxServer(SandboxSettings(rows_per_hour=10)) as sandbox:
        start = find_range_with_empty_hour(sandbox.history)
        output = tmp_path / "new" / "folders" / "out.csv"
        await run_export(
            run_settings(output, start, start + 2 * HOUR), credentials_for(sandbox)
        )

    for path in (output, ExportPaths(output).manifest):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

    for folder in (output.parent, output.parent.parent):  # each one it created
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700


async def test_rerun_of_a_complete_export_requests_nothing(tmp_path: Path) -> None:
    async with SandboxServer(SandboxSettings(rows_per_hour=10)) as sandbox:
        start = find_range_with_empty_hour(sandbox.history)
        output = tmp_path / "out.csv"
        settings = run_settings(output, start, start + 3 * HOUR)
        await run_export(settings, credentials_for(sandbox))
        first = output.read_bytes()
        downloads = sum(sandbox.stats.downloads.values())

        again = await run_export(settings, credentials_for(sandbox))

        assert sum(sandbox.stats.downloads.values()) == downloads
    assert again.complete
    assert output.read_bytes() == first


async def test_a_different_request_on_the_same_output_is_refused(
    tmp_path: Path,
) -> None:
    async with SandboxServer(SandboxSettings(rows_per_hour=10)) as sandbox:
        start = find_range_with_empty_hour(sandbox.history)
        output = tmp_path / "out.csv"
        await run_export(
            run_settings(output, start, start + 2 * HOUR), credentials_for(sandbox)
        )
        other = run_settings(
            output, start, start + 2 * HOUR, request=ExportRequest(format="tsv")
        )

        with pytest.raises(ManifestError, match=r"already holds a complete export"):
            await run_export(other, credentials_for(sandbox))

        restarted = await run_export(
            run_settings(
                output,
                start,
                start + 2 * HOUR,
                request=ExportRequest(format="tsv"),
                restart=True,
            ),
            credentials_for(sandbox),
        )
    assert restarted.complete
    assert output.read_bytes().startswith(b"TransactionTime\tContactKey")


async def test_existing_file_without_a_manifest_is_not_overwritten(
    tmp_path: Path,
) -> None:
    output = tmp_path / "out.csv"
    output.write_bytes(b"precious\n")
    async with SandboxServer(SandboxSettings(rows_per_hour=10)) as sandbox:
        start = find_range_with_empty_hour(sandbox.history)
        with pytest.raises(ManifestError, match="exists"):
            await run_export(
                run_settings(output, start, start + HOUR), credentials_for(sandbox)
            )
    assert output.read_bytes() == b"precious\n"
    assert os.listdir(tmp_path) == ["out.csv"]  # no lock file left behind


def test_a_lock_file_removed_by_its_last_holder_is_not_shared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "out.csv.lock"
    first = OutputLock(path, state=tmp_path / "out.csv.manifest.json").__enter__()
    take = fcntl.flock
    calls: list[int] = []

    def released_meanwhile(descriptor: int, operation: int) -> None:
        # The first run lets go (removing its file) between the second's open
        # and its flock: the second then holds a file that is no longer there.
        calls.append(operation)
        if len(calls) == 1:
            first.__exit__(None, None, None)  # its own unlock comes back here
        take(descriptor, operation)

    monkeypatch.setattr(fcntl, "flock", released_meanwhile)
    second = OutputLock(path).__enter__()
    monkeypatch.setattr(fcntl, "flock", take)

    with pytest.raises(LockHeldError, match="another run"):
        OutputLock(path).__enter__()
    second.__exit__(None, None, None)
    assert path.exists()  # no state file given: the lock file stays


async def test_a_held_lock_stops_a_second_run(tmp_path: Path) -> None:
    output = tmp_path / "out.csv"
    async with SandboxServer(SandboxSettings(rows_per_hour=10)) as sandbox:
        start = find_range_with_empty_hour(sandbox.history)
        with (
            OutputLock(ExportPaths(output).lock),
            pytest.raises(LockHeldError, match="another run"),
        ):
            await run_export(
                run_settings(output, start, start + HOUR), credentials_for(sandbox)
            )


async def test_rejected_credentials_end_the_run(tmp_path: Path) -> None:
    async with SandboxServer(SandboxSettings(rows_per_hour=10)) as sandbox:
        start = find_range_with_empty_hour(sandbox.history)
        credentials = credentials_for(sandbox)
        wrong = type(credentials)(
            client_id=credentials.client_id,
            client_secret="not-the-secret",
            auth_url=credentials.auth_url,
        )
        with pytest.raises(CredentialsError, match="credentials rejected"):
            await run_export(
                run_settings(tmp_path / "o.csv", start, start + 3 * HOUR), wrong
            )
        assert sum(sandbox.stats.downloads.values()) == 0

    assert os.listdir(tmp_path) == []  # a relative range is read anew


async def test_manifest_records_every_window(tmp_path: Path) -> None:
    async with SandboxServer(SandboxSettings(rows_per_hour=20)) as sandbox:
        start = find_range_with_empty_hour(sandbox.history)
        output = tmp_path / "out.csv"
        await run_export(
            run_settings(output, start, start + 4 * HOUR, keep_parts=True),
            credentials_for(sandbox),
        )

    manifest = Manifest.load(ExportPaths(output).manifest)
    assert manifest.complete
    assert [r.state for r in manifest.windows] == ["merged"] * 4
    assert sum(r.rows for r in manifest.windows) == expected_row_count(
        sandbox.history, start, start + 4 * HOUR
    )
    assert all(r.attempts == 1 and r.sha256 for r in manifest.windows)
    assert ExportPaths(output).parts.exists()


async def test_the_seconds_of_a_window_leave_out_its_wait_for_a_worker(
    tmp_path: Path,
) -> None:
    # One worker: the windows are downloaded one after another, so their own
    # durations cannot add up to more than the run took.
    settings = SandboxSettings(rows_per_hour=30, first_byte_seconds=0.05)
    async with SandboxServer(settings) as sandbox:
        start = find_range_with_empty_hour(sandbox.history)
        output = tmp_path / "out.csv"
        result = await run_export(
            run_settings(output, start, start + 5 * HOUR, concurrency=1),
            credentials_for(sandbox),
        )

    seconds = [r.seconds for r in Manifest.load(ExportPaths(output).manifest).windows]
    assert len(seconds) == 5
    assert min(seconds) >= 0.05
    assert sum(seconds) <= result.seconds


class Killed(BaseException):
    """The process dying at that very step (kill -9, power loss)."""


async def test_a_stop_right_after_the_output_is_named_needs_no_download_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "o.csv"
    paths = ExportPaths(output)
    real_fsync_directory = parts.fsync_directory

    def die_once_named(folder: Path) -> None:
        if output.exists() and not paths.partial.exists():
            raise Killed
        real_fsync_directory(folder)

    async with SandboxServer(SandboxSettings(rows_per_hour=60)) as sandbox:
        start = find_range_with_empty_hour(sandbox.history)
        settings = run_settings(output, start, start + 4 * HOUR)
        with monkeypatch.context() as patched:
            patched.setattr(merger, "fsync_directory", die_once_named)
            with pytest.raises(Killed):
                await run_export(settings, credentials_for(sandbox))

        assert not Manifest.load(paths.manifest).complete
        os.utime(output)  # its times may change since (a backup tool, say)
        downloads = sum(sandbox.stats.downloads.values())
        again = await run_export(settings, credentials_for(sandbox))
        assert sum(sandbox.stats.downloads.values()) == downloads

    assert again.complete
    assert Manifest.load(paths.manifest).complete
    assert output.read_bytes() == expected_output(
        sandbox.history, start, start + 4 * HOUR
    )
    assert not paths.parts.exists()


async def test_a_parts_folder_left_by_a_stop_after_the_end_goes_on_the_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "o.csv"
    async with SandboxServer(SandboxSettings(rows_per_hour=10)) as sandbox:
        start = find_range_with_empty_hour(sandbox.history)
        settings = run_settings(output, start, start + 2 * HOUR)

        def stop(paths: ExportPaths) -> None:
            raise Killed

        with monkeypatch.context() as patched:
            patched.setattr(merger, "remove_parts_folder", stop)
            with pytest.raises(Killed):
                await run_export(settings, credentials_for(sandbox))

        assert ExportPaths(output).parts.is_dir()
        again = await run_export(settings, credentials_for(sandbox))

    assert again.complete
    assert not ExportPaths(output).parts.exists()


async def test_a_lost_partial_is_never_taken_for_the_output_it_was_to_replace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A --redo assembled into the partial and stopped before the rename; the partial
    # is then lost. The old output at the path, as long, is not the redo's result.
    output = tmp_path / "o.csv"
    paths = ExportPaths(output)
    async with SandboxServer(SandboxSettings(rows_per_hour=60)) as sandbox:
        start = find_range_with_empty_hour(sandbox.history)
        settings = run_settings(output, start, start + 3 * HOUR)
        await run_export(settings, credentials_for(sandbox))
        redo = (f"{start.isoformat()}/{(start + HOUR).isoformat()}",)

        def stop(assembler: merger.Assembler) -> None:
            raise Killed

        with monkeypatch.context() as patched:
            patched.setattr(merger.Assembler, "publish", stop)
            with pytest.raises(Killed):
                await run_export(
                    dataclasses.replace(settings, redo=redo), credentials_for(sandbox)
                )

        paths.partial.unlink()
        downloads = sum(sandbox.stats.downloads.values())
        again = await run_export(settings, credentials_for(sandbox))
        assert sum(sandbox.stats.downloads.values()) > downloads

    assert again.complete
    assert output.read_bytes() == expected_output(
        sandbox.history, start, start + 3 * HOUR
    )


async def test_a_restart_refused_for_its_credentials_can_be_rerun(
    tmp_path: Path,
) -> None:
    output = tmp_path / "o.csv"
    async with SandboxServer(SandboxSettings(rows_per_hour=10)) as sandbox:
        start = find_range_with_empty_hour(sandbox.history)
        settings = run_settings(output, start, start + 2 * HOUR)
        good = credentials_for(sandbox)
        await run_export(settings, good)
        wrong = dataclasses.replace(good, client_secret="not-the-secret")
        with pytest.raises(CredentialsError):
            await run_export(dataclasses.replace(settings, restart=True), wrong)

        again = await run_export(settings, good)

    assert again.complete
    assert output.read_bytes() == expected_output(
        sandbox.history, start, start + 2 * HOUR
    )
