"""The manifest: the request of an export and the state of each of its windows.

It lives beside the output as ``<output>.manifest.json`` and is replaced atomically
(written under a temporary name, flushed to disk, renamed). A checksum over its
content tells a damaged manifest from a good one.

A window's state moves ``pending`` -> ``done`` (its part is on disk) -> ``merged``
(its rows are in the output being assembled, flushed to disk, and its part deleted
unless ``--keep-parts``). ``failed`` is a
window whose last attempt failed; a rerun requests it again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import ManifestError, StateWriteError
from orchestrator.parts import fsync_directory, open_private
from orchestrator.planner import Window

logger = logging.getLogger(__name__)

VERSION = 1
PENDING = "pending"
DONE = "done"
MERGED = "merged"
FAILED = "failed"
STATES = (PENDING, DONE, MERGED, FAILED)
# The manifest's notes (in ``extra``): windows put back to pending whose rows the
# published output still holds (a --redo, or the refresh of provisional windows);
# the partial output about to be named as the output.
REOPENED = "reopened"
PUBLISHING = "publishing"


# A part, a download cut short (.tmp) and a boundary pass cut short (.kept).
PART_NAME = re.compile(r"\d{8}T\d{6}Z_\d{8}T\d{6}Z\.(part|tmp)(\.kept)?")


@dataclass(frozen=True, slots=True)
class ExportPaths:
    """The files of one export, all beside the output."""

    output: Path

    @property
    def manifest(self) -> Path:
        return self._beside(".manifest.json")

    @property
    def parts(self) -> Path:
        return self._beside(".parts")

    @property
    def partial(self) -> Path:
        return self._beside(".partial")

    @property
    def lock(self) -> Path:
        return self._beside(".lock")

    def part(self, window: Window) -> Path:
        name = f"{window.start:%Y%m%dT%H%M%S}Z_{window.end:%Y%m%dT%H%M%S}Z.part"
        return self.parts / name

    def part_files(self) -> tuple[list[Path], list[Path]]:
        """What the parts folder holds: the files named as this tool names its parts
        (and their temporary forms), and anything else."""
        if not self.parts.is_dir():
            return [], []

        own: list[Path] = []
        other: list[Path] = []
        for entry in sorted(self.parts.iterdir()):
            named = PART_NAME.fullmatch(entry.name) is not None
            mine = named and entry.is_file() and not entry.is_symlink()
            (own if mine else other).append(entry)

        return own, other

    def delete_part_files(self) -> None:
        """Delete the files of the parts folder named as parts (nothing else)."""
        own, _ = self.part_files()
        for part in own:
            part.unlink(missing_ok=True)

    def _beside(self, suffix: str) -> Path:
        return self.output.with_name(self.output.name + suffix)


@dataclass(slots=True)
class WindowRecord:
    """What is known of one window; ``error`` is the last attempt's failure."""

    window: Window
    state: str = PENDING
    attempts: int = 0
    rows: int = 0
    bytes: int = 0
    sha256: str | None = None
    newline: str | None = None
    seconds: float = 0.0
    error: str | None = None
    provisional: bool = False
    offset: int | None = None
    estimated_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "start": self.window.start.isoformat(),
            "end": self.window.end.isoformat(),
            "state": self.state,
            "attempts": self.attempts,
            "rows": self.rows,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "newline": self.newline,
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "provisional": self.provisional,
            "offset": self.offset,
            "estimated_bytes": self.estimated_bytes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WindowRecord:
        window = Window(
            dt.datetime.fromisoformat(data["start"]),
            dt.datetime.fromisoformat(data["end"]),
        )
        if data["state"] not in STATES:
            raise ValueError(f"unknown state {data['state']!r}")

        return cls(
            window=window,
            state=data["state"],
            attempts=_count(data["attempts"]),
            rows=_count(data["rows"]),
            bytes=_count(data["bytes"]),
            sha256=data["sha256"],
            newline=data["newline"],
            seconds=float(data["seconds"]),
            error=data["error"],
            provisional=bool(data["provisional"]),
            offset=None if data["offset"] is None else _count(data["offset"]),
            estimated_bytes=data["estimated_bytes"],
        )


_WINDOW_KEYS = WindowRecord(Window(dt.datetime.min, dt.datetime.max)).to_json().keys()


@dataclass(slots=True)
class Manifest:
    """The request and windows of one export; ``merged_bytes`` is the assembled size."""

    path: Path
    request: dict[str, Any]
    windows: list[WindowRecord]
    merged_bytes: int = 0
    newline: str | None = None
    complete: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    saved_at: float = field(default=0.0, repr=False, compare=False)
    unsaved: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        """Read a manifest; a damaged one raises ManifestError saying how to recover."""
        if path.exists() and not path.is_file():  # a pipe would block the read
            raise ManifestError(
                f"manifest {path} is not a regular file: move it away, then rerun"
            )

        try:
            content = _checked_content(path)
            if content["version"] != VERSION:
                raise ValueError(f"version {content['version']} is not {VERSION}")

            return cls._from_content(path, content)
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
            raise ManifestError(
                f"manifest {path} is damaged ({error}); rerun with --restart to start "
                "this export over (parts already downloaded are requested again)"
            ) from None

    @classmethod
    def _from_content(cls, path: Path, content: dict[str, Any]) -> Manifest:
        manifest = cls(
            path=path,
            request=content["request"],
            windows=[_as_record(item) for item in content["windows"]],
            merged_bytes=_count(content["merged_bytes"]),
            newline=content["newline"],
            complete=bool(content["complete"]),
            extra=dict(content.get("extra", {})),
        )
        _check_tiling(manifest)
        return manifest

    def checkpoint(self, *, every: float = 1.0) -> None:
        """Save now if the last save is ``every`` seconds old, else at the next one.

        Saving rewrites the whole manifest, so saving after every window would cost
        time growing with the square of the windows. A state saved late is safe: a
        window whose end was not recorded is checked on the next run, and requested
        again if its part is gone.
        """
        if time.monotonic() - self.saved_at >= every:
            self.save()
        else:
            self.unsaved = True

    def flush(self) -> None:
        """Save what a checkpoint left unsaved."""
        if self.unsaved:
            self.save()

    def save(self) -> None:
        """Replace the manifest on disk atomically and durably.

        The content is written as its checksum reads it (canonical JSON), a few
        hundred windows at a time: an export of tens of thousands of windows never
        holds its whole manifest in memory as text.
        """
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            with open_private(temporary) as stream:
                digest = hashlib.sha256()
                stream.write(b'{"manifest":')
                for piece in self._canonical_pieces():
                    encoded = piece.encode()
                    digest.update(encoded)
                    stream.write(encoded)

                stream.write(f',"sha256":"{digest.hexdigest()}"}}'.encode())
                stream.flush()
                os.fsync(stream.fileno())

            os.replace(temporary, self.path)
            fsync_directory(self.path.parent)
            self.saved_at, self.unsaved = time.monotonic(), False
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise StateWriteError(
                f"cannot write the manifest {self.path}: {error.strerror or error}; "
                "the last good state is kept: free space (or fix the folder) and rerun"
            ) from None

    def _canonical_pieces(self, batch: int = 500) -> Iterator[str]:
        """The content as :func:`_digest` writes it, in pieces ("windows" sorts
        last among its keys)."""
        rest = {
            "version": VERSION,
            "request": self.request,
            "merged_bytes": self.merged_bytes,
            "newline": self.newline,
            "complete": self.complete,
            "extra": self.extra,
        }
        head = _canonical(rest)
        yield head[:-1] + ',"windows":['
        for first in range(0, len(self.windows), batch):
            records = self.windows[first : first + batch]
            listed = _canonical([record.to_json() for record in records])
            yield listed[1:-1] if first == 0 else "," + listed[1:-1]

        yield "]}"

    def find(self, window: Window) -> WindowRecord:
        for record in self.windows:
            if record.window == window:
                return record

        raise KeyError(window.key)

    def split(self, record: WindowRecord) -> tuple[WindowRecord, WindowRecord]:
        """Replace a window by its two halves, both pending, the later half first.

        SFMC sends a window's rows newest first, so merging the later half first
        gives the output the unsplit window would have given.
        """
        first, second = (WindowRecord(half) for half in record.window.halves())
        index = self.windows.index(record)
        self.windows[index : index + 1] = [second, first]
        return first, second

    def counts(self) -> Counter[str]:
        return Counter(record.state for record in self.windows)

    def totals(self) -> tuple[int, int]:
        """Rows and bytes of the windows done or merged."""
        finished = [r for r in self.windows if r.state in (DONE, MERGED)]
        return sum(r.rows for r in finished), sum(r.bytes for r in finished)


def _count(value: Any) -> int:
    """A whole number of at least 0 as the manifest records it; else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a count")

    return value


def _check_tiling(manifest: Manifest) -> None:
    """Raise ValueError unless the windows, with those dropped as past retention
    (``--retained-only``), cover the request's range once each, with no gap and no
    overlap."""
    if not isinstance(manifest.request, dict):
        raise ValueError("its request is not an object")

    start = dt.datetime.fromisoformat(str(manifest.request["start"]))
    end = dt.datetime.fromisoformat(str(manifest.request["end"]))
    if not manifest.windows:
        raise ValueError("it has no windows")

    dropped = [Window.from_key(key) for key in manifest.extra.get("expired", [])]
    spans = sorted([r.window for r in manifest.windows] + dropped)
    joined = all(left.end == right.start for left, right in itertools.pairwise(spans))
    if not (spans[0].start == start and joined and spans[-1].end == end):
        raise ValueError("its windows do not cover its range once each")


def _checked_content(path: Path) -> dict[str, Any]:
    """The manifest's content, once its checksum matches.

    A manifest as :meth:`Manifest.save` writes it holds its content as canonical
    JSON, so its bytes are hashed as they lie, and its windows become records as
    they are parsed: tens of thousands of windows are never held as dicts too.
    Others (written by earlier versions) are parsed whole, then hashed as canonical
    JSON.
    """
    raw = path.read_bytes()
    if _framed_digest_matches(raw):
        text = raw.decode()
        del raw  # one copy at a time
        document = json.loads(text, object_hook=_record_or_dict)
        content: dict[str, Any] = document["manifest"]
        for key in ("request", "extra"):  # records belong in "windows" only
            if key in content:
                content[key] = _as_plain(content[key])

        return content

    document = json.loads(raw)
    content = document["manifest"]
    if document["sha256"] != _digest(content):
        raise ValueError("checksum does not match its content")

    return content


_FRAME_HEAD = b'{"manifest":'
_FRAME_TAIL = re.compile(rb',"sha256":"([0-9a-f]{64})"}\Z')


def _framed_digest_matches(raw: bytes) -> bool:
    tail = _FRAME_TAIL.search(raw, max(0, len(raw) - 100))
    if tail is None or not raw.startswith(_FRAME_HEAD):
        return False

    content = memoryview(raw)[len(_FRAME_HEAD) : tail.start()]
    return hashlib.sha256(content).hexdigest() == tail.group(1).decode()


def _record_or_dict(item: dict[str, Any]) -> Any:
    return WindowRecord.from_json(item) if item.keys() == _WINDOW_KEYS else item


def _as_plain(value: Any) -> Any:
    """``value`` with any record the parse made in it turned back into JSON."""
    if isinstance(value, WindowRecord):
        return value.to_json()

    if isinstance(value, dict):
        return {key: _as_plain(item) for key, item in value.items()}

    if isinstance(value, list):
        return [_as_plain(item) for item in value]

    return value


def _as_record(item: Any) -> WindowRecord:
    return item if isinstance(item, WindowRecord) else WindowRecord.from_json(item)


def _digest(content: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(content).encode()).hexdigest()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
