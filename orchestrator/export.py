"""The export: plan the windows, resume from the manifest, download, assemble.

Read top to bottom, :func:`run_export` is the whole job in a few named steps.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import resource
import time
from pathlib import Path

from orchestrator import sfmc
from orchestrator.config import RunSettings
from orchestrator.credentials import Credentials
from orchestrator.errors import JourneyExportError, ManifestError, UsageError
from orchestrator.estimates import estimate_windows, history_lag
from orchestrator.job import ExportJob, ExportResult, Hooks
from orchestrator.lock import OutputLock
from orchestrator.manifest import (
    DONE,
    FAILED,
    MERGED,
    PENDING,
    REOPENED,
    ExportPaths,
    Manifest,
    WindowRecord,
)
from orchestrator.merger import Assembler, remove_parts_folder
from orchestrator.parts import make_folders, nearest_existing
from orchestrator.planner import Window, plan_windows
from orchestrator.timeparse import iso, parse_time

logger = logging.getLogger(__name__)


async def run_export(
    settings: RunSettings, credentials: Credentials, *, hooks: Hooks | None = None
) -> ExportResult:
    """Export ``settings``' range into its output; safe to rerun after any stop."""
    hooks = hooks or Hooks()
    started = time.monotonic()
    _warn_without_time_column(settings)
    allow_open_files(settings.concurrency)
    paths = ExportPaths(settings.output)

    check_state_files(paths)
    with _lock_output(settings, paths):
        fresh = not paths.manifest.exists()  # a --restart keeps what it replaced
        manifest = open_manifest(settings, paths, hooks.now())
        assembler = _assembler(manifest, paths, settings)
        _reopen(assembler, settings, hooks.now())

        job = ExportJob(settings, credentials, paths, assembler, hooks)
        if not manifest.complete:
            try:
                await _download_and_assemble(job, settings, hooks)
            except JourneyExportError:
                if fresh and _nothing_requested(manifest):
                    _forget(paths)  # the rerun reads a relative range anew

                raise

        return job.result(time.monotonic() - started)


# Files a run holds open besides a socket and a part per download: the output, its
# manifest and lock, the log, the event loop's own, with room to spare.
OWN_OPEN_FILES = 32


def allow_open_files(concurrency: int) -> None:
    """Raise the process's soft limit on open files to what ``concurrency``
    downloads need; refuse, before anything is requested, when the hard limit is
    lower (every rerun would fail the same way)."""
    needed = 2 * concurrency + OWN_OPEN_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return

    if hard != resource.RLIM_INFINITY and hard < needed:
        raise UsageError(
            f"this process may open at most {hard} files (ulimit -n), and "
            f"--concurrency {concurrency} needs about {needed}: raise the limit or "
            "lower --concurrency"
        )

    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    logger.info("raised the open-files limit from %d to %d", soft, needed)


def _warn_without_time_column(settings: RunSettings) -> None:
    if sfmc.TIME_COLUMN not in settings.request.columns:
        logger.warning(
            "%s is not among the columns: if SFMC treats a request's end as "
            "inclusive, rows stamped exactly on a window boundary appear twice",
            sfmc.TIME_COLUMN,
        )


def _lock_output(settings: RunSettings, paths: ExportPaths) -> OutputLock:
    """Hold the output's lock; a folder we cannot write in is a usage error."""
    blocking = nearest_existing(settings.output.parent)
    if not blocking.is_dir():
        raise UsageError(
            f"cannot write --output {settings.output}: {blocking} is a file, not a "
            "folder; choose an --output in a folder"
        )

    try:
        make_folders(settings.output.parent)
        return OutputLock(paths.lock, state=paths.manifest).__enter__()
    except OSError as error:
        raise UsageError(
            f"cannot write beside {settings.output} ({error.strerror}); choose an "
            "--output in a folder you can write"
        ) from None


def _assembler(
    manifest: Manifest, paths: ExportPaths, settings: RunSettings
) -> Assembler:
    assembler = Assembler(
        manifest,
        paths,
        header=list(settings.request.columns),
        delimiter=settings.request.delimiter,
        keep_parts=settings.keep_parts,
        gzip=settings.gzip_output,
        flush_bytes=settings.flush_bytes,
    )
    if not manifest.complete:
        assembler.reconcile()
    elif not settings.keep_parts:  # left by a stop just after the export ended
        remove_parts_folder(paths)

    return assembler


def _reopen(assembler: Assembler, settings: RunSettings, now: dt.datetime) -> None:
    """Put back to pending what this run must request again; never rows that SFMC
    no longer keeps, which the output would lose."""
    # Provisional windows are refreshed once an export is complete; a rerun
    # that finishes a failed export leaves them be, so reruns converge.
    manifest = assembler.manifest
    kept_since = retention_cutoff(now, slack=False)
    if manifest.complete:
        _settle_expired_provisional(manifest, kept_since)
        refreshable = [r for r in manifest.windows if r.provisional]
        if reopened := assembler.reopen(refreshable):
            logger.info("%d provisional windows to request again", reopened)

    if settings.redo:
        chosen = select_windows(manifest, settings.redo, now=now, zone=settings.zone)
        _refuse_redo_past_retention(chosen, kept_since)
        logger.info("%d windows to request again", assembler.reopen(chosen))


async def _download_and_assemble(
    job: ExportJob, settings: RunSettings, hooks: Hooks
) -> None:
    manifest = job.manifest
    check_retention(manifest, settings, hooks.now())
    manifest.save()
    try:
        async with job.in_background():
            await job.download_missing()
            await job.assemble(flush=True)
    finally:
        manifest.flush()

    if job.assembler.all_merged():
        job.assembler.publish()


def _settle_expired_provisional(manifest: Manifest, kept_since: dt.datetime) -> None:
    """Take as final the provisional windows that reach past retention: SFMC can
    no longer give them again, so they keep the rows they have."""
    expired = [r for r in manifest.windows if _provisional_expired(r, kept_since)]
    if not expired:
        return

    for record in expired:
        record.provisional = False

    manifest.save()
    logger.warning(
        "%d provisional windows left SFMC's retention before they could be "
        "requested again: they keep the rows they have, which may lack late ones",
        len(expired),
    )


def _provisional_expired(record: WindowRecord, kept_since: dt.datetime) -> bool:
    return record.provisional and record.window.start < kept_since


def awaits_refresh(manifest: Manifest, now: dt.datetime) -> bool:
    """Whether the export has provisional windows that SFMC still retains, which the
    next run of the same command requests again."""
    kept_since = retention_cutoff(now, slack=False)
    return any(
        record.provisional and not _provisional_expired(record, kept_since)
        for record in manifest.windows
    )


def _refuse_redo_past_retention(
    chosen: list[WindowRecord], cutoff: dt.datetime
) -> None:
    """Refuse, before anything is cut, a --redo of rows SFMC no longer keeps: the
    output would lose the rows it holds. Windows that hold none yet (pending or
    failed) are left to the retention check of every run."""
    expired = [
        record.window
        for record in chosen
        if record.state in (DONE, MERGED) and record.window.start < cutoff
    ]
    if expired:
        raise UsageError(
            f"--redo names {expired[0]}{_and_more(expired)}, which reaches past "
            f"SFMC's 30-day retention (nothing before {iso(cutoff)} can be requested "
            "again): the output keeps the rows it has; leave it out of --redo"
        )


def _and_more(windows: list[Window]) -> str:
    return f" and {len(windows) - 1} more" if len(windows) > 1 else ""


def select_windows(
    manifest: Manifest,
    choices: tuple[str, ...],
    *,
    now: dt.datetime,
    zone: dt.tzinfo = dt.UTC,
) -> list[WindowRecord]:
    """The windows ``--redo`` names: ``failed``, or ranges ``START/END`` (overlap),
    read as the run's own range is (relative to ``now``, dates in ``zone``)."""
    chosen: list[WindowRecord] = []
    for choice in (given.strip() for given in choices):
        if choice == "failed":
            chosen += [r for r in manifest.windows if r.state == FAILED]
            continue

        start_text, sep, end_text = choice.partition("/")
        if not sep:
            raise UsageError(
                f"--redo {choice!r}: write 'failed' or a range START/END, e.g. "
                "2026-11-03T05:00Z/2026-11-03T08:00Z"
            )

        start = parse_time(start_text, now=now, name="--redo start", zone=zone)
        end = parse_time(end_text, now=now, name="--redo end", zone=zone)
        if end <= start:
            raise UsageError(
                f"--redo {choice!r}: its end is not after its start; write START/END"
            )

        found = [
            r for r in manifest.windows if r.window.start < end and start < r.window.end
        ]
        if not found:
            raise UsageError(
                f"--redo {choice!r} names no window of this export, which covers "
                f"{_range_of(manifest)}"
            )

        chosen += found

    return chosen


# "-30d" and "--last 30d" name the whole retention: the moments between reading the
# command line and checking it must not make them reach past it.
RETENTION_SLACK = dt.timedelta(minutes=5)


def retention_cutoff(now: dt.datetime, *, slack: bool = True) -> dt.datetime:
    """The oldest moment an export may start at: SFMC keeps 30 days of history (a
    few minutes more are allowed, so that "the last 30 days" is accepted; not with
    ``slack=False``, for rows already exported)."""
    kept = now - dt.timedelta(days=sfmc.RETENTION_DAYS)
    return kept - RETENTION_SLACK if slack else kept


def _refuse_past_retention(
    start: dt.datetime, end: dt.datetime, cutoff: dt.datetime
) -> None:
    """Refuse a span that starts before ``cutoff``, naming the part that is gone."""
    if start >= cutoff:
        return

    raise UsageError(
        f"{iso(start)} to {iso(min(cutoff, end))} is past SFMC's "
        f"{sfmc.RETENTION_DAYS}-day retention and is gone; start at or after "
        f"{iso(cutoff)}, or add --retained-only to export only what is retained"
    )


def retained_windows(settings: RunSettings, now: dt.datetime) -> list[Window]:
    """The windows a new run of ``settings`` would request: as :func:`check_retention`
    leaves them (refused, or with those past retention dropped)."""
    cutoff = retention_cutoff(now)
    if not settings.retained_only:  # refuse before planning what may be years
        _refuse_past_retention(settings.start, settings.end, cutoff)

    windows = plan_windows(settings.start, settings.end, settings.window)
    kept = [window for window in windows if window.end > cutoff]
    if not kept:
        _refuse_all_past_retention(settings.start, settings.end, cutoff)

    if len(kept) < len(windows):
        logger.warning(
            "--retained-only: %s to %s is past retention; not planned",
            iso(settings.start),
            iso(kept[0].start),
        )

    return kept


def _refuse_losing_published_rows(
    manifest: Manifest, todo: list[WindowRecord], output: Path, now: dt.datetime
) -> None:
    """Refuse to go on when windows put back to be requested again (a --redo or a
    refresh that was stopped) have left retention since: the published output
    holds their rows, which SFMC can no longer give back."""
    kept_since = retention_cutoff(now, slack=False)
    noted = _reopened_windows(manifest)
    held = [
        r
        for r in todo
        if r.window.start < kept_since
        and any(n.start <= r.window.start and r.window.end <= n.end for n in noted)
    ]  # a window split since lies inside the one noted
    if not held or not output.exists():
        return

    raise UsageError(
        f"{len(held)} windows put back to be requested again ({held[0].window}"
        f"{_and_more([r.window for r in held])}) have left SFMC's "
        f"{sfmc.RETENTION_DAYS}-day retention since, and {output} still holds their "
        "rows as last published: keep that file (move it and its .manifest.json "
        "elsewhere); this export can no longer be finished"
    )


def _reopened_windows(manifest: Manifest) -> list[Window]:
    listed = manifest.extra.get(REOPENED)
    if not isinstance(listed, list):
        return []

    windows = []
    for key in listed:
        with contextlib.suppress(ValueError):  # not a window's key: nothing noted
            windows.append(Window.from_key(key))

    return windows


def _refuse_all_past_retention(
    start: dt.datetime, end: dt.datetime, cutoff: dt.datetime
) -> None:
    raise UsageError(
        f"all of {iso(start)} to {iso(end)} is past SFMC's "
        f"{sfmc.RETENTION_DAYS}-day retention: nothing is left to export; start at "
        f"or after {iso(cutoff)}"
    )


def check_retention(
    manifest: Manifest, settings: RunSettings, now: dt.datetime
) -> None:
    """Refuse windows still to request that reach past retention, or drop them."""
    cutoff = retention_cutoff(now)
    todo = [r for r in manifest.windows if r.state in (PENDING, FAILED)]
    _refuse_losing_published_rows(manifest, todo, settings.output, now)
    reaching = [r for r in todo if r.window.start < cutoff]
    if not reaching:
        return

    # In time order: the later half of a split window comes first in the list.
    first = min(r.window.start for r in reaching)
    last = max(r.window.end for r in reaching)
    if not settings.retained_only:
        _refuse_past_retention(first, last, cutoff)

    lost = f"{iso(first)} to {iso(min(cutoff, last))}"
    gone = [r for r in reaching if r.window.end <= cutoff]
    if not gone:  # already left out, or only part of one window's span is gone
        return

    if len(gone) == len(manifest.windows):
        _refuse_all_past_retention(first, min(cutoff, last), cutoff)

    gone_ids = {id(record) for record in gone}
    manifest.windows[:] = [r for r in manifest.windows if id(r) not in gone_ids]
    expired = manifest.extra.setdefault("expired", [])
    expired.extend(r.window.key for r in gone)
    logger.warning("--retained-only: %s is past retention; not exported", lost)


def open_manifest(
    settings: RunSettings, paths: ExportPaths, now: dt.datetime
) -> Manifest:
    """Load the manifest of an earlier run of this request, or start a new one."""
    identity = request_identity(settings)
    if settings.restart:  # the published output stays until the new one replaces it
        return _new_manifest(settings, paths, identity, now)

    if paths.manifest.exists():
        manifest = Manifest.load(paths.manifest)
        _check_same_request(manifest, identity, paths, now)
        if manifest.complete and settings.output.exists():
            _check_published(manifest, settings.output)

        if manifest.complete and not settings.output.exists():
            logger.warning(
                "%s was removed since it was exported; exporting again", settings.output
            )
            return _new_manifest(settings, paths, identity, now)

        return manifest

    if settings.output.exists():
        raise ManifestError(
            f"{settings.output} exists and no export of it is recorded; choose another "
            "--output, or add --restart to replace it"
        )

    return _new_manifest(settings, paths, identity, now)


def _check_published(manifest: Manifest, output: Path) -> None:
    """Refuse a complete export whose output was changed since it was written."""
    if output.is_file() and output.stat().st_size == manifest.merged_bytes:
        return

    raise ManifestError(
        f"{output} was changed since it was exported (it is not the "
        f"{manifest.merged_bytes:,}-byte file this export wrote); add --restart to "
        "export it again"
    )


def request_identity(settings: RunSettings) -> dict[str, object]:
    """What makes two runs the same export: range, window span and request."""
    return {
        "start": settings.start.isoformat(),
        "end": settings.end.isoformat(),
        "window_seconds": int(settings.window.total_seconds()),
        "range_as_given": list(settings.range_as_given or ()),
        "gzip_output": settings.gzip_output,
        **settings.request.identity(),
    }


def _new_manifest(
    settings: RunSettings,
    paths: ExportPaths,
    identity: dict[str, object],
    now: dt.datetime,
) -> Manifest:
    if not settings.retained_only:  # refuse before planning what may be years
        _refuse_past_retention(settings.start, settings.end, retention_cutoff(now))

    kept_since = retention_cutoff(now, slack=False)
    early = kept_since - settings.start  # seconds of it for "-30d": not worth a word
    if early > dt.timedelta(minutes=1) and settings.start >= retention_cutoff(now):
        logger.warning(
            "%s is just before SFMC's %d-day line (%s): rows of those first moments "
            "may be gone already",
            iso(settings.start),
            sfmc.RETENTION_DAYS,
            iso(kept_since),
        )

    windows = plan_windows(settings.start, settings.end, settings.window)
    manifest = Manifest(paths.manifest, identity, [WindowRecord(w) for w in windows])
    check_retention(manifest, settings, now)  # before anything is written
    _discard_state(paths)
    manifest.save()
    return manifest


def _check_same_request(
    manifest: Manifest,
    identity: dict[str, object],
    paths: ExportPaths,
    now: dt.datetime,
) -> None:
    if manifest.request == identity:
        return

    differing = {
        key
        for key in identity.keys() | manifest.request.keys()
        if identity.get(key) != manifest.request.get(key)
    }
    if differing == {"range_as_given"}:
        return  # the same range, written another way

    provisional = awaits_refresh(manifest, now)
    if differing <= {"start", "end"} and (provisional or not manifest.complete):
        logger.info(
            "going on with the export of %s (%s): the same command, whose "
            "relative times now mean another range",
            _range_of(manifest),
            "its provisional windows" if manifest.complete else "unfinished",
        )
        return

    shown = ", ".join(sorted(_REQUEST_WORDS.get(key, key) for key in differing))
    if manifest.complete:
        kept_since = retention_cutoff(now, slack=False)
        gone = manifest.windows[0].window.start < kept_since
        replace = (
            "; keep that file: SFMC no longer has all of its rows"
            if gone
            else ", or delete that file and its .manifest.json to replace it"
        )
        raise ManifestError(
            f"{paths.output} already holds a complete export of "
            f"{_range_of(manifest)} (different: {shown}); choose another --output "
            "(with --since-last, name outputs to the minute: {start:%Y%m%dT%H%MZ})"
            f"{replace}"
        )

    raise ManifestError(
        f"{paths.output} belongs to an unfinished export with a different request "
        f"(different: {shown}); rerun with the same options, use another --output, or "
        "add --restart to discard that export and start over"
    )


# How the parts of a request are named to the user, where the key is not the word.
_REQUEST_WORDS = {
    "window_seconds": "window span",
    "range_as_given": "range as written",
    "gzip_output": "gzip output",
    "contact_keys": "contact keys",
}


def _nothing_requested(manifest: Manifest) -> bool:
    return manifest.merged_bytes == 0 and all(
        record.state == PENDING and not record.attempts for record in manifest.windows
    )


def _forget(paths: ExportPaths) -> None:
    """Remove the state of an export that stopped before requesting anything."""
    _discard_state(paths)
    remove_parts_folder(paths)


def _discard_state(paths: ExportPaths) -> None:
    """Remove an earlier export's state; its published output, if any, stays until
    the new export replaces it."""
    for path in (paths.manifest, paths.partial):
        path.unlink(missing_ok=True)

    paths.delete_part_files()  # anything else was refused by check_state_files


def check_state_files(paths: ExportPaths) -> None:
    """Refuse what stands where the export keeps its files and is not one of them:
    they would be deleted, or make every run fail the same way."""
    output = paths.output
    if output.parent.name.endswith(".parts"):
        raise UsageError(
            f"--output {output} is in a folder named like an export's parts folder "
            "(*.parts), whose files an export deletes: choose another folder"
        )

    if output.exists() and not output.is_file():
        raise UsageError(
            f"--output {output} exists and is not a regular file (a folder, a device "
            "or a pipe): name a regular file"
        )

    temporary = paths.manifest.with_name(paths.manifest.name + ".tmp")
    for path in (paths.manifest, temporary, paths.partial, paths.lock):
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise UsageError(
                f"{path} is not a regular file, and this export keeps one there: "
                "move it away and rerun"
            )

    if paths.partial.exists() and not paths.manifest.exists():
        raise UsageError(
            f"{paths.partial} exists but no export of it is recorded (no "
            f"{paths.manifest.name}): it is not this export's; move it away and rerun"
        )

    _check_parts_folder(paths)


def _check_parts_folder(paths: ExportPaths) -> None:
    parts = paths.parts
    if parts.is_symlink() or (parts.exists() and not parts.is_dir()):
        raise UsageError(
            f"{paths.parts} is not a folder, and this export keeps its parts there: "
            "move it away and rerun"
        )

    _, other = paths.part_files()
    if other:
        shown = ", ".join(repr(entry.name[:80]) for entry in other[:3])
        more = f" and {len(other) - 3} more" if len(other) > 3 else ""
        raise UsageError(
            f"{paths.parts} holds files this export did not write ({shown}{more}), "
            "which it would delete: move them away and rerun"
        )


def _range_of(manifest: Manifest) -> str:
    """The export's range as messages give times: ``2026-11-03T05:00:00Z to ...``."""
    start, end = (
        iso(dt.datetime.fromisoformat(manifest.request[key]))
        for key in ("start", "end")
    )
    return f"{start} to {end}"


__all__ = [
    "ExportResult",
    "Hooks",
    "estimate_windows",
    "history_lag",
    "retained_windows",
    "run_export",
]
