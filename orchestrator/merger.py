"""Assemble the output: one header, then every window's rows in window order.

Windows are appended to ``<output>.partial`` as soon as the next one in order is done.
Appends are flushed to disk in batches, one once ``flush_bytes`` have piled up (64 MB
unless ``--flush-mb`` says otherwise) and the last at the end: only after its flush
does the manifest record a batch's windows as merged, and only then are their parts
deleted. So a crash at any moment, even of the machine, loses nothing (the manifest
never claims bytes the disk may not have). A batch may be flushed while the next
windows are appended (one batch at a time), so an export needs room for the output
plus twice ``flush_bytes`` of appended parts (each batch may overrun it by one
part), plus the parts still waiting for their turn. The partial file takes the
output's name only when every window is in it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import logging
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from orchestrator.config import FLUSH_BYTES
from orchestrator.errors import StateWriteError
from orchestrator.manifest import (
    DONE,
    FAILED,
    MERGED,
    PENDING,
    PUBLISHING,
    REOPENED,
    ExportPaths,
    Manifest,
    WindowRecord,
)
from orchestrator.parts import (
    PRIVATE_DIR,
    FileIdentity,
    fsync_directory,
    open_private,
    verify_part,
)
from orchestrator.planner import Window

logger = logging.getLogger(__name__)

BLOCK = 1 << 20
KERNEL_COPY = 1 << 30  # bytes asked of one copy_file_range call
# What copy_file_range answers where the kernel or filesystem cannot copy.
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP})
GZIP_LEVEL = 6


class PartChangedError(Exception):
    """A part no longer holds what was downloaded: it was replaced, rewritten or
    removed, or it was never hashed in this process and its checksum differs."""

    def __init__(
        self, record: WindowRecord, how: str = "size or SHA-256 differs"
    ) -> None:
        super().__init__(
            f"window {record.window}: its part changed on disk after it was "
            f"downloaded ({how}); rerun to request it again"
        )
        self.record = record


class OutputChangedError(StateWriteError):
    """The partial output lost bytes already appended to it: another program
    removed or cut it during the run."""

    def __init__(self, path: Path, found: int, expected: int) -> None:
        super().__init__(
            f"{path} holds {found:,} bytes where {expected:,} were appended: another "
            "program removed or cut it; rerun to assemble it again"
        )


class Assembler:
    """Append done windows to the partial output in order, then publish it."""

    def __init__(
        self,
        manifest: Manifest,
        paths: ExportPaths,
        *,
        header: list[str],
        delimiter: str,
        keep_parts: bool = False,
        gzip: bool = False,
        flush_bytes: int = FLUSH_BYTES,
    ) -> None:
        self.manifest = manifest
        self.paths = paths
        self._header = delimiter.join(header)
        self._keep_parts = keep_parts
        self._gzip = gzip
        self._flush_bytes = flush_bytes
        self._restart_at(manifest.merged_bytes)
        self._header_bytes = b""
        # Parts known whole in this process, each with its file's identity then.
        self._whole: dict[Window, FileIdentity] = {}

    def reconcile(self) -> None:
        """Bring files and manifest into agreement after a stop at any moment."""
        if self._published_unrecorded():
            logger.info(
                "%s was given its name before the last run stopped; recording the "
                "export as complete",
                self.paths.output,
            )
            self._record_published()
            return

        self.paths.parts.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        own, _ = self.paths.part_files()
        for leftover in own:  # a download or a boundary pass cut short
            if not leftover.name.endswith(".part"):
                leftover.unlink()

        self._reconcile_partial()
        self._reconcile_parts()
        self._restart_at(self.manifest.merged_bytes)
        self.manifest.save()

    def _restart_at(self, size: int) -> None:
        """Take the output as ``size`` bytes long, every byte of it recorded."""
        # Appended and not yet in a batch: each record with the offset it starts at.
        self._unflushed: list[tuple[WindowRecord, int]] = []
        self._appended: set[int] = set()  # ids of the records appended, not merged
        self._size = self._batched_to = size

    def _reconcile_partial(self) -> None:
        partial = self.paths.partial
        size = partial.stat().st_size if partial.exists() else 0
        if size < self.manifest.merged_bytes:
            logger.warning(
                "%s is shorter than recorded; assembling it again", partial.name
            )
            partial.unlink(missing_ok=True)
            self.manifest.merged_bytes = 0
            for record in self.manifest.windows:
                if record.state == MERGED:
                    record.state = DONE
        elif size > self.manifest.merged_bytes:
            os.truncate(partial, self.manifest.merged_bytes)

    def _reconcile_parts(self) -> None:
        for record in self.manifest.windows:
            if record.state != DONE:
                continue

            part = self.paths.part(record.window)
            checked = verify_part(part, size=record.bytes, sha256=record.sha256 or "")
            if checked is not None:
                self._whole[record.window] = checked
                continue

            logger.warning(
                "window %s: part missing or changed; requesting it again",
                record.window,
            )
            _remove(part)
            record.state = PENDING

    def mark_whole(self, record: WindowRecord, written: FileIdentity | None) -> None:
        """Note that ``record``'s part was just written and renamed into place:
        :meth:`append` may then copy it without hashing it again, as long as its
        identity does not change. ``written`` is the identity of the file the
        download hashed; a part that is not that file is not vouched for."""
        found = FileIdentity.of(os.stat(self.paths.part(record.window)))
        if written is not None and written.same_contents(found):
            self._whole[record.window] = found

    def reopen(self, records: list[WindowRecord]) -> int:
        """Put windows back to pending so that this run requests them again.

        The output being assembled is cut back to where the first of them began,
        and the windows after that point are put back into part files, to be
        appended again without being downloaded again. A published output stays in
        place, whole, until the new one replaces it: the partial output starts as a
        copy of the part that stays. Returns how many windows were reopened.
        """
        reopen = [r for r in records if r.state != PENDING]
        if not reopen:
            return 0

        self.paths.parts.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        source = self.paths.output if self.manifest.complete else self.paths.partial

        offsets = [
            r.offset for r in reopen if r.state == MERGED and r.offset is not None
        ]
        self._note_published_rows(reopen)
        if offsets:
            self._cut(min(offsets), reopen, source)

        self.manifest.complete = False
        for record in reopen:
            _remove(self.paths.part(record.window))
            record.state, record.provisional = PENDING, False

        self.manifest.save()
        self._reconcile_parts()
        return len(reopen)

    def _note_published_rows(self, reopen: list[WindowRecord]) -> None:
        """Note the windows reopened whose rows the published output holds, until
        the next one replaces it: they must never be dropped as past retention."""
        if not self.paths.output.exists():
            return

        noted = self.manifest.extra.setdefault(REOPENED, [])
        for record in reopen:
            if record.state == MERGED and record.window.key not in noted:
                noted.append(record.window.key)

    def _cut(self, offset: int, reopen: list[WindowRecord], source: Path) -> None:
        merged = [r for r in self.manifest.windows if r.state == MERGED]
        ends = [r.offset or 0 for r in merged[1:]] + [self.manifest.merged_bytes]
        with source.open("rb") as assembled:
            for record, end in zip(merged, ends, strict=True):
                if (record.offset or 0) < offset:
                    continue

                if record not in reopen:
                    self._extract(assembled, record, end)

                record.state, record.offset = DONE, None

            if source == self.paths.partial:
                os.truncate(self.paths.partial, offset)
            else:
                self._copy_head(assembled, offset)

        # The parts put back, and a partial output made new, must outlive a crash
        # once the manifest counts on them.
        fsync_directory(self.paths.parts)
        fsync_directory(self.paths.partial.parent)
        self.manifest.merged_bytes = offset
        self._restart_at(offset)

    def _copy_head(self, assembled: BinaryIO, length: int) -> None:
        """Start the partial output as the first ``length`` bytes of the output."""
        assembled.seek(0)
        with open_private(self.paths.partial) as partial:
            for block in _read_range(assembled, length):
                partial.write(block)

            partial.flush()
            os.fsync(partial.fileno())

    def _extract(self, partial: BinaryIO, record: WindowRecord, end: int) -> None:
        """Copy a merged window's rows back out of the output into its part file.

        A part that comes out different from what was recorded is caught by the
        checksum check that follows, and its window is requested again.
        """
        start = record.offset or 0
        partial.seek(start)
        blocks = _read_range(partial, end - start)
        if self._gzip:
            blocks = _inflate(blocks)

        skip = len(self._header_line()) if start == 0 else 0
        with open_private(self.paths.part(record.window)) as target:
            for block in blocks:
                taken = block[skip:]
                skip = max(0, skip - len(block))
                target.write(taken)

            target.flush()
            os.fsync(target.fileno())

    def ready(self) -> list[WindowRecord]:
        """Windows whose part can be appended now, in window order."""
        newline = self._newline()
        if newline is None:
            return []

        # Taken here, on the event loop that changes the manifest: append, which
        # writes the header, runs in a worker thread.
        self._header_bytes = self._header_line()
        ready: list[WindowRecord] = []
        for record in self.manifest.windows:
            if record.state == MERGED or id(record) in self._appended:
                continue

            if record.state != DONE:
                break

            ready.append(record)

        return ready

    def append(self, record: WindowRecord) -> int:
        """Append a window's part (header first if the output is empty); return the
        new size of the output.

        Runs in a worker thread; the caller then calls :meth:`appended`. Bytes left
        by an append that failed half-way (a full disk) are cut off first. The
        part's size is always checked as it is copied, and its SHA-256 too unless
        this very file, unchanged (:class:`FileIdentity`), was hashed in this
        process: as it was downloaded, or by :meth:`reconcile`. Parts are not
        flushed to disk one by one: a crash of the machine can leave a part of the
        right size but the wrong bytes, and that is caught by the SHA-256 check of
        :meth:`reconcile` on the next run.
        """
        with self._open_partial() as output:
            if self._size == 0:
                self._write(output, [self._header_bytes])

            whole = self._whole.pop(record.window, None)
            with self._open_part(record) as source:
                same = FileIdentity.of(os.fstat(source.fileno())) == whole
                checked = _Checked(record, hashing=not same)
                if same and not self._gzip:
                    output.flush()
                    checked.copy(source, output)
                else:
                    self._write(output, checked.blocks(source))

            output.flush()
            checked.verify()
            return os.fstat(output.fileno()).st_size

    def _open_partial(self) -> io.BufferedWriter:
        """The partial output, opened to append at its recorded end: bytes left by
        an append that failed half-way are cut off; bytes missing are an error,
        never padded."""
        output = open_private(self.paths.partial, keep=True)
        found = os.fstat(output.fileno()).st_size
        if found < self._size:
            output.close()
            raise OutputChangedError(self.paths.partial, found, self._size)

        if found > self._size:
            output.truncate(self._size)

        output.seek(self._size)
        return output

    def _open_part(self, record: WindowRecord) -> io.BufferedReader:
        try:
            return self.paths.part(record.window).open("rb")
        except OSError as error:
            raise PartChangedError(record, error.strerror or str(error)) from None

    def _header_line(self) -> bytes:
        return (self._header + (self._newline() or "\n")).encode()

    def _write(self, output: BinaryIO, blocks: Iterable[bytes | memoryview]) -> None:
        """Write blocks as they are, or as one gzip member (no timestamp, so the
        same rows always give the same bytes)."""
        if not self._gzip:
            for block in blocks:
                output.write(block)

            return

        packer = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        for block in blocks:
            output.write(packer.compress(block))

        output.write(packer.flush())

    def appended(self, record: WindowRecord, size: int) -> None:
        """Note that ``record``'s part is now in the output, ``size`` bytes long;
        the manifest records it at the next :meth:`settle`."""
        self._unflushed.append((record, self._size))
        self._appended.add(id(record))
        self._size = size

    def drop(self, record: WindowRecord, reason: str) -> None:
        """Fail a window whose part cannot be appended, so a rerun requests it."""
        self._whole.pop(record.window, None)
        _remove(self.paths.part(record.window))
        record.state, record.error = FAILED, reason
        self.manifest.checkpoint()

    def flush_due(self) -> bool:
        """Whether enough has been appended since the last flush began to begin
        another."""
        return self._size - self._batched_to >= self._flush_bytes

    def take_batch(self) -> Batch | None:
        """The windows appended since the last batch was taken, to flush together;
        None if there are none. Appends may go on while the batch is flushed."""
        if not self._unflushed:
            return None

        batch = Batch(self._unflushed, self._size)
        self._unflushed, self._batched_to = [], self._size
        return batch

    def sync(self, batch: Batch) -> None:
        """Flush the partial output to disk, at least up to the end of ``batch``
        (a worker thread may run this, while another appends)."""
        try:
            descriptor = os.open(self.paths.partial, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            raise OutputChangedError(self.paths.partial, 0, batch.end) from None

        try:
            os.fsync(descriptor)
            found = os.fstat(descriptor).st_size
        finally:
            os.close(descriptor)

        if found < batch.end:
            raise OutputChangedError(self.paths.partial, found, batch.end)

        if batch.starts_file():
            fsync_directory(self.paths.partial.parent)

    def settle(self, batch: Batch) -> None:
        """After :meth:`sync`: record the batch's windows as merged, then delete
        their parts. Batches settle in the order they were taken."""
        for record, offset in batch.windows:
            record.state, record.offset = MERGED, offset

        self.manifest.merged_bytes = batch.end
        self.manifest.newline = self._newline()
        self.manifest.save()
        for record, _ in batch.windows:
            self._appended.discard(id(record))
            if not self._keep_parts:
                _remove(self.paths.part(record.window))

    def flush(self) -> None:
        """Flush what is appended and not yet in a batch, in the calling thread;
        no other batch may be in flight."""
        if batch := self.take_batch():
            self.sync(batch)
            self.settle(batch)

    def publish(self) -> None:
        """Give the output its name once every window is in it."""
        self.flush()
        if self.manifest.merged_bytes == 0:
            self.append_header_only()

        found = self.paths.partial.stat().st_size if self.paths.partial.exists() else 0
        if found != self.manifest.merged_bytes:
            raise OutputChangedError(
                self.paths.partial, found, self.manifest.merged_bytes
            )

        # Recorded first, so that a stop right after the rename is recognised.
        publishing = FileIdentity.of(self.paths.partial.stat())
        self.manifest.extra[PUBLISHING] = dataclasses.asdict(publishing)
        self.manifest.save()
        os.replace(self.paths.partial, self.paths.output)
        self._record_published()

    def _published_unrecorded(self) -> bool:
        """Whether the last run stopped after giving the output its name and before
        recording it: every window merged, no partial left, and at the output the
        very file that was about to be named (the note saved just before the
        rename), as long as the manifest records."""
        recorded = self.manifest.extra.get(PUBLISHING)
        if not isinstance(recorded, dict) or self.paths.partial.exists():
            return False

        if not self.all_merged():
            return False

        try:
            named = FileIdentity(**recorded)
            found = FileIdentity.of(self.paths.output.stat())
        except (TypeError, OSError):  # a malformed note, or no output
            return False

        # The same file (a rename keeps it), as long as recorded; its times may
        # have been touched since.
        same = (found.device, found.inode) == (named.device, named.inode)
        return same and found.size == named.size == self.manifest.merged_bytes

    def _record_published(self) -> None:
        fsync_directory(self.paths.output.parent)
        self.manifest.complete = True
        self.manifest.extra.pop(PUBLISHING, None)
        self.manifest.extra.pop(REOPENED, None)
        self.manifest.save()
        if not self._keep_parts:
            remove_parts_folder(self.paths)

    def append_header_only(self) -> None:
        with open_private(self.paths.partial) as output:
            self._write(output, [self._header_line()])
            output.flush()
            os.fsync(output.fileno())
            self.manifest.merged_bytes = output.tell()
            self._restart_at(self.manifest.merged_bytes)

    def all_merged(self) -> bool:
        return all(record.state == MERGED for record in self.manifest.windows)

    def _newline(self) -> str | None:
        """The output's newline: the first known, or LF once nothing else can tell."""
        if self.manifest.newline:
            return self.manifest.newline

        for record in self.manifest.windows:
            if record.newline:
                return record.newline

        finished = all(r.state in (DONE, MERGED) for r in self.manifest.windows)
        return "\n" if finished else None


@dataclass(frozen=True, slots=True)
class Batch:
    """Windows appended together, each with the offset it starts at, and the
    output's size after the last of them: flushed to disk and recorded together."""

    windows: list[tuple[WindowRecord, int]]
    end: int

    def starts_file(self) -> bool:
        """Whether the batch begins the output, so the new file's name must be
        flushed too."""
        return self.windows[0][1] == 0


class _Checked:
    """Read a part in blocks while counting (and hashing) them, then compare."""

    def __init__(self, record: WindowRecord, *, hashing: bool) -> None:
        self._record = record
        self._digest = hashlib.sha256() if hashing else None
        self._size = 0

    def blocks(self, source: io.BufferedReader) -> Iterator[memoryview]:
        buffer = bytearray(BLOCK)
        while read := source.readinto(buffer):
            block = memoryview(buffer)[:read]
            if self._digest is not None:
                self._digest.update(block)

            self._size += read
            yield block

    def copy(self, source: io.BufferedReader, output: BinaryIO) -> None:
        """Copy the rest of ``source`` to ``output``'s position inside the kernel
        (``copy_file_range``: no round trip through Python); read and write in
        blocks where the filesystem cannot. Both must have nothing buffered."""
        assert self._digest is None, "a copy inside the kernel is never hashed"
        self._size += _copy_in_kernel(source.fileno(), output.fileno())
        for block in self.blocks(source):  # what the kernel did not copy, if any
            output.write(block)

    def verify(self) -> None:
        record, digest = self._record, self._digest
        hash_differs = digest is not None and digest.hexdigest() != record.sha256
        if self._size != record.bytes or hash_differs:
            raise PartChangedError(record)


def _copy_in_kernel(source: int, target: int) -> int:
    """Copy from ``source``'s position to its end into ``target``; return the bytes
    copied, which stop short (at 0 at worst) where the kernel cannot copy between
    these files."""
    if not hasattr(os, "copy_file_range"):  # Linux only
        return 0

    copied = 0
    while True:
        try:
            count = os.copy_file_range(source, target, KERNEL_COPY)
        except OSError as error:
            if error.errno not in _NO_KERNEL_COPY:
                raise

            logger.debug("copy_file_range refused (%s): copying in blocks", error)
            return copied

        if count == 0:
            return copied

        copied += count


def remove_parts_folder(paths: ExportPaths) -> None:
    """Delete the parts left (their rows are in the published output) and the
    folder; only files named as parts are deleted, and a folder holding anything
    else stays."""
    paths.delete_part_files()
    with contextlib.suppress(OSError):
        paths.parts.rmdir()


def _remove(part: Path) -> None:
    """Delete a part file if it is there; what cannot be deleted stops the run."""
    try:
        part.unlink(missing_ok=True)
    except OSError as error:
        raise StateWriteError(
            f"cannot delete the part {part} ({error.strerror or error}); delete it "
            "by hand, then rerun"
        ) from None


def _read_range(stream: BinaryIO, length: int) -> Iterator[bytes]:
    while length > 0:
        block = stream.read(min(length, BLOCK))
        if not block:
            return

        length -= len(block)
        yield block


def _inflate(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """Decompress a run of gzip members."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    for block in blocks:
        data = block
        while data:
            yield inflater.decompress(data)
            data = inflater.unused_data if inflater.eof else b""
            if inflater.eof:
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
