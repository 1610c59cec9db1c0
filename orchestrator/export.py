"""The export: plan the windows, resume from the manifest, download, assemble.

Read top to bottom, :func:`run_export` is the whole job in a few named steps.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import anyio

from orchestrator import sfmc
from orchestrator.auth import TokenSource
from orchestrator.config import Credentials, RunSettings
from orchestrator.download import Estimate, JourneyHistoryClient
from orchestrator.errors import (
    ManifestError,
    PermanentError,
    TooLargeError,
    UsageError,
    WindowError,
)
from orchestrator.lock import OutputLock
from orchestrator.manifest import (
    DONE,
    FAILED,
    MERGED,
    PENDING,
    ExportPaths,
    Manifest,
    WindowRecord,
)
from orchestrator.merger import Assembler
from orchestrator.parts import PartInfo, fsync_directory
from orchestrator.planner import Window, plan_windows
from orchestrator.pool import PoolEvents, WindowPool
from orchestrator.reporting import Progress
from orchestrator.retry import AdaptiveLimiter, RetryPolicy, Sleep, ThrottleGate
from orchestrator.timeparse import iso, parse_time

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ExportResult:
    """How a run ended; ``failed`` maps each failed window to its last error."""

    output: str
    start: str
    end: str
    windows: int
    exported: int
    rows: int
    bytes: int
    seconds: float
    retries: int = 0
    throttled: int = 0
    complete: bool = False
    provisional: int = 0
    expired: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    out_of_time: bool = False


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class Hooks:
    """Injectable parts: the retry sleep, the clock, the TLS context."""

    sleep: Sleep = anyio.sleep
    now: Callable[[], dt.datetime] = _utc_now
    ssl_context: ssl.SSLContext | None = None
    progress: Progress | None = None


async def run_export(
    settings: RunSettings, credentials: Credentials, *, hooks: Hooks = Hooks()
) -> ExportResult:
    """Export ``settings``' range into its output; safe to rerun after any stop."""
    started = time.monotonic()
    paths = ExportPaths(settings.output)
    settings.output.parent.mkdir(parents=True, exist_ok=True)

    with OutputLock(paths.lock):
        manifest = open_manifest(settings, paths)
        assembler = Assembler(
            manifest,
            paths,
            header=list(settings.request.columns),
            delimiter=settings.request.delimiter,
            keep_parts=settings.keep_parts,
        )
        if not manifest.complete:
            assembler.reconcile()
        if reopened := assembler.reopen_provisional():
            logger.info("%d provisional windows to request again", reopened)
        if settings.redo:
            chosen = select_windows(manifest, settings.redo)
            logger.info("%d windows to request again", assembler.reopen(chosen))

        job = _Job(settings, credentials, paths, assembler, hooks)
        if not manifest.complete:
            check_retention(manifest, settings, hooks.now())
            await job.download_missing()
            await job.assemble()
            if assembler.all_merged():
                assembler.publish()
        return job.result(time.monotonic() - started)


async def history_lag(credentials: Credentials, settings: RunSettings) -> float:
    """The history lag in seconds from the freshness call, or the fallback."""
    fallback = settings.history_lag_fallback_seconds
    async with open_session(settings, Hooks()) as session:
        tokens = TokenSource(
            session, credentials, allowed_domains=settings.http.allowed_domains
        )
        client = JourneyHistoryClient(session, tokens, settings.request)
        try:
            lag = await client.freshness()
        except WindowError as error:
            logger.warning(
                "freshness unavailable (%s); assuming %.0f s", error, fallback
            )
            return fallback
    return fallback if lag is None else lag


async def estimate_windows(
    settings: RunSettings, credentials: Credentials, *, hooks: Hooks = Hooks()
) -> list[tuple[Window, Estimate | None]]:
    """Each planned window with its estimate, None where failed or unreadable."""
    windows = plan_windows(settings.start, settings.end, settings.window)
    found: dict[Window, Estimate | None] = {}
    limiter = anyio.CapacityLimiter(settings.concurrency)
    async with open_session(settings, hooks) as session:
        client = JourneyHistoryClient(
            session,
            TokenSource(
                session, credentials, allowed_domains=settings.http.allowed_domains
            ),
            settings.request,
        )

        async def estimate(window: Window) -> None:
            async with limiter:
                try:
                    found[window] = await client.estimate(window)
                except WindowError as error:
                    logger.warning("window %s: estimate failed: %s", window, error)
                    found[window] = None
            if found[window] is None:
                logger.warning("window %s: no readable estimate", window)

        async with anyio.create_task_group() as group:
            for window in windows:
                group.start_soon(estimate, window)
    return [(window, found[window]) for window in windows]


def select_windows(manifest: Manifest, choices: tuple[str, ...]) -> list[WindowRecord]:
    """The windows ``--redo`` names: ``failed``, or ranges ``START/END`` (overlap)."""
    chosen: list[WindowRecord] = []
    now = dt.datetime.now(dt.UTC)
    for choice in choices:
        if choice == "failed":
            chosen += [r for r in manifest.windows if r.state == FAILED]
            continue
        start_text, sep, end_text = choice.partition("/")
        if not sep:
            raise UsageError(
                f"--redo {choice!r}: write 'failed' or a range START/END, e.g. "
                "2026-11-03T05:00Z/2026-11-03T08:00Z"
            )
        start = parse_time(start_text, now=now, name="--redo start")
        end = parse_time(end_text, now=now, name="--redo end")
        chosen += [
            r for r in manifest.windows if r.window.start < end and start < r.window.end
        ]
    return chosen


def retention_cutoff(now: dt.datetime) -> dt.datetime:
    """The oldest moment SFMC still keeps history for."""
    return now - dt.timedelta(days=sfmc.RETENTION_DAYS)


def check_retention(
    manifest: Manifest, settings: RunSettings, now: dt.datetime
) -> None:
    """Refuse windows still to request that reach past retention, or drop them."""
    cutoff = retention_cutoff(now)
    todo = [r for r in manifest.windows if r.state in (PENDING, FAILED)]
    reaching = [r for r in todo if r.window.start < cutoff]
    if not reaching:
        return

    lost_end = min(cutoff, reaching[-1].window.end)
    lost = f"{iso(reaching[0].window.start)} to {iso(lost_end)}"
    if not settings.retained_only:
        raise UsageError(
            f"{lost} is past SFMC's {sfmc.RETENTION_DAYS}-day retention and is gone; "
            f"start at or after {iso(cutoff)}, or add --retained-only to export only "
            "what is retained"
        )

    gone = [r for r in reaching if r.window.end <= cutoff]
    for record in gone:
        manifest.windows.remove(record)
    expired = manifest.extra.setdefault("expired", [])
    expired.extend(r.window.key for r in gone)
    manifest.save()
    logger.warning("--retained-only: %s is past retention; not exported", lost)


def open_manifest(settings: RunSettings, paths: ExportPaths) -> Manifest:
    """Load the manifest of an earlier run of this request, or start a new one."""
    identity = request_identity(settings)
    if settings.restart:
        _discard_state(paths)
    elif paths.manifest.exists():
        manifest = Manifest.load(paths.manifest)
        _check_same_request(manifest, identity, paths)
        if manifest.complete and not settings.output.exists():
            logger.warning(
                "%s was removed since it was exported; exporting again", settings.output
            )
            return _new_manifest(settings, paths, identity)
        return manifest
    elif settings.output.exists():
        raise ManifestError(
            f"{settings.output} exists and no export of it is recorded; choose another "
            "--output, or add --restart to replace it"
        )
    return _new_manifest(settings, paths, identity)


def request_identity(settings: RunSettings) -> dict[str, object]:
    """What makes two runs the same export: range, window span and request."""
    return {
        "start": settings.start.isoformat(),
        "end": settings.end.isoformat(),
        "window_seconds": int(settings.window.total_seconds()),
        "range_as_given": list(settings.range_as_given or ()),
        **settings.request.identity(),
    }


def _new_manifest(
    settings: RunSettings, paths: ExportPaths, identity: dict[str, object]
) -> Manifest:
    _discard_state(paths)
    windows = plan_windows(settings.start, settings.end, settings.window)
    manifest = Manifest(paths.manifest, identity, [WindowRecord(w) for w in windows])
    manifest.save()
    return manifest


def _check_same_request(
    manifest: Manifest, identity: dict[str, object], paths: ExportPaths
) -> None:
    if manifest.request == identity:
        return
    differing = sorted(
        key
        for key in identity.keys() | manifest.request.keys()
        if identity.get(key) != manifest.request.get(key)
    )
    if set(differing) <= {"start", "end"} and not manifest.complete:
        logger.info(
            "resuming the unfinished export of %s to %s: the same command, whose "
            "relative times now mean another range",
            manifest.request["start"],
            manifest.request["end"],
        )
        return
    raise ManifestError(
        f"{paths.output} belongs to an export with a different request "
        f"({', '.join(differing)} differ); rerun with the same options, use another "
        "--output, or add --restart to discard that export and start over"
    )


def _discard_state(paths: ExportPaths) -> None:
    for path in (paths.manifest, paths.partial, paths.output):
        path.unlink(missing_ok=True)
    if paths.parts.exists():
        for part in paths.parts.iterdir():
            part.unlink()


class _Job:
    """The state of one run: its HTTP client, pool and the manifest updates."""

    def __init__(
        self,
        settings: RunSettings,
        credentials: Credentials,
        paths: ExportPaths,
        assembler: Assembler,
        hooks: Hooks,
    ) -> None:
        self.settings = settings
        self.credentials = credentials
        self.paths = paths
        self.assembler = assembler
        self.manifest = assembler.manifest
        self.hooks = hooks
        self.gate = ThrottleGate(sleep=hooks.sleep)
        self.limiter = AdaptiveLimiter(settings.concurrency)
        self.policy = RetryPolicy(settings.retry, sleep=hooks.sleep)
        self.assembling = anyio.Lock()
        self.client: JourneyHistoryClient | None = None
        self.pool: WindowPool | None = None
        self.history_lag = settings.history_lag_fallback_seconds
        self.estimates_usable = settings.estimate
        self.assembly_error: str | None = None
        self.progress = hooks.progress or Progress()
        budget = settings.max_duration
        self.deadline = time.monotonic() + budget.total_seconds() if budget else None

    def todo(self) -> list[WindowRecord]:
        return [r for r in self.manifest.windows if r.state in (PENDING, FAILED)]

    async def download_missing(self) -> None:
        if not self.todo():
            return
        self.paths.parts.mkdir(parents=True, exist_ok=True)

        async with open_session(self.settings, self.hooks) as session:
            tokens = TokenSource(
                session,
                self.credentials,
                allowed_domains=self.settings.http.allowed_domains,
            )
            self.client = JourneyHistoryClient(
                session,
                tokens,
                self.settings.request,
                compression=self.settings.compression,
                cap_bytes=self.settings.cap_bytes,
            )
            self.history_lag = await self._history_lag()
            await self._estimate(self.todo())

            todo = self.todo()
            total = len(self.manifest.windows)
            logger.info("%d of %d windows to download", len(todo), total)
            self._count_progress(total - len(todo))
            events = PoolEvents(self._done, self._failed, self._too_large)
            self.pool = WindowPool(
                self._fetch,
                events,
                policy=self.policy,
                limiter=self.limiter,
                gate=self.gate,
                deadline=self.deadline,
                stats=self.progress.stats,
            )
            await self.pool.run(todo)

    def _count_progress(self, finished: int) -> None:
        rows, size = self.manifest.totals()
        self.progress.windows = len(self.manifest.windows)
        self.progress.finished, self.progress.rows, self.progress.bytes = (
            finished,
            rows,
            size,
        )

    async def _history_lag(self) -> float:
        assert self.client is not None
        fallback = self.settings.history_lag_fallback_seconds
        try:
            lag = await self.client.freshness()
        except WindowError as error:
            logger.warning(
                "freshness unavailable (%s); assuming %.0f s", error, fallback
            )
            return fallback
        if lag is None:
            logger.warning("freshness answer not understood; assuming %.0f s", fallback)
            return fallback

        logger.info("history lags %.0f s behind real time", lag)
        return lag

    async def _estimate(self, records: list[WindowRecord]) -> None:
        """Split windows whose estimate is over the safety cap, before downloading."""
        fresh = [r for r in records if r.estimated_bytes is None]
        if not self.estimates_usable or not fresh:
            return
        async with anyio.create_task_group() as group:
            for record in fresh:
                group.start_soon(self._estimate_one, record)

    async def _estimate_one(self, record: WindowRecord) -> None:
        assert self.client is not None
        if not self.estimates_usable:
            return
        try:
            async with self.limiter:
                estimate = await self.client.estimate(record.window)
        except WindowError as error:
            self._stop_estimating(f"estimate failed ({error})")
            return
        if estimate is None:
            self._stop_estimating("estimate answer not understood")
            return

        size = estimate.size(compressed=self.settings.compression != "none")
        record.estimated_bytes = size
        if size > self.settings.cap_bytes and self._can_split(record):
            logger.info("window %s: estimate %d bytes; splitting", record.window, size)
            for half in self.manifest.split(record):
                await self._estimate_one(half)
        self.manifest.save()

    def _stop_estimating(self, reason: str) -> None:
        if self.estimates_usable:
            logger.warning("%s; going on without estimates", reason)
        self.estimates_usable = False

    def _can_split(self, record: WindowRecord) -> bool:
        return record.window.span / 2 >= self.settings.min_window

    async def _fetch(self, record: WindowRecord) -> PartInfo:
        assert self.client is not None
        temporary = self.paths.part(record.window).with_suffix(".tmp")
        try:
            return await self.client.download(record.window, temporary)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise PermanentError(
                f"cannot write the part {temporary}: {error.strerror or error}"
            ) from None
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    async def _done(self, record: WindowRecord, info: PartInfo) -> None:
        part = self.paths.part(record.window)
        os.replace(part.with_suffix(".tmp"), part)
        fsync_directory(part.parent)

        record.state = DONE
        record.provisional = self._is_provisional(record)
        record.rows, record.bytes = info.rows, info.bytes
        record.sha256, record.newline = info.sha256, info.newline
        record.error = None
        self.manifest.save()
        self._progressed(record)
        logger.info(
            "window %s done: %d rows, %d bytes, %.1f s, %d attempts",
            record.window,
            record.rows,
            record.bytes,
            record.seconds,
            record.attempts,
            extra={
                "event": "window_done",
                "window": record.window.key,
                "rows": record.rows,
                "bytes": record.bytes,
                "seconds": round(record.seconds, 3),
                "attempts": record.attempts,
                "provisional": record.provisional,
            },
        )
        await self.assemble()

    def _progressed(self, record: WindowRecord) -> None:
        self.progress.windows = len(self.manifest.windows)
        self.progress.finished += 1
        self.progress.finished_this_run += 1
        self.progress.rows += record.rows
        self.progress.bytes += record.bytes

    def _is_provisional(self, record: WindowRecord) -> bool:
        requested_at = self.hooks.now() - dt.timedelta(seconds=record.seconds)
        final_until = requested_at - dt.timedelta(seconds=self.history_lag)
        return record.window.end > final_until

    async def _failed(self, record: WindowRecord, error: WindowError) -> None:
        self.progress.failed += 1
        record.state = FAILED
        record.error = str(error)
        self.manifest.save()
        logger.error(
            "window %s failed after %d attempts: %s",
            record.window,
            record.attempts,
            error,
            extra={
                "event": "window_failed",
                "window": record.window.key,
                "attempts": record.attempts,
                "error": str(error),
            },
        )

    def _too_large(
        self, record: WindowRecord, error: TooLargeError
    ) -> list[WindowRecord]:
        if not self._can_split(record):
            failure = PermanentError(f"{error}, and the window cannot be split further")
            record.state, record.error = FAILED, str(failure)
            self.manifest.save()
            logger.error("window %s failed: %s", record.window, failure)
            return []

        halves = list(self.manifest.split(record))
        self.manifest.save()
        logger.warning("window %s: %s; splitting it in two", record.window, error)
        return halves

    async def assemble(self) -> None:
        """Append every window that is next in order; the copy runs in a thread.

        A failed append (a full disk) leaves the window done with its part kept;
        the next run cuts the partial output back and appends it again.
        """
        async with self.assembling:
            for part in self.assembler.ready():
                try:
                    size = await anyio.to_thread.run_sync(self.assembler.append, part)
                except OSError as error:
                    self.assembly_error = (
                        f"cannot append to {self.paths.partial}: "
                        f"{error.strerror or error}"
                    )
                    logger.error("%s; rerun once there is room", self.assembly_error)
                    return
                self.assembler.appended(part, size)

    def result(self, seconds: float) -> ExportResult:
        rows, size = self.manifest.totals()
        finished = [r for r in self.manifest.windows if r.state in (DONE, MERGED)]
        stats = self.pool.stats if self.pool else None
        return ExportResult(
            output=str(self.settings.output),
            start=str(self.manifest.request["start"]),
            end=str(self.manifest.request["end"]),
            windows=len(self.manifest.windows),
            exported=len(finished),
            rows=rows,
            bytes=size,
            seconds=seconds,
            retries=stats.retries if stats else 0,
            throttled=stats.throttled if stats else 0,
            complete=self.manifest.complete,
            provisional=sum(r.provisional for r in self.manifest.windows),
            expired=len(self.manifest.extra.get("expired", [])),
            error=self.assembly_error,
            out_of_time=bool(self.pool and self.pool.out_of_time),
            failed={
                r.window.key: r.error or "unknown"
                for r in self.manifest.windows
                if r.state == FAILED
            },
        )


def _tls_context(settings: RunSettings, hooks: Hooks) -> ssl.SSLContext:
    """Verify certificates always: with the given bundle, else the system's CAs.

    Python's default context honours SSL_CERT_FILE and SSL_CERT_DIR.
    """
    if hooks.ssl_context is not None:
        return hooks.ssl_context
    return ssl.create_default_context(cafile=settings.http.ca_bundle)


@asynccontextmanager
async def open_session(
    settings: RunSettings, hooks: Hooks
) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP session that leaves bodies compressed and times out on silence."""
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=settings.http.connect_timeout_seconds,
        sock_read=settings.http.read_timeout_seconds,
    )
    connector = aiohttp.TCPConnector(
        limit=settings.concurrency + 2, ssl=_tls_context(settings, hooks)
    )
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:
        yield session


__all__ = ["ExportResult", "Hooks", "WindowError", "run_export"]
