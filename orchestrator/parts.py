"""Part files: one window's rows on disk, written as the body streams in.

A part holds only data rows: no byte-order mark, no header, and it always ends with a
newline. It is written under a temporary name and renamed only when the body was
complete, so a file named ``*.part`` is whole unless the machine itself went down
before the kernel wrote it out. Parts are not flushed to disk one by one: the manifest
keeps each part's size and SHA-256, and a part that no longer matches them is requested
again (``verify_part``).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import errno
import hashlib
import io
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import CutShortError, PermanentError

BOM = b"\xef\xbb\xbf"
MAX_HEADER_BYTES = 64 * 1024
STORE_BYTES = 1024 * 1024  # handed to a worker thread at a time
PRIVATE = 0o600
PRIVATE_DIR = 0o700
NOT_MARKS = bytes(set(range(256)) - set(b'"\n'))


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """A file's device, inode, size and times: a file replaced, or written to by
    another program, shows a different identity. Not a checksum: a rewrite in place
    of the same size within one tick of the filesystem's clock can go unseen, and so
    do bytes the disk itself changes."""

    device: int
    inode: int
    size: int
    modified_ns: int
    changed_ns: int

    @classmethod
    def of(cls, status: os.stat_result) -> FileIdentity:
        return cls(
            status.st_dev,
            status.st_ino,
            status.st_size,
            status.st_mtime_ns,
            status.st_ctime_ns,
        )

    def same_contents(self, other: FileIdentity) -> bool:
        """Whether ``other`` is this file, unwritten since (a rename changes only
        the change time)."""
        return dataclasses.replace(other, changed_ns=self.changed_ns) == self


@dataclass(frozen=True, slots=True)
class PartInfo:
    """What a finished part holds; ``newline`` is None when the body had no header.
    ``written`` is the identity of the file the rows and checksum were written to;
    ``unended``: the body lacked its final newline (a newline was added)."""

    rows: int
    bytes: int
    sha256: str
    newline: str | None
    written: FileIdentity | None = None
    unended: bool = False


_OPEN_DESCRIPTOR = re.compile(r"/dev/(stdin$|fd/)|/proc/(self|[0-9]+)/fd/")


def read_input_file(path: Path, *, limit: int) -> bytes:
    """The bytes of ``path``, a regular file or a pipe (``<(command)``,
    ``/dev/stdin``) of at most ``limit`` bytes; else OSError. A device
    (``/dev/zero``) never ends; a named FIFO might wait for a writer forever, or be
    read before its writer came and taken for empty."""
    if _is_named_fifo(path):
        raise OSError(errno.EINVAL, "a named FIFO, not a regular file or a pipe")

    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO: no wait here
    with os.fdopen(descriptor, "rb") as stream:
        mode = os.fstat(descriptor).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            raise OSError(errno.EINVAL, "not a regular file or a pipe")

        os.set_blocking(descriptor, True)  # a pipe's writer may still be writing
        data = stream.read(limit + 1)

    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit:,} bytes")

    return data


def _is_named_fifo(path: Path) -> bool:
    """Whether ``path`` leads to a FIFO in the filesystem; a pipe (what
    ``/dev/fd/63`` leads to) has no name there, and a descriptor already open
    (``/dev/stdin < fifo``: the shell waited for the writer) is read as it is."""
    if _OPEN_DESCRIPTOR.match(str(path)):
        return False

    try:
        return stat.S_ISFIFO(os.lstat(os.path.realpath(path)).st_mode)
    except OSError:  # pipe:[1234], or nothing at all: open() says which
        return False


def open_private(path: Path, *, keep: bool = False) -> io.BufferedWriter:
    """Open a file for writing at its start, readable by its owner only, whatever
    the umask; emptied unless ``keep``. A symbolic link there is refused (ELOOP),
    never followed to a file elsewhere."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (0 if keep else os.O_TRUNC)
    descriptor = os.open(path, flags, PRIVATE)
    os.fchmod(descriptor, PRIVATE)
    return os.fdopen(descriptor, "wb")


def make_folders(folder: Path, *, mode: int = PRIVATE_DIR) -> None:
    """Create ``folder`` and each missing folder above it, all with ``mode`` (0700
    unless said otherwise; the umask can only narrow it). ``Path.mkdir(parents=True)``
    gives the mode to the last one only."""
    missing = [folder, *folder.parents]
    for each in reversed(missing[: missing.index(nearest_existing(folder))]):
        each.mkdir(mode=mode, exist_ok=True)


def nearest_existing(path: Path) -> Path:
    """``path`` if it exists, else its nearest ancestor that does (the folder a
    missing one would be made in)."""
    return next((p for p in (path, *path.parents) if p.exists()), path)


def fsync_directory(path: Path) -> None:
    """Make a rename or unlink inside ``path`` durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class RowCounter:
    """Count rows in a CSV or TSV stream: newlines outside double quotes."""

    def __init__(self) -> None:
        self.rows = 0
        self.in_quotes = False

    def feed(self, data: bytes) -> None:
        # Only quotes and newlines decide where rows end: keep those alone (one pass
        # in C), then drop adjacent quote pairs, which move no newline in or out of
        # quotes. What is left is short: newlines, and quotes around quoted ones.
        marks = data.translate(None, NOT_MARKS)
        if b'"' in marks:
            marks = marks.replace(b'""', b"")

        pieces = marks.split(b'"')
        outside = pieces[1::2] if self.in_quotes else pieces[0::2]
        self.rows += sum(map(len, outside))
        if len(pieces) % 2 == 0:
            self.in_quotes = not self.in_quotes


class PartWriter:
    """Stream one window's decoded body into a part file.

    ``columns`` is the header the body must start with, or None for a body of rows
    only (then ``newline`` says how its rows end). ``boundary`` is a byte string
    (the window end's ``TransactionTime`` to the second) whose presence means rows
    at or after the end may have come back; the caller then runs
    :func:`keep_window_rows` on the finished part.
    """

    def __init__(
        self,
        path: Path,
        *,
        columns: Sequence[str] | None,
        delimiter: str,
        boundary: bytes | None = None,
        newline: str | None = None,
    ) -> None:
        self.path = path
        self.boundary_seen = False
        self._columns = list(columns or ())
        self._delimiter = delimiter
        self._boundary = boundary
        self._file = open_private(path)
        self._digest = hashlib.sha256()
        self._counter = RowCounter()
        self._head: bytearray | None = None if columns is None else bytearray()
        self._newline = newline
        self._size = 0
        self._tail = b""
        self._last = b"\n"
        self._kept: list[bytes] = []
        self._kept_bytes = 0

    def write(self, data: bytes) -> None:
        """Take the next decoded bytes of the body and store them at once."""
        self.take(data)
        self.store()

    def take(self, data: bytes) -> bool:
        """Check and count the next decoded bytes, and keep them for :meth:`store`;
        return whether :meth:`store` is due (``STORE_BYTES`` kept).

        Holds the GIL throughout, so it runs where the body is read. :meth:`store`
        may then run in a worker thread, as long as nothing else uses this writer.
        """
        if self._head is not None:
            data = self._take_header(data)

        if data:
            self._watch_boundary(data)
            self._counter.feed(data)
            self._size += len(data)
            self._last = data[-1:]
            self._kept.append(data)
            self._kept_bytes += len(data)

        return self._kept_bytes >= STORE_BYTES

    def store(self) -> None:
        """Write the bytes kept so far and add them to the checksum (both free the
        GIL)."""
        kept, self._kept, self._kept_bytes = self._kept, [], 0
        for block in kept:
            self._file.write(block)
            self._digest.update(block)

    def finish(self) -> PartInfo:
        """Store what is kept and close the part; raise if the body ended where it
        cannot end."""
        self.store()
        if self._head:  # a header with no newline: one cut after its CR says CRLF
            self._check_header(bytes(self._head).rstrip(b"\r\n"))
            self._newline = "\r\n" if self._head.endswith(b"\r") else "\n"

        self._head = None
        if self._counter.in_quotes:
            raise CutShortError(
                "the body ends inside a quoted field: the server cut it short, as "
                "at a size limit"
            )

        unended = bool(self._size) and self._last != b"\n"
        if unended:
            self._check_last_row()
            ending = (self._newline or "\n").encode()
            self.write(b"\n" if self._last == b"\r" else ending)  # cut inside CRLF

        self._file.flush()
        written = FileIdentity.of(os.fstat(self._file.fileno()))
        self._file.close()
        return PartInfo(
            rows=self._counter.rows,
            bytes=self._size,
            sha256=self._digest.hexdigest(),
            newline=self._newline,
            written=written,
            unended=unended,
        )

    def discard(self) -> None:
        """Close and delete the unfinished part."""
        self._file.close()
        self.path.unlink(missing_ok=True)

    def _check_last_row(self) -> None:
        """Refuse a body whose unfinished last row lacks fields: a server that cuts
        the stream at a size limit, framing complete, leaves one."""
        if not self._columns:
            return

        self._file.flush()
        row = last_row(self.path)
        text = row.decode("utf-8", errors="replace").rstrip("\r")
        fields = next(csv.reader([text], delimiter=self._delimiter), [])
        if len(fields) < len(self._columns):
            raise CutShortError(
                f"the body ends inside its last row ({len(fields)} of "
                f"{len(self._columns)} fields): the server cut it short, as at a "
                "size limit"
            )

        # A cut inside the last field looks the same as a body without a final
        # newline: the caller says so (PartInfo.unended), naming the window.

    def _take_header(self, data: bytes) -> bytes:
        assert self._head is not None
        self._head += data
        end = self._head.find(b"\n")
        if end < 0:
            if len(self._head) > MAX_HEADER_BYTES:
                raise PermanentError("the body has no header line in its first 64 KiB")

            return b""

        line = bytes(self._head[: end + 1])
        rest = bytes(self._head[end + 1 :])
        self._head = None
        self._newline = "\r\n" if line.endswith(b"\r\n") else "\n"
        self._check_header(line.rstrip(b"\r\n"))
        return rest

    def _check_header(self, line: bytes) -> None:
        line = line.removeprefix(BOM)
        text = line.decode("utf-8", errors="replace")
        names = next(csv.reader([text], delimiter=self._delimiter), [])
        if names != self._columns:
            shown = ", ".join(names[:30]) or "(empty)"
            raise PermanentError(
                f"the server answered columns [{shown}], not the requested "
                f"[{', '.join(self._columns)}]"
            )

    def _watch_boundary(self, data: bytes) -> None:
        if self._boundary is None or self.boundary_seen:
            return

        keep = len(self._boundary) - 1
        seam = self._tail + data[:keep]  # a stamp across pieces, however small
        self.boundary_seen = self._boundary in seam or self._boundary in data
        self._tail = (self._tail + data)[-keep:] if len(data) < keep else data[-keep:]


def last_row(path: Path, *, most: int = 1024 * 1024) -> bytes:
    """The file's last row (not ended by a newline), quoted line breaks included;
    only its last ``most`` bytes if it is longer."""
    with path.open("rb") as stream:
        size = stream.seek(0, os.SEEK_END)
        stream.seek(max(0, size - most))
        tail = stream.read()

    end, quotes = len(tail), 0
    while True:  # back over newlines until the quotes after one are balanced
        start = tail.rfind(b"\n", 0, end)
        quotes += tail.count(b'"', start + 1, end)
        if start < 0 or quotes % 2 == 0:
            return tail[start + 1 :]

        end = start


def iter_rows(path: Path) -> Iterator[bytes]:
    """Yield each row of a part with its newline, quoted line breaks kept inside."""
    counter = RowCounter()
    pending = b""
    with path.open("rb") as stream:
        for line in stream:
            pending += line
            counter.feed(line)
            if not counter.in_quotes:
                yield pending
                pending = b""

    if pending:
        yield pending


def keep_window_rows(
    path: Path,
    *,
    start: dt.datetime,
    end: dt.datetime,
    time_index: int,
    delimiter: str,
    newline: str | None,
) -> PartInfo:
    """Rewrite a part keeping only rows whose time is in ``[start, end)``.

    Servers that treat a request's end as inclusive send the rows stamped exactly at
    the end in two windows; this keeps each row in the window that owns it.
    """
    kept_path = path.with_name(path.name + ".kept")
    writer = PartWriter(kept_path, columns=None, delimiter=delimiter, newline=newline)
    try:
        for row in iter_rows(path):
            if start <= _row_time(row, time_index, delimiter) < end:
                writer.write(row)

        info = writer.finish()
    except BaseException:
        writer.discard()
        raise

    os.replace(kept_path, path)
    return info


def _row_time(row: bytes, index: int, delimiter: str) -> dt.datetime:
    text = row.decode("utf-8", errors="replace")
    fields = next(csv.reader([text], delimiter=delimiter), [])
    try:
        moment = dt.datetime.fromisoformat(fields[index])
    except (IndexError, ValueError):
        raise PermanentError(
            f"a row's TransactionTime cannot be read: {fields[index : index + 1]!r}"
        ) from None

    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)

    return moment


def verify_part(path: Path, *, size: int, sha256: str) -> FileIdentity | None:
    """The identity of the part on disk if it still has the recorded size and
    checksum, and did not change while it was read; else None."""
    try:
        with path.open("rb") as stream:
            before = FileIdentity.of(os.fstat(stream.fileno()))
            if before.size != size:
                return None

            digest = hashlib.sha256()
            while block := stream.read(1 << 20):
                digest.update(block)

            after = FileIdentity.of(os.fstat(stream.fileno()))
    except OSError:
        return None

    unchanged = after == before and digest.hexdigest() == sha256
    return after if unchanged else None
