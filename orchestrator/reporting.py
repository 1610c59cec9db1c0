"""What a run tells its watchers: a live progress line, JSON logs, a report file and
a Prometheus textfile-collector file."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from orchestrator.parts import PRIVATE_DIR, make_folders
from orchestrator.pool import PoolStats

# Attributes every LogRecord has; anything else was passed with ``extra=``.
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


@dataclass(slots=True)
class Progress:
    """Live counters of one run, read by the progress display."""

    windows: int = 0
    finished: int = 0
    failed: int = 0
    rows: int = 0
    bytes: int = 0
    finished_this_run: int = 0
    started: float = field(default_factory=time.monotonic)
    stats: PoolStats = field(default_factory=PoolStats)


def progress_line(progress: Progress, *, concurrency: int) -> str:
    """One line: windows, rows, bytes, throughput, time left, retries, throttling,
    and the downloads allowed at once now (``concurrency`` until a download ends)."""
    concurrency = progress.stats.concurrency or concurrency
    elapsed = max(time.monotonic() - progress.started, 1e-6)
    rate = progress.bytes / elapsed / 1e6
    left = progress.windows - progress.finished - progress.failed
    eta = "?"
    if progress.finished_this_run:
        eta = f"{left * elapsed / progress.finished_this_run:.0f} s"

    return (
        f"windows {progress.finished}/{progress.windows}"
        + (f" ({progress.failed} failed)" if progress.failed else "")
        + f" | {progress.rows:,} rows | {progress.bytes / 1e6:,.1f} MB"
        + f" | {rate:.1f} MB/s | left ~{eta} | retries {progress.stats.retries}"
        + f" | throttled {progress.stats.throttled} | concurrency {concurrency}"
    )


class ProgressDisplay:
    """Redraw the progress line in place on a terminal."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.shown = False

    def draw(self, line: str) -> None:
        self.stream.write("\r\033[K" + line)
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


class ClearingHandler(logging.StreamHandler[TextIO]):
    """A stream handler that wipes the progress line before each log line."""

    def __init__(self, display: ProgressDisplay) -> None:
        super().__init__(display.stream)
        self.display = display

    def emit(self, record: logging.LogRecord) -> None:
        self.display.clear()
        super().emit(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line with stable keys: time, level, logger, message,
    and the fields passed with ``extra=`` (window, rows, bytes, seconds ...)."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                event[key] = value

        if record.exc_info:
            event["error"] = repr(record.exc_info[1])

        return json.dumps(event, default=str)


def write_atomically(path: Path, text: str, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``text`` (owner-only unless ``mode`` says otherwise),
    never leaving half a file. Missing folders are made 0700, or 0755 for a file
    others may read; never writable by others, whatever the umask."""
    make_folders(path.parent, mode=0o755 if mode & 0o044 else PRIVATE_DIR)
    # A new name each time: runs writing the same file at once (--since-last chains
    # sharing a state file) must not rename each other's half-written text.
    descriptor, name = tempfile.mkstemp(
        prefix=f".{path.name[:100]}.", suffix=".tmp", dir=path.parent
    )
    temporary = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(text.encode())
            os.fchmod(stream.fileno(), mode)
            stream.flush()
            os.fsync(stream.fileno())

        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_report(path: Path, report: Mapping[str, Any]) -> None:
    """Write the run report as JSON."""
    write_atomically(path, json.dumps(report, indent=2, default=str) + "\n")


def _label_value(text: str) -> str:
    """``text`` as a quoted label value of the text format: UTF-8 as it is, with
    only a backslash, a double quote and a line feed escaped (the format knows no
    other escape: a strict reader would drop the whole file)."""
    text = text.encode(errors="surrogateescape").decode(errors="replace")  # UTF-8
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def prometheus_text(report: Mapping[str, Any]) -> str:
    """The report as Prometheus text exposition for the textfile collector."""
    label = _label_value(str(report["output"]))
    gauges = {
        "last_run_timestamp_seconds": time.time(),
        "last_run_success": 1 if report["exit_code"] == 0 else 0,
        "last_run_exit_code": report["exit_code"],
        "last_run_seconds": report["seconds"],
        "last_run_rows": report["rows"],
        "last_run_bytes": report["bytes"],
        "last_run_windows": report["windows"],
        "last_run_failed_windows": len(report["failed"]),
        "last_run_retries": report["retries"],
        "last_run_throttled": report["throttled"],
    }
    lines: list[str] = []
    for name, value in gauges.items():
        lines.append(f"# TYPE journey_export_{name} gauge")
        lines.append(f"journey_export_{name}{{output={label}}} {value}")

    return "\n".join(lines) + "\n"


def report_of(result: Any, *, exit_code: int) -> dict[str, Any]:
    """The JSON-ready summary of an ExportResult."""
    report = asdict(result)
    report["exit_code"] = exit_code
    report["failed"] = [
        {"window": key, "error": error} for key, error in result.failed.items()
    ]
    report["finished_at"] = dt.datetime.now(dt.UTC).isoformat()
    return report
