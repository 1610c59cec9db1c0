"""Faults the sandbox injects end in a correct file or a clean, resumable failure."""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from orchestrator.commands import exit_code_of, summary_line
from orchestrator.config import HttpSettings, RetrySettings
from orchestrator.errors import CredentialsError, ExitCode, StateWriteError, UsageError
from orchestrator.export import ExportResult, Hooks, run_export
from orchestrator.manifest import DONE, MERGED, ExportPaths, Manifest, WindowRecord
from orchestrator.merger import Assembler, Batch
from orchestrator.parts import PartWriter
from orchestrator.reporting import Progress, progress_line
from orchestrator.sandbox import History, SandboxServer, SandboxSettings, parse_faults
from orchestrator.sandbox.faults import DOWNLOAD_KINDS
from tests.conftest import (
    HOUR,
    credentials_for,
    expected_output,
    find_range_with_empty_hour,
    hour_now,
    run_settings,
)

FAST_RETRY = RetrySettings(
    max_attempts=4, backoff_initial_seconds=0.01, backoff_max_seconds=0.05
)


async def no_wait(seconds: float) -> None:
    await anyio.lowlevel.checkpoint()


async def export_with(
    sandbox: SandboxServer,
    output: Path,
    hours: int = 4,
    progress: Progress | None = None,
    **options: Any,
) -> tuple[ExportResult, dt.datetime]:
    start = find_range_with_empty_hour(sandbox.history, hours=max(hours, 3))
    options.setdefault("retry", FAST_RETRY)
    result = await run_export(
        run_settings(output, start, start + hours * HOUR, **options),
        credentials_for(sandbox),
        hooks=Hooks(sleep=no_wait, progress=progress),
    )
    return result, start


def assert_exported_exactly(
    output: Path, sandbox: SandboxServer, start: dt.datetime, span: dt.timedelta
) -> None:
    """The output holds the sandbox's rows from ``start`` for ``span``, exactly."""
    assert output.read_bytes() == expected_output(sandbox.history, start, start + span)


def before_each_append(
    patched: pytest.MonkeyPatch, act: Callable[[Assembler, WindowRecord], None]
) -> None:
    """Run ``act`` just before the Assembler appends each window's part."""
    append = Assembler.append

    def acting(assembler: Assembler, record: WindowRecord) -> int:
        act(assembler, record)
        return append(assembler, record)

    patched.setattr(Assembler, "append", acting)


def done_behind_the_first(manifest: Manifest) -> int:
    """How many windows are done or merged while the first is not; -1 once it is."""
    finished = [record.state in (DONE, MERGED) for record in manifest.windows]
    return -1 if finished[0] else sum(finished)


def before_the_second_windows_append(
    patched: pytest.MonkeyPatch, act: Callable[[Path], None]
) -> list[WindowRecord]:
    """Run ``act`` on the second window's part once, just before it is appended;
    the list returned gets that window's record."""
    acted: list[WindowRecord] = []

    def once(assembler: Assembler, record: WindowRecord) -> None:
        if not acted and record is assembler.manifest.windows[1]:
            act(assembler.paths.part(record.window))
            acted.append(record)

    before_each_append(patched, once)
    return acted


def sandbox_with(faults: str, **changes: Any) -> SandboxServer:
    settings = SandboxSettings(rows_per_hour=60, faults=parse_faults(faults), **changes)
    return SandboxServer(settings)


# Every download fault but the slow ones (stall and slow_first_byte have their tests).
QUICK_KINDS = [
    kind for kind in DOWNLOAD_KINDS if kind not in ("stall", "slow_first_byte")
]


@pytest.mark.parametrize("kind", QUICK_KINDS)
async def test_a_fault_on_every_first_attempt_is_retried(
    tmp_path: Path, kind: str
) -> None:
    output = tmp_path / "o.csv"
    async with sandbox_with(f"{kind}@1, retry_after=0") as sandbox:
        result, start = await export_with(sandbox, output, keep_parts=True)

    manifest = Manifest.load(ExportPaths(output).manifest)
    assert result.complete
    assert_exported_exactly(output, sandbox, start, 4 * HOUR)
    if kind != "token_revoked":  # a revoked token is renewed within the attempt
        assert [r.attempts for r in manifest.windows] == [2] * 4
        assert result.retries == 4


async def test_a_revoked_token_is_renewed_once(tmp_path: Path) -> None:
    async with sandbox_with("token_revoked@1") as sandbox:
        await export_with(sandbox, tmp_path / "o.csv", concurrency=1)
        tokens = sandbox.stats.token_requests

    assert tokens == 5


async def test_a_stall_is_cut_by_the_read_timeout_and_retried(tmp_path: Path) -> None:
    http = HttpSettings(read_timeout_seconds=0.5)
    output = tmp_path / "o.csv"
    async with sandbox_with("stall@1, stall_seconds=30") as sandbox:
        with anyio.fail_after(20):
            result, start = await export_with(sandbox, output, hours=3, http=http)

    assert result.complete
    assert_exported_exactly(output, sandbox, start, 3 * HOUR)


async def test_a_slow_healthy_download_is_not_cut(tmp_path: Path) -> None:
    http = HttpSettings(read_timeout_seconds=0.5)
    output = tmp_path / "o.csv"
    sandbox = SandboxServer(
        SandboxSettings(rows_per_hour=200, bandwidth_bytes_per_second=20_000)
    )
    async with sandbox:
        # One window of at least 40,000 bytes: 2 s at 20,000 bytes per second.
        start = hour_with_bytes(sandbox.history, at_least=40_000)
        settings = run_settings(
            output, start, start + HOUR, http=http, compression="none"
        )
        started = anyio.current_time()
        result = await run_export(
            settings, credentials_for(sandbox), hooks=Hooks(sleep=no_wait)
        )
        elapsed = anyio.current_time() - started

    assert result.complete and result.retries == 0
    assert elapsed > 1.5  # three times the read timeout, yet never cut
    assert_exported_exactly(output, sandbox, start, HOUR)


def hour_with_bytes(history: History, *, at_least: int) -> dt.datetime:
    """The latest whole hour of the history whose body is at least that long."""
    now = hour_now()
    for back in range(2, 24 * 20):
        start = now - back * HOUR
        if len(expected_output(history, start, start + HOUR)) >= at_least:
            return start

    raise AssertionError(f"no hour of the history holds {at_least:,} bytes")


async def test_short_token_lifetime_is_renewed_before_expiry(tmp_path: Path) -> None:
    output = tmp_path / "o.csv"
    sandbox = SandboxServer(
        SandboxSettings(
            rows_per_hour=60, token_lifetime_seconds=2, first_byte_seconds=0.4
        )
    )
    async with sandbox:
        result, _ = await export_with(sandbox, output, hours=6, concurrency=1)
        answers = dict(sandbox.stats.answers)

    assert result.complete
    assert sandbox.stats.token_requests >= 2
    assert answers.get(401, 0) == 0


async def test_token_endpoint_errors_are_retried(tmp_path: Path) -> None:
    async with sandbox_with("token_error@1") as sandbox:
        result, _ = await export_with(sandbox, tmp_path / "o.csv")

    assert result.complete
    assert sandbox.stats.token_requests == 2


@pytest.mark.parametrize("estimate", [True, False])
async def test_the_time_budget_bounds_every_wait(
    tmp_path: Path, estimate: bool
) -> None:
    # Every call is throttled for 30 s: only the budget can end the waits (for the
    # estimates; or for the shared pause and the retry of the first download).
    async with sandbox_with("throttle=1.0,retry_after=30") as sandbox:
        start = find_range_with_empty_hour(sandbox.history, hours=3)
        settings = run_settings(
            tmp_path / "o.csv",
            start,
            start + 3 * HOUR,
            concurrency=1,
            estimate=estimate,
            max_duration=dt.timedelta(seconds=1),
        )
        with anyio.fail_after(20):
            result = await run_export(settings, credentials_for(sandbox))

    assert result.out_of_time
    assert not result.failed
    downloads = sum(sandbox.stats.downloads.values())
    assert downloads == (0 if estimate else 1)
    assert result.throttled >= 1  # the estimates' throttling counts too


async def test_every_retry_counted_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with sandbox_with("error500=1") as sandbox:  # estimates fail too
        result, _ = await export_with(sandbox, tmp_path / "o.csv", hours=3)

    logged = [r for r in caplog.records if getattr(r, "event", None) == "retry"]
    calls = {getattr(r, "call", "download") for r in logged}
    assert result.failed and calls == {"estimate", "download"}
    assert result.retries == len(logged)


async def test_a_concurrency_cap_halves_our_concurrency(tmp_path: Path) -> None:
    sandbox = SandboxServer(
        SandboxSettings(
            rows_per_hour=60, max_concurrent_downloads=2, first_byte_seconds=0.2
        )
    )
    output = tmp_path / "o.csv"
    progress = Progress()
    async with sandbox:
        result, start = await export_with(
            sandbox, output, hours=12, progress=progress, concurrency=8, estimate=False
        )

    assert result.complete
    assert result.throttled >= 1
    assert 1 <= progress.stats.concurrency < 8  # as the progress line shows it
    assert f"concurrency {progress.stats.concurrency}" in progress_line(
        progress, concurrency=8
    )
    assert_exported_exactly(output, sandbox, start, 12 * HOUR)


async def test_retries_are_capped_and_the_rerun_requests_only_failed_windows(
    tmp_path: Path,
) -> None:
    output = tmp_path / "o.csv"
    async with sandbox_with("error500@*") as sandbox:
        failed, start = await export_with(sandbox, output)
        assert not failed.complete
        assert len(failed.failed) == 4
        assert all("500" in error for error in failed.failed.values())
        assert sum(sandbox.stats.downloads.values()) == 4 * FAST_RETRY.max_attempts
        assert exit_code_of(failed) == ExitCode.WINDOWS_FAILED  # a rerun may do
        assert "rerun the same command" in summary_line(failed)

        sandbox.update(faults=parse_faults(""))
        before = sum(sandbox.stats.downloads.values())
        result, _ = await export_with(sandbox, output)
        assert sum(sandbox.stats.downloads.values()) - before == 4

    assert result.complete
    assert_exported_exactly(output, sandbox, start, 4 * HOUR)


async def test_one_failing_window_does_not_stop_the_others(tmp_path: Path) -> None:
    output = tmp_path / "o.csv"
    async with SandboxServer(SandboxSettings(rows_per_hour=60)) as sandbox:
        start = find_range_with_empty_hour(sandbox.history)
        second = (start + HOUR).strftime("%Y-%m-%dT%H:%M:%SZ")
        sandbox.update(faults=parse_faults(f"error500@*@{second}"))
        result = await run_export(
            run_settings(output, start, start + 4 * HOUR, retry=FAST_RETRY),
            credentials_for(sandbox),
            hooks=Hooks(sleep=no_wait),
        )

    manifest = Manifest.load(ExportPaths(output).manifest)
    assert list(result.failed) == [manifest.windows[1].window.key]
    assert [r.state for r in manifest.windows] == ["merged", "failed", "done", "done"]


async def test_a_damaged_manifest_is_reported_and_restart_recovers(
    tmp_path: Path,
) -> None:
    output = tmp_path / "o.csv"
    async with SandboxServer(SandboxSettings(rows_per_hour=30)) as sandbox:
        _, start = await export_with(sandbox, output)
        manifest = ExportPaths(output).manifest
        manifest.write_bytes(manifest.read_bytes()[:100])
        output.unlink()

        from orchestrator.errors import ManifestError

        with pytest.raises(ManifestError, match="--restart"):
            await export_with(sandbox, output)
        result, _ = await export_with(sandbox, output, restart=True)

    assert result.complete
    assert_exported_exactly(output, sandbox, start, 4 * HOUR)


async def test_restart_with_a_folder_in_place_of_the_manifest_names_it(
    tmp_path: Path,
) -> None:
    output = tmp_path / "o.csv"
    ExportPaths(output).manifest.mkdir()
    async with SandboxServer(SandboxSettings(rows_per_hour=30)) as sandbox:
        with pytest.raises(
            UsageError, match=r"o\.csv\.manifest\.json is not a regular"
        ):
            await export_with(sandbox, output, restart=True)

        ExportPaths(output).manifest.rmdir()
        result, start = await export_with(sandbox, output, restart=True)

    assert result.complete
    assert_exported_exactly(output, sandbox, start, 4 * HOUR)


async def test_a_restart_that_fails_early_keeps_the_published_output(
    tmp_path: Path,
) -> None:
    output = tmp_path / "o.csv"
    async with SandboxServer(SandboxSettings(rows_per_hour=30)) as sandbox:
        _, start = await export_with(sandbox, output)
        published = output.read_bytes()
        wrong = dataclasses.replace(credentials_for(sandbox), client_secret="wrong")
        settings = run_settings(output, start, start + 4 * HOUR, restart=True)

        with pytest.raises(CredentialsError):
            await run_export(settings, wrong, hooks=Hooks(sleep=no_wait))
        assert output.read_bytes() == published

        past = run_settings(output, start - 40 * 24 * HOUR, start, restart=True)
        with pytest.raises(UsageError, match="retention"):
            await run_export(past, credentials_for(sandbox))
        assert output.read_bytes() == published

        result, _ = await export_with(sandbox, output, restart=True)

    assert result.complete
    assert_exported_exactly(output, sandbox, start, 4 * HOUR)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Any:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


async def test_disk_full_stops_cleanly_and_the_rerun_completes(
    tiny_disk: Path,
) -> None:
    output = tiny_disk / "o.csv"
    async with SandboxServer(SandboxSettings(rows_per_hour=300)) as sandbox:
        try:
            result, start = await export_with(
                sandbox, output, hours=6, compression="none"
            )
            assert not result.complete
            assert any("No space left" in e for e in result.failed.values())
        except StateWriteError as error:
            assert "No space left" in str(error)
        manifest = Manifest.load(ExportPaths(output).manifest)  # not damaged
        assert not manifest.complete
        done_before = manifest.counts()["merged"]

        remount = ["mount", "-o", "remount,size=20m", str(tiny_disk)]
        await anyio.to_thread.run_sync(lambda: subprocess.run(remount, check=True))
        result, start = await export_with(sandbox, output, hours=6, compression="none")

    assert result.complete
    assert_exported_exactly(output, sandbox, start, 6 * HOUR)
    assert done_before < 6


async def test_a_failed_redo_leaves_the_published_output_in_place(
    tmp_path: Path,
) -> None:
    output = tmp_path / "o.csv"
    async with SandboxServer(SandboxSettings(rows_per_hour=60)) as sandbox:
        _, start = await export_with(sandbox, output)
        first = output.read_bytes()
        second = (start + HOUR).strftime("%Y-%m-%dT%H:%M:%SZ")
        sandbox.update(faults=parse_faults(f"error500@*@{second}"))
        redo = (
            f"{start + HOUR:%Y-%m-%dT%H:%M:%SZ}/{start + 2 * HOUR:%Y-%m-%dT%H:%M:%SZ}",
        )

        failed, _ = await export_with(sandbox, output, redo=redo)
        assert not failed.complete
        assert output.read_bytes() == first  # still whole while the redo is unfinished

        sandbox.update(faults=parse_faults(""))
        again, _ = await export_with(sandbox, output)

    assert again.complete
    assert output.read_bytes() == first


async def test_a_changed_output_is_not_reported_complete(tmp_path: Path) -> None:
    output = tmp_path / "o.csv"
    async with SandboxServer(SandboxSettings(rows_per_hour=30)) as sandbox:
        await export_with(sandbox, output)
        with output.open("ab") as stream:
            stream.write(b"extra\n")

        from orchestrator.errors import ManifestError

        with pytest.raises(ManifestError, match="changed since it was exported"):
            await export_with(sandbox, output)


async def test_a_token_endpoint_that_keeps_failing_stops_the_run_at_once(
    tmp_path: Path,
) -> None:
    from orchestrator.errors import TokenUnavailableError

    async with sandbox_with("token_error@*") as sandbox:
        started = anyio.current_time()
        with pytest.raises(TokenUnavailableError, match="no token after 5 attempts"):
            await export_with(sandbox, tmp_path / "o.csv", hours=12)
        assert sandbox.stats.token_requests == 5
    assert anyio.current_time() - started < 30


async def test_a_part_replaced_during_the_run_fails_its_window_and_the_rerun_heals_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "o.csv"
    damaged: list[str] = []

    def replace_a_part(assembler: Assembler, record: WindowRecord) -> None:
        part = assembler.paths.part(record.window)
        if not damaged and part.stat().st_size:
            staged = part.with_name("replacement")
            staged.write_bytes(b"\0" * part.stat().st_size)  # same size, new file
            staged.replace(part)
            damaged.append(record.window.key)

    before_each_append(monkeypatch, replace_a_part)
    async with SandboxServer(SandboxSettings(rows_per_hour=60)) as sandbox:
        first, start = await export_with(sandbox, output)
        second, _ = await export_with(sandbox, output)

    assert not first.complete
    assert list(first.failed) == damaged
    assert "changed on disk" in first.failed[damaged[0]]
    assert second.complete
    assert_exported_exactly(output, sandbox, start, 4 * HOUR)


async def test_a_part_the_machine_lost_in_a_crash_is_requested_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "o.csv"

    def disk_full(assembler: Assembler, record: WindowRecord) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    async with SandboxServer(SandboxSettings(rows_per_hour=60)) as sandbox:
        with monkeypatch.context() as patched:
            patched.setattr(Assembler, "append", disk_full)
            first, start = await export_with(sandbox, output)  # parts only

        parts = ExportPaths(output).parts.glob("*.part")
        lost = max(parts, key=lambda part: part.stat().st_size)
        lost.write_bytes(b"\0" * lost.stat().st_size)  # size kept, data never written
        downloads = sum(sandbox.stats.downloads.values())
        second, _ = await export_with(sandbox, output)

    assert not first.complete
    assert "No space left" in (first.error or "")
    assert second.complete
    assert sum(sandbox.stats.downloads.values()) == downloads + 1
    assert_exported_exactly(output, sandbox, start, 4 * HOUR)


async def test_a_background_flush_that_fails_stops_cleanly_and_the_rerun_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "o.csv"
    sync = Assembler.sync
    flushes: list[int] = []

    def failing_second_flush(assembler: Assembler, batch: Batch) -> None:
        flushes.append(batch.end)
        if len(flushes) == 2:
            raise OSError(errno.EIO, "Input/output error")
        sync(assembler, batch)

    async with SandboxServer(SandboxSettings(rows_per_hour=60)) as sandbox:
        with monkeypatch.context() as patched:
            patched.setattr(Assembler, "sync", failing_second_flush)
            first, start = await export_with(sandbox, output, hours=6, flush_bytes=1)

        manifest = Manifest.load(ExportPaths(output).manifest)
        partial_size = ExportPaths(output).partial.stat().st_size
        second, _ = await export_with(sandbox, output, hours=6)

    assert not first.complete
    assert "Input/output error" in (first.error or "")
    assert manifest.merged_bytes == flushes[0]  # only what the first flush covered
    assert partial_size > manifest.merged_bytes  # the rest was appended, unrecorded
    assert second.complete
    assert_exported_exactly(output, sandbox, start, 6 * HOUR)


async def test_windows_are_appended_while_the_last_batch_is_flushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "o.csv"
    take_batch, sync = Assembler.take_batch, Assembler.sync
    flushing, appended_meanwhile = threading.Event(), threading.Event()
    waited: list[bool] = []

    def note_append(assembler: Assembler, record: WindowRecord) -> None:
        if flushing.is_set():
            appended_meanwhile.set()

    def note_first_batch(assembler: Assembler) -> Batch | None:
        batch = take_batch(assembler)
        if batch and not waited:  # pending from here until its flush returns
            flushing.set()
        return batch

    def slow_first_flush(assembler: Assembler, batch: Batch) -> None:
        if not waited:  # held until another window is appended, 5 s at most
            waited.append(appended_meanwhile.wait(timeout=5))
            flushing.clear()
        sync(assembler, batch)

    before_each_append(monkeypatch, note_append)
    monkeypatch.setattr(Assembler, "take_batch", note_first_batch)
    monkeypatch.setattr(Assembler, "sync", slow_first_flush)
    async with SandboxServer(SandboxSettings(rows_per_hour=60)) as sandbox:
        result, start = await export_with(sandbox, output, flush_bytes=1)

    assert waited == [True]
    assert result.complete
    assert_exported_exactly(output, sandbox, start, 4 * HOUR)


@pytest.mark.parametrize("damage", ["removed", "cut"])
async def test_a_partial_output_damaged_during_the_run_is_never_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    output = tmp_path / "o.csv"
    appends: list[str] = []

    def damage_the_partial(assembler: Assembler, record: WindowRecord) -> None:
        appends.append(record.window.key)
        partial = assembler.paths.partial
        if len(appends) == 3 and damage == "removed":
            partial.unlink()
        elif len(appends) == 3:
            os.truncate(partial, 10)

    async with SandboxServer(SandboxSettings(rows_per_hour=60)) as sandbox:
        with monkeypatch.context() as patched:
            before_each_append(patched, damage_the_partial)
            first, start = await export_with(sandbox, output, hours=6, flush_bytes=1)

        assert not output.exists()
        second, _ = await export_with(sandbox, output, hours=6)

    assert not first.complete
    assert "removed or cut it; rerun" in (first.error or "")
    assert second.complete
    assert_exported_exactly(output, sandbox, start, 6 * HOUR)


async def test_a_part_removed_during_the_run_fails_its_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "o.csv"
    async with SandboxServer(SandboxSettings(rows_per_hour=60)) as sandbox:
        with monkeypatch.context() as patched:
            acted = before_the_second_windows_append(patched, Path.unlink)
            first, start = await export_with(sandbox, output)

        second, _ = await export_with(sandbox, output)

    removed = [record.window.key for record in acted]

    assert list(first.failed) == removed
    assert "changed on disk" in first.failed[removed[0]]
    assert "No such file" in first.failed[removed[0]]
    assert first.error is None  # not taken for a disk error
    assert second.complete
    assert_exported_exactly(output, sandbox, start, 4 * HOUR)


async def test_a_directory_in_place_of_a_part_stops_the_run_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "o.csv"

    def block(part: Path) -> None:
        part.unlink()
        (part / "something").mkdir(parents=True)

    async with SandboxServer(SandboxSettings(rows_per_hour=60)) as sandbox:
        with monkeypatch.context() as patched:
            acted = before_the_second_windows_append(patched, block)
            with pytest.raises(StateWriteError, match="delete it by hand, then rerun"):
                await export_with(sandbox, output)

        blocked = [ExportPaths(output).part(record.window) for record in acted]

        with pytest.raises(UsageError, match=r"did not write .*move them away"):
            await export_with(sandbox, output)  # still there: refused up front

        shutil.rmtree(blocked[0])
        second, start = await export_with(sandbox, output)

    assert second.complete
    assert_exported_exactly(output, sandbox, start, 4 * HOUR)


async def test_the_manifest_is_saved_while_one_window_holds_the_rest_up(
    tmp_path: Path,
) -> None:
    output = tmp_path / "o.csv"
    paths = ExportPaths(output)
    seen_done: list[int] = []  # windows done while the first is still out
    async with SandboxServer(SandboxSettings(rows_per_hour=60)) as sandbox:
        start = find_range_with_empty_hour(sandbox.history, hours=4)
        first_hour = start.strftime("%Y-%m-%dT%H:%M:%SZ")
        faults = f"slow_first_byte@1@{first_hour}, first_byte_seconds=4"
        sandbox.update(faults=parse_faults(faults))

        async def watch() -> None:
            while not output.exists():
                await anyio.sleep(0.2)
                if paths.manifest.exists():
                    seen_done.append(
                        done_behind_the_first(Manifest.load(paths.manifest))
                    )

        async with anyio.create_task_group() as group:
            group.start_soon(watch)
            result, _ = await export_with(sandbox, output)

    assert result.complete
    assert max(seen_done) == 3  # saved while window 1 was still out


async def test_a_disk_that_refuses_parts_stops_the_run_as_a_disk_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "o.csv"

    def file_too_large(writer: PartWriter) -> None:
        raise OSError(errno.EFBIG, "File too large")

    async with SandboxServer(SandboxSettings(rows_per_hour=60)) as sandbox:
        with monkeypatch.context() as patched:
            patched.setattr(PartWriter, "store", file_too_large)
            with pytest.raises(StateWriteError) as stopped:
                await export_with(sandbox, output)

        second, start = await export_with(sandbox, output)

    # Not a window the server refused (exit 2, do not retry): the disk (exit 1).
    assert stopped.value.exit_code == ExitCode.WINDOWS_FAILED
    assert "File too large; rerun once it can be written" in str(stopped.value)
    assert not list(ExportPaths(output).parts.glob("*.tmp"))
    assert second.complete
    assert_exported_exactly(output, sandbox, start, 4 * HOUR)
