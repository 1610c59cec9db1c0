from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from orchestrator import manifest as manifest_module
from orchestrator import merger, parts
from orchestrator.errors import ManifestError, UsageError
from orchestrator.export import select_windows
from orchestrator.manifest import (
    DONE,
    FAILED,
    MERGED,
    PENDING,
    ExportPaths,
    Manifest,
    WindowRecord,
)
from orchestrator.merger import Assembler, PartChangedError
from orchestrator.parts import PartInfo, PartWriter
from orchestrator.planner import Window, plan_windows

START = dt.datetime(2026, 11, 3, tzinfo=dt.UTC)


def new_manifest(tmp_path: Path, hours: int = 3) -> tuple[Manifest, ExportPaths]:
    paths = ExportPaths(tmp_path / "out.csv")
    end = START + dt.timedelta(hours=hours)
    windows = plan_windows(START, end, dt.timedelta(hours=1))
    request = {"format": "csv", "start": START.isoformat(), "end": end.isoformat()}
    manifest = Manifest(paths.manifest, request, [WindowRecord(w) for w in windows])
    manifest.save()
    return manifest, paths


def test_manifest_round_trips_and_is_private(tmp_path: Path) -> None:
    manifest, paths = new_manifest(tmp_path)
    manifest.windows[0].state = DONE
    manifest.windows[0].rows = 12
    manifest.save()

    loaded = Manifest.load(paths.manifest)

    assert loaded.windows == manifest.windows
    assert loaded.request == manifest.request
    assert stat.S_IMODE(paths.manifest.stat().st_mode) == 0o600


def test_truncated_manifest_is_detected_with_a_way_out(tmp_path: Path) -> None:
    _, paths = new_manifest(tmp_path)
    data = paths.manifest.read_bytes()
    paths.manifest.write_bytes(data[: len(data) // 2])

    with pytest.raises(ManifestError, match=r"damaged.*--restart"):
        Manifest.load(paths.manifest)


def test_edited_manifest_fails_its_checksum(tmp_path: Path) -> None:
    _, paths = new_manifest(tmp_path)
    document = json.loads(paths.manifest.read_text())
    document["manifest"]["windows"][0]["state"] = "merged"
    paths.manifest.write_text(json.dumps(document))

    with pytest.raises(ManifestError, match="checksum"):
        Manifest.load(paths.manifest)


def test_a_byte_edited_in_a_saved_manifest_fails_its_checksum(tmp_path: Path) -> None:
    _, paths = new_manifest(tmp_path)
    data = paths.manifest.read_bytes()
    assert b'"state":"pending"' in data  # saved as canonical JSON
    paths.manifest.write_bytes(
        data.replace(b'"state":"pending"', b'"state":"failed"', 1)
    )

    with pytest.raises(ManifestError, match="checksum"):
        Manifest.load(paths.manifest)


def test_a_manifest_laid_out_as_earlier_versions_wrote_it_loads(tmp_path: Path) -> None:
    manifest, paths = new_manifest(tmp_path)
    document = json.loads(paths.manifest.read_bytes())
    paths.manifest.write_text(json.dumps(document, indent=1))  # not canonical

    assert Manifest.load(paths.manifest).windows == manifest.windows


def drop_all(manifest: Manifest) -> None:
    manifest.windows.clear()


def drop_the_middle(manifest: Manifest) -> None:
    del manifest.windows[1]


def double_the_last(manifest: Manifest) -> None:
    manifest.windows.append(WindowRecord(manifest.windows[-1].window))


def no_request(manifest: Manifest) -> None:
    setattr(manifest, "request", "x")  # noqa: B010 - the wrong type on purpose


def negative_size(manifest: Manifest) -> None:
    manifest.merged_bytes = -5


def fractional_size(manifest: Manifest) -> None:
    setattr(manifest, "merged_bytes", 1.5)  # noqa: B010 - the wrong type on purpose


def negative_part(manifest: Manifest) -> None:
    manifest.windows[0].bytes = -1


@pytest.mark.parametrize(
    "edit",
    [
        drop_all,
        drop_the_middle,
        double_the_last,
        no_request,
        negative_size,
        fractional_size,
        negative_part,
    ],
)
def test_an_edited_manifest_with_a_fresh_checksum_is_still_refused(
    tmp_path: Path, edit: Any
) -> None:
    manifest, paths = new_manifest(tmp_path)
    edit(manifest)
    manifest.save()  # a checksum that matches the edit

    with pytest.raises(ManifestError, match=r"is damaged .*--restart"):
        Manifest.load(paths.manifest)


def test_split_replaces_a_window_by_its_halves_later_first(tmp_path: Path) -> None:
    manifest, _ = new_manifest(tmp_path)
    first, second = manifest.split(manifest.windows[1])

    assert [r.window for r in manifest.windows][1:3] == [second.window, first.window]
    assert first.window.end == START + dt.timedelta(hours=1, minutes=30)


def reconciled(manifest: Manifest, paths: ExportPaths, **options: Any) -> Assembler:
    assembler = Assembler(manifest, paths, header=["A", "B"], delimiter=",", **options)
    assembler.reconcile()
    return assembler


def finish_part(paths: ExportPaths, record: WindowRecord, body: bytes) -> PartInfo:
    paths.parts.mkdir(exist_ok=True)
    writer = PartWriter(paths.part(record.window), columns=["A", "B"], delimiter=",")
    writer.write(body)
    info = writer.finish()
    record.state, record.rows, record.bytes = DONE, info.rows, info.bytes
    record.sha256, record.newline = info.sha256, info.newline
    return info


def assemble(assembler: Assembler, *, flush: bool = True) -> None:
    for record in assembler.ready():
        assembler.appended(record, assembler.append(record))
    if flush:
        assembler.flush()
    assembler.manifest.flush()


def test_windows_are_appended_in_order_only(tmp_path: Path) -> None:
    manifest, paths = new_manifest(tmp_path)
    assembler = reconciled(manifest, paths)
    finish_part(paths, manifest.windows[1], b"A,B\n2,x\n")

    assemble(assembler)
    assert not paths.partial.exists()

    finish_part(paths, manifest.windows[0], b"\xef\xbb\xbfA,B\n1,x")
    finish_part(paths, manifest.windows[2], b"")
    assemble(assembler)
    assembler.publish()

    assert paths.output.read_bytes() == b"A,B\n1,x\n2,x\n"
    assert [r.state for r in manifest.windows] == [MERGED] * 3
    assert not paths.parts.exists()
    assert stat.S_IMODE(paths.output.stat().st_mode) == 0o600


def test_reconcile_truncates_bytes_appended_after_the_last_record(
    tmp_path: Path,
) -> None:
    manifest, paths = new_manifest(tmp_path)
    assembler = reconciled(manifest, paths)
    finish_part(paths, manifest.windows[0], b"A,B\n1,x\n")
    assemble(assembler)
    with paths.partial.open("ab") as partial:
        partial.write(b"2,half-appended")

    reloaded = Manifest.load(paths.manifest)
    reconciled(reloaded, paths)

    assert paths.partial.read_bytes() == b"A,B\n1,x\n"


def test_reconcile_requests_a_changed_part_again(tmp_path: Path) -> None:
    manifest, paths = new_manifest(tmp_path)
    reconciled(manifest, paths)
    finish_part(paths, manifest.windows[1], b"A,B\n2,x\n")
    manifest.save()
    paths.part(manifest.windows[1].window).write_bytes(b"2,y\n")

    reloaded = Manifest.load(paths.manifest)
    reconciled(reloaded, paths)

    assert reloaded.windows[1].state == PENDING
    assert not paths.part(reloaded.windows[1].window).exists()


def test_reconcile_reassembles_when_the_partial_lost_bytes(tmp_path: Path) -> None:
    manifest, paths = new_manifest(tmp_path)
    assembler = reconciled(manifest, paths, keep_parts=True)
    finish_part(paths, manifest.windows[0], b"A,B\n1,x\n")
    assemble(assembler)
    paths.partial.write_bytes(b"A,")

    reloaded = Manifest.load(paths.manifest)
    again = reconciled(reloaded, paths, keep_parts=True)
    assemble(again)

    assert paths.partial.read_bytes() == b"A,B\n1,x\n"


def test_windows_count_as_merged_only_once_flushed(tmp_path: Path) -> None:
    manifest, paths = new_manifest(tmp_path)
    assembler = reconciled(manifest, paths)
    finish_part(paths, manifest.windows[0], b"A,B\n1,x\n")
    finish_part(paths, manifest.windows[1], b"A,B\n2,x\n")

    assemble(assembler, flush=False)
    manifest.save()  # a checkpoint for another reason, then the process dies

    assert paths.partial.read_bytes() == b"A,B\n1,x\n2,x\n"
    assert [r.state for r in manifest.windows[:2]] == [DONE, DONE]
    assert assembler.ready() == []  # appended already, not twice
    reloaded = Manifest.load(paths.manifest)
    assert reloaded.merged_bytes == 0
    assert all(paths.part(r.window).exists() for r in reloaded.windows[:2])

    again = reconciled(reloaded, paths)
    assert not paths.partial.exists() or paths.partial.read_bytes() == b""
    finish_part(paths, reloaded.windows[2], b"A,B\n3,x\n")
    assemble(again)
    again.publish()

    assert paths.output.read_bytes() == b"A,B\n1,x\n2,x\n3,x\n"


def test_flush_comes_due_after_flush_bytes_and_then_drops_parts(
    tmp_path: Path,
) -> None:
    manifest, paths = new_manifest(tmp_path)
    assembler = reconciled(manifest, paths, flush_bytes=12)
    first, second = manifest.windows[:2]
    finish_part(paths, first, b"A,B\n1,x\n")
    finish_part(paths, second, b"A,B\n2,x\n")
    parts = [paths.part(first.window), paths.part(second.window)]

    assert assembler.ready() == [first, second]
    assembler.appended(first, assembler.append(first))
    assert not assembler.flush_due()  # 8 bytes: header and one row
    assembler.appended(second, assembler.append(second))
    assert assembler.flush_due()  # 12 bytes
    assert all(part.exists() for part in parts)

    assembler.flush()

    assert not assembler.flush_due()
    assert not any(part.exists() for part in parts)
    saved = Manifest.load(paths.manifest)
    assert [r.state for r in saved.windows[:2]] == [MERGED, MERGED]
    assert [r.offset for r in saved.windows[:2]] == [0, 8]
    assert saved.merged_bytes == 12


def test_an_append_that_failed_half_way_is_cut_off(tmp_path: Path) -> None:
    manifest, paths = new_manifest(tmp_path)
    assembler = reconciled(manifest, paths)
    finish_part(paths, manifest.windows[0], b"A,B\n1,x\n")
    assemble(assembler)
    with paths.partial.open("ab") as partial:
        partial.write(b"2,half-")  # what a disk that filled up left

    finish_part(paths, manifest.windows[1], b"A,B\n2,x\n")
    assemble(assembler)

    assert paths.partial.read_bytes() == b"A,B\n1,x\n2,x\n"


def test_an_empty_part_after_a_cut_off_leaves_no_gap(tmp_path: Path) -> None:
    manifest, paths = new_manifest(tmp_path)
    assembler = reconciled(manifest, paths)
    finish_part(paths, manifest.windows[0], b"A,B\n1,x\n")
    assemble(assembler)
    with paths.partial.open("ab") as partial:
        partial.write(b"2,half-")

    finish_part(paths, manifest.windows[1], b"")  # a window without rows
    finish_part(paths, manifest.windows[2], b"A,B\n3,x\n")
    assemble(assembler)

    assert paths.partial.read_bytes() == b"A,B\n1,x\n3,x\n"
    assert manifest.merged_bytes == len(b"A,B\n1,x\n3,x\n")


@pytest.mark.parametrize("damage", [b"\0\0\0\0", b"2,x\n2,x\n"])
def test_a_part_changed_on_disk_is_not_appended(tmp_path: Path, damage: bytes) -> None:
    manifest, paths = new_manifest(tmp_path)
    assembler = reconciled(manifest, paths)
    finish_part(paths, manifest.windows[0], b"A,B\n1,x\n")
    finish_part(paths, manifest.windows[1], b"A,B\n2,x\n")
    assemble(assembler)
    finish_part(paths, manifest.windows[2], b"A,B\n3,x\n")
    paths.part(manifest.windows[2].window).write_bytes(damage)  # the disk lost it

    [record] = assembler.ready()
    with pytest.raises(PartChangedError, match=r"changed on disk.*rerun"):
        assembler.append(record)
    assembler.drop(record, "changed")
    assembler.flush()

    assert record.state == FAILED
    assert not paths.part(record.window).exists()
    assert manifest.merged_bytes == len(b"A,B\n1,x\n2,x\n")
    record.state = DONE  # the rerun downloads it again
    finish_part(paths, record, b"A,B\n3,x\n")
    assemble(assembler)
    assembler.publish()
    assert paths.output.read_bytes() == b"A,B\n1,x\n2,x\n3,x\n"


def test_paths_sit_beside_the_output(tmp_path: Path) -> None:
    paths = ExportPaths(tmp_path / "x.csv")
    window = Window(START, START + dt.timedelta(hours=1))

    assert paths.manifest.name == "x.csv.manifest.json"
    assert paths.part(window).name == "20261103T000000Z_20261103T010000Z.part"


def test_reconcile_removes_unfinished_temporary_files(tmp_path: Path) -> None:
    manifest, paths = new_manifest(tmp_path)
    paths.parts.mkdir()
    stem = paths.part(manifest.windows[0].window).stem
    for name in (f"{stem}.tmp", f"{stem}.tmp.kept"):
        (paths.parts / name).write_bytes(b"half")

    reconciled(manifest, paths)

    assert list(paths.parts.iterdir()) == []


def replace_with(path: Path, data: bytes) -> None:
    """Put ``data`` in place of ``path`` as another program would: a new file
    renamed over it."""
    staged = path.with_name(path.name + ".new")
    staged.write_bytes(data)
    staged.replace(path)


def assert_the_next_part_is_refused(assembler: Assembler) -> None:
    """The one window ready to append is refused: its part is not what was hashed."""
    [ready] = assembler.ready()
    with pytest.raises(PartChangedError, match="changed on disk"):
        assembler.append(ready)


@pytest.mark.parametrize("damage", [b"\0\0\0\0", b"3,x\n3,x\n"])
def test_a_part_vouched_for_and_then_replaced_is_not_appended(
    tmp_path: Path, damage: bytes
) -> None:
    manifest, paths = new_manifest(tmp_path)
    assembler = reconciled(manifest, paths)
    record = manifest.windows[0]
    info = finish_part(paths, record, b"A,B\n3,x\n")
    assembler.mark_whole(record, info.written)
    replace_with(paths.part(record.window), damage)

    assert_the_next_part_is_refused(assembler)


def test_a_part_vouched_for_is_copied_without_hashing_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, paths = new_manifest(tmp_path)
    assembler = reconciled(manifest, paths)
    first, second = manifest.windows[:2]
    info = finish_part(paths, first, b"A,B\n1,x\n")
    finish_part(paths, second, b"A,B\n2,x\n")
    assembler.mark_whole(first, info.written)

    def no_hashing() -> None:
        raise AssertionError("hashed")

    monkeypatch.setattr(merger, "hashlib", SimpleNamespace(sha256=no_hashing))
    assert assembler.ready() == [first, second]
    assembler.appended(first, assembler.append(first))

    with pytest.raises(AssertionError, match="hashed"):  # not vouched for: hashed
        assembler.append(second)

    assembler.flush()
    assert paths.partial.read_bytes() == b"A,B\n1,x\n"


def vouched_parts(tmp_path: Path) -> tuple[Manifest, ExportPaths, Assembler]:
    """Three windows whose parts were written and hashed in this process."""
    manifest, paths = new_manifest(tmp_path)
    assembler = reconciled(manifest, paths)
    for number, record in enumerate(manifest.windows, 1):
        info = finish_part(paths, record, b"A,B\n%d,x\n" % number)
        assembler.mark_whole(record, info.written)

    return manifest, paths, assembler


def test_a_part_vouched_for_is_copied_by_the_kernel_after_any_cut_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, paths, assembler = vouched_parts(tmp_path)
    copies: list[int] = []
    kernel_copy = os.copy_file_range

    def counted(source: int, target: int, count: int) -> int:
        copies.append(copied := kernel_copy(source, target, count))
        return copied

    monkeypatch.setattr(os, "copy_file_range", counted)
    first, second, third = assembler.ready()
    assembler.appended(first, assembler.append(first))
    with paths.partial.open("ab") as partial:
        partial.write(b"2,half-")  # what a disk that filled up left

    assembler.appended(second, assembler.append(second))
    assembler.appended(third, assembler.append(third))
    assembler.flush()

    assert paths.partial.read_bytes() == b"A,B\n1,x\n2,x\n3,x\n"
    assert sum(copies) == len(b"1,x\n2,x\n3,x\n")


@pytest.mark.parametrize("before_refusing", [0, 2])
def test_a_kernel_refusing_to_copy_leaves_the_copy_to_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before_refusing: int
) -> None:
    _, paths, assembler = vouched_parts(tmp_path)
    kernel_copy = os.copy_file_range
    calls: list[int] = []

    def refusing(source: int, target: int, count: int) -> int:
        calls.append(count)
        if len(calls) == 1 and before_refusing:
            return kernel_copy(source, target, before_refusing)

        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refusing)
    assemble(assembler)
    assembler.publish()

    assert calls
    assert paths.output.read_bytes() == b"A,B\n1,x\n2,x\n3,x\n"


def test_a_kernel_copy_failing_otherwise_fails_the_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, assembler = vouched_parts(tmp_path)

    def disk_full(source: int, target: int, count: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", disk_full)
    [first, *_] = assembler.ready()
    with pytest.raises(OSError, match="No space left"):
        assembler.append(first)


def test_a_part_replaced_before_it_is_vouched_for_is_not_appended(
    tmp_path: Path,
) -> None:
    manifest, paths = new_manifest(tmp_path)
    assembler = reconciled(manifest, paths)
    record = manifest.windows[0]
    info = finish_part(paths, record, b"A,B\n3,x\n")
    replace_with(paths.part(record.window), b"\0\0\0\0")  # not the file hashed

    assembler.mark_whole(record, info.written)

    assert_the_next_part_is_refused(assembler)


def test_a_part_replaced_right_after_reconcile_checked_it_is_not_appended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, paths = new_manifest(tmp_path)
    finish_part(paths, manifest.windows[0], b"A,B\n3,x\n")
    verify = parts.verify_part

    def replaced_after_the_check(path: Path, **recorded: Any) -> Any:
        checked = verify(path, **recorded)
        replace_with(path, b"\0\0\0\0")
        return checked

    monkeypatch.setattr("orchestrator.merger.verify_part", replaced_after_the_check)
    assembler = reconciled(manifest, paths)

    assert_the_next_part_is_refused(assembler)


def test_reconcile_vouches_for_the_parts_it_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, paths = new_manifest(tmp_path)
    finish_part(paths, manifest.windows[0], b"A,B\n1,x\n")
    assembler = reconciled(manifest, paths)  # checks the part's SHA-256 once

    monkeypatch.setattr(merger, "hashlib", SimpleNamespace(sha256=None))
    assemble(assembler)

    assert paths.partial.read_bytes() == b"A,B\n1,x\n"


def test_a_batch_is_flushed_while_later_windows_are_appended(tmp_path: Path) -> None:
    manifest, paths = new_manifest(tmp_path)
    assembler = reconciled(manifest, paths, flush_bytes=8)
    first, second, third = manifest.windows
    for number, record in enumerate(manifest.windows, start=1):
        finish_part(paths, record, f"A,B\n{number},x\n".encode())

    assert assembler.ready() == [first, second, third]
    assembler.appended(first, assembler.append(first))
    assert assembler.flush_due()
    batch = assembler.take_batch()
    assert batch is not None
    assert not assembler.flush_due()
    assert assembler.ready() == [second, third]  # the batch's window is not offered

    assembler.appended(second, assembler.append(second))  # while the batch flushes
    assembler.sync(batch)
    assembler.settle(batch)

    saved = Manifest.load(paths.manifest)
    assert [r.state for r in saved.windows] == [MERGED, DONE, DONE]
    assert saved.merged_bytes == len(b"A,B\n1,x\n")  # not the second window's bytes
    assert not paths.part(first.window).exists()
    assert paths.part(second.window).exists()
    assert assembler.ready() == [third]

    assemble(assembler)
    assembler.publish()
    assert paths.output.read_bytes() == b"A,B\n1,x\n2,x\n3,x\n"


def test_a_manifest_nested_too_deeply_is_damaged_with_a_way_out(
    tmp_path: Path,
) -> None:
    paths = ExportPaths(tmp_path / "out.csv")
    paths.manifest.write_text("[" * 100_000 + "\n")

    with pytest.raises(ManifestError, match=r"damaged.*--restart"):
        Manifest.load(paths.manifest)


def test_redo_choices_are_read_as_written_or_refused_by_name(tmp_path: Path) -> None:
    manifest, _ = new_manifest(tmp_path, hours=26)
    manifest.windows[1].state = FAILED

    now = START + dt.timedelta(hours=3)

    def select(*choices: str, zone: dt.tzinfo = dt.UTC) -> list[WindowRecord]:
        return select_windows(manifest, choices, now=now, zone=zone)

    assert select(" failed ") == [manifest.windows[1]]
    assert select("2026-11-03T01:00Z/2026-11-03T02:00Z") == [manifest.windows[1]]
    assert select("-1h/now") == [manifest.windows[2]]  # the run's clock, not the wall's
    assert select("2026-11-04/2026-11-05") == manifest.windows[24:]
    paris = ZoneInfo("Europe/Paris")  # UTC+1 in November, as --tz Europe/Paris
    assert select("2026-11-04/2026-11-05", zone=paris) == manifest.windows[23:]

    with pytest.raises(UsageError, match="its end is not after its start"):
        select("2026-11-03T02:00Z/2026-11-03T01:00Z")


def test_a_manifest_that_is_not_a_regular_file_is_refused_without_reading_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.csv.manifest.json"
    os.mkfifo(path)  # reading would wait for a writer forever

    with pytest.raises(ManifestError, match="is not a regular file: move it away"):
        Manifest.load(path)


def test_a_manifest_of_many_windows_is_saved_in_pieces_under_one_checksum(
    tmp_path: Path,
) -> None:
    start = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    windows = plan_windows(
        start, start + dt.timedelta(hours=1203), dt.timedelta(hours=1)
    )
    records = [
        WindowRecord(window, rows=i, error="é\u2028")
        for i, window in enumerate(windows)
    ]
    request = {"start": start.isoformat(), "end": windows[-1].end.isoformat()}
    manifest = Manifest(tmp_path / "m.json", request, records, extra={"note": "ü"})

    manifest.save()

    document = json.loads(manifest.path.read_bytes())
    canonical = json.dumps(document["manifest"], sort_keys=True, separators=(",", ":"))
    assert manifest.path.read_text().startswith('{"manifest":' + canonical + ",")
    assert document["sha256"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert Manifest.load(manifest.path).windows == records


def test_a_saved_manifest_is_checked_without_writing_it_out_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, paths = new_manifest(tmp_path)

    def no_second_copy(content: Any) -> str:
        raise AssertionError("the content was serialized again to be checked")

    monkeypatch.setattr(manifest_module, "_digest", no_second_copy)
    assert Manifest.load(paths.manifest).windows == manifest.windows


def test_a_window_shaped_note_in_a_manifest_stays_a_note(tmp_path: Path) -> None:
    manifest, paths = new_manifest(tmp_path)
    note = manifest.windows[0].to_json()
    manifest.extra["note"] = note
    manifest.save()

    loaded = Manifest.load(paths.manifest)
    assert loaded.extra["note"] == note
    loaded.save()  # still plain JSON
