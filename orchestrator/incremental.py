"""Incremental runs (``--since-last``): each run starts where the last complete export
of the same request ended, recorded in a small state file."""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import reprlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from orchestrator import sfmc
from orchestrator.config import ExportRequest, build_settings
from orchestrator.credentials import Credentials
from orchestrator.errors import ManifestError, UsageError
from orchestrator.estimates import history_lag
from orchestrator.export import awaits_refresh, request_identity, retention_cutoff
from orchestrator.job import ExportResult
from orchestrator.manifest import ExportPaths, Manifest
from orchestrator.merger import remove_parts_folder
from orchestrator.parts import PRIVATE, PRIVATE_DIR, make_folders
from orchestrator.reporting import write_atomically
from orchestrator.timeparse import iso, parse_time

logger = logging.getLogger(__name__)

STATE_NAME = "journey-export.state.json"


def request_key(request: ExportRequest, window: dt.timedelta) -> str:
    """A digest naming the request: format, columns, filters and window span (as
    the run resolves them, from flags or the config file)."""
    identity = {**request.identity(), "window_seconds": window.total_seconds()}
    canonical = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def state_path(given: str | None, output_template: str) -> Path:
    """The state file: as given, else beside the outputs."""
    if given:
        return Path(given)

    folder = Path(output_template).parent
    if "{" in str(folder):
        raise UsageError(
            "--since-last with a templated output folder needs --state-file PATH"
        )

    return folder / STATE_NAME


def read_state(path: Path) -> dict[str, Any]:
    """The recorded ends by request key; an absent file is an empty state."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as error:
        raise UsageError(
            f"state file {path} cannot be read ({error}); fix or remove it and give "
            "--start for the next run"
        ) from None

    if not isinstance(state, dict):
        raise UsageError(f"state file {path} is not a JSON object; remove it")

    return state


def last_end(state: Mapping[str, Any], key: str, *, path: Path) -> dt.datetime | None:
    """The end recorded for ``key`` in UTC; one that is not a time raises UsageError."""
    entry = state.get(key)
    if not isinstance(entry, dict) or "end" not in entry:
        return None

    end = _aware_utc(entry["end"])
    if end is None:
        raise UsageError(
            f"state file {path}: the end recorded for request {key} "
            f"({reprlib.repr(entry['end'])}) is not a usable time; write it as ISO "
            "8601 with an offset (2026-11-03T05:00:00Z), or remove the file and give "
            "--start for the next run"
        )

    return end


def _aware_utc(value: Any) -> dt.datetime | None:
    """``value`` as a UTC time if it is ISO 8601 text with an offset, else None."""
    try:
        moment = dt.datetime.fromisoformat(value)
        return moment.astimezone(dt.UTC) if moment.tzinfo else None
    except (TypeError, ValueError, OverflowError):
        return None


@contextmanager
def _updating(path: Path) -> Iterator[dict[str, Any]]:
    """The state, to change in place; written back on leaving. A lock file beside it
    is held meanwhile, so that runs of other requests sharing the file (each with
    its own key) never write over each other's records."""
    make_folders(path.parent, mode=PRIVATE_DIR)
    lock = path.with_name(f".{path.name}.lock")
    descriptor = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, PRIVATE)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        state = read_state(path)
        yield state
        _write_state(path, state)
    finally:
        os.close(descriptor)  # and with it the lock


def record_end(path: Path, key: str, *, end: str, output: str) -> None:
    """Record that the export of ``key`` is complete up to ``end``."""
    with _updating(path) as state:
        state[key] = {
            "end": end,
            "output": output,
            "recorded": iso(dt.datetime.now(dt.UTC)),
        }

    shown = iso(dt.datetime.fromisoformat(end))
    logger.info("recorded %s as the start of the next --since-last run", shown)


def record_first_start(path: Path, key: str, *, start: str, given: Any) -> None:
    """Record where the first export of ``key`` begins (``given`` is the --start
    that put it there), until it completes."""
    try:
        with _updating(path) as state:
            state[key] = {
                "first_start": start,
                "given_start": str(given),
                "recorded": iso(dt.datetime.now(dt.UTC)),
            }
    except OSError as error:
        raise UsageError(
            f"cannot write the state file {path} ({error.strerror or error}): make "
            "its folder writable or give --state-file, then rerun"
        ) from None


def _first_run_start(
    state: Mapping[str, Any], key: str, *, given: Any, path: Path
) -> str | None:
    """The start an unfinished first run recorded with the same --start, if any; a
    damaged record raises UsageError."""
    entry = state.get(key)
    if not isinstance(entry, dict) or "end" in entry:
        return None

    start = _aware_utc(entry.get("first_start"))
    if start is None or not isinstance(entry.get("given_start"), str):
        raise UsageError(
            f"state file {path}: the first start recorded for request {key} "
            f"({reprlib.repr(entry.get('first_start'))}, given as "
            f"{reprlib.repr(entry.get('given_start'))}) is not usable; remove that "
            "entry (or the file) and rerun with --start"
        )

    return iso(start) if entry["given_start"] == str(given) else None


def restore_entry(path: Path, key: str, entry: Any) -> None:
    """Put back what the state held for ``key`` before this run (None: nothing)."""
    with _updating(path) as state:
        if entry is None:
            state.pop(key, None)
        else:
            state[key] = entry


def _write_state(path: Path, state: Mapping[str, Any]) -> None:
    write_atomically(path, json.dumps(state, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True, slots=True)
class SinceLast:
    """The range of an incremental run: ``options`` is None when nothing is new."""

    options: dict[str, Any] | None
    state: Path
    key: str
    start: str
    # What the state held for ``key`` before this run recorded a first start (to
    # put back if the run is refused before it begins); None when nothing was.
    replaced: Any = None
    recorded_first: bool = False
    # The history lag that set the end: the run takes it as it is.
    lag: float | None = None


def plan_since_last(
    options: dict[str, Any],
    config: Mapping[str, Any],
    credentials: Credentials,
    *,
    now: dt.datetime,
) -> SinceLast:
    """Resolve start (the recorded end, else --start) and end (now minus the lag).

    An export that completed without its end being recorded (a stop between the two)
    is found by its output name and recorded now, so the run goes on after it.
    """
    first = given = _first_start(options, config)
    probe = build_settings({**options, "start": "-1h", "end": "now"}, config, now=now)
    key = request_key(probe.request, probe.window)
    path = state_file_of(options, config)
    state = read_state(path)
    start = last_end(state, key, path=path)
    if start is None:
        # An unfinished first run recorded where its --start put it: the same
        # command goes on with that export, even with a relative --start ("-30d").
        first = _first_run_start(state, key, given=given, path=path) or given

    if start is None and first is None:
        raise UsageError(
            f"--since-last: no complete export of this request is recorded in {path}; "
            "give --start (or export.start) for the first run"
        )

    if start is not None and not probe.retained_only:
        _refuse_a_chain_past_retention(start, path, now)

    lag = anyio.run(history_lag, credentials, probe)
    end = (now - dt.timedelta(seconds=lag)).replace(second=0, microsecond=0)
    begin = iso(start) if start else str(first)
    begin = _skip_unrecorded(
        options, config, state=path, key=key, begin=begin, end=end, now=now
    )
    chosen = {**options, "start": begin, "end": iso(end)}
    if parse_time(begin, now=now, name="start") >= end:
        return SinceLast(None, path, key, begin)

    if start is None:
        chosen["start"] = iso(build_settings(chosen, config, now=now).start)
        record_first_start(path, key, start=chosen["start"], given=given)
        replaced = state.get(key)
        return SinceLast(chosen, path, key, chosen["start"], replaced, True, lag)

    return SinceLast(chosen, path, key, chosen["start"], lag=lag)


def _refuse_a_chain_past_retention(
    start: dt.datetime, state: Path, now: dt.datetime
) -> None:
    cutoff = retention_cutoff(now)
    if start < cutoff:
        raise UsageError(
            f"--since-last: the last export recorded in {state} ended at {iso(start)}, "
            f"past SFMC's {sfmc.RETENTION_DAYS}-day retention: what came before "
            f"{iso(cutoff)} is gone; add --retained-only to go on from there"
        )


def _first_start(options: Mapping[str, Any], config: Mapping[str, Any]) -> Any:
    """The start of the first run (--start, else export.start), or None; a fixed end
    (--end, --last, or the same keys of the config file) is refused."""
    if options.get("last") or options.get("end"):
        raise UsageError("--since-last sets the range itself: drop --last and --end")

    export = config.get("export", {})
    for key in ("end", "last"):
        if key in export:
            source = getattr(config, "source", None) or "file"
            raise UsageError(
                f"config {source}: export.{key}: --since-last sets the range itself; "
                "remove the key, or give --since-last runs a config of their own"
            )

    return options.get("start") or export.get("start")


def _skip_unrecorded(
    options: dict[str, Any],
    config: Mapping[str, Any],
    *,
    state: Path,
    key: str,
    begin: str,
    end: dt.datetime,
    now: dt.datetime,
) -> str:
    for _ in range(1000):
        if parse_time(begin, now=now, name="start") >= end:
            return begin

        settings = build_settings(
            {**options, "start": begin, "end": iso(end)}, config, now=now
        )
        finished = _complete_export(ExportPaths(settings.output), settings, now)
        if finished is None:
            return begin

        logger.warning(
            "%s completed without its end being recorded; recording it", settings.output
        )
        record_end(state, key, end=finished, output=str(settings.output))
        if not settings.keep_parts:  # left when the stop came before its removal
            remove_parts_folder(ExportPaths(settings.output))

        begin = finished

    return begin


def _complete_export(paths: ExportPaths, settings: Any, now: dt.datetime) -> str | None:
    """The end of the complete export of this request and start in ``paths``; None
    while it has provisional windows to refresh (the chain waits for them)."""
    if not paths.manifest.exists():
        return None

    try:
        manifest = Manifest.load(paths.manifest)
    except ManifestError:
        return None

    identity = request_identity(settings)
    same = all(
        manifest.request.get(name) == value
        for name, value in identity.items()
        if name != "end"
    )
    settled = manifest.complete and not awaits_refresh(manifest, now)
    return str(manifest.request["end"]) if settled and same else None


def state_file_of(options: Mapping[str, Any], config: Mapping[str, Any]) -> Path:
    """The state file a --since-last run with these options and config uses."""
    export = config.get("export", {})
    template = str(options.get("output") or export.get("output") or "")
    given = options.get("state_file") or export.get("state_file")
    return state_path(
        os.path.expanduser(given) if given else None, os.path.expanduser(template)
    )


def nothing_new(since: str) -> ExportResult:
    """The result of an incremental run that found nothing to export; its times
    written as every report writes them (ISO 8601, +00:00)."""
    moment = dt.datetime.fromisoformat(since).astimezone(dt.UTC).isoformat()
    return ExportResult(
        output="",
        start=moment,
        end=moment,
        windows=0,
        exported=0,
        rows=0,
        bytes=0,
        seconds=0.0,
        complete=True,
    )
