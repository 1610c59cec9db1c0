"""One run's downloading: the client, the pool, and the manifest updates as each
window ends."""

from __future__ import annotations

import datetime as dt
import errno
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.abc import TaskGroup, TaskStatus

from orchestrator.auth import TokenSource
from orchestrator.config import RunSettings
from orchestrator.credentials import Credentials
from orchestrator.download import Estimate, JourneyHistoryClient
from orchestrator.errors import (
    CutShortError,
    JourneyExportError,
    PermanentError,
    RetryableError,
    StateWriteError,
    ThrottledError,
    TooLargeError,
    UsageError,
    WindowError,
)
from orchestrator.manifest import (
    DONE,
    FAILED,
    MERGED,
    PENDING,
    ExportPaths,
    WindowRecord,
)
from orchestrator.merger import (
    Assembler,
    Batch,
    OutputChangedError,
    PartChangedError,
)
from orchestrator.parts import PRIVATE_DIR, PartInfo
from orchestrator.pool import PoolEvents, WindowPool
from orchestrator.reporting import Progress
from orchestrator.retry import (
    AdaptiveLimiter,
    RetryPolicy,
    Sleep,
    ThrottleGate,
    ask_a_few_times,
)
from orchestrator.session import open_session

logger = logging.getLogger(__name__)
ESTIMATE_ATTEMPTS = 3  # estimates only help: a few tries, then go on without them
# Estimates of smaller windows are too rough to find a body cut short by.
MIN_ESTIMATE_CHECKED = 1_000_000

MANIFEST_SAVE_SECONDS = 1.0  # at most this late, a checkpoint left unsaved is saved


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
    refused: int = 0  # failed windows the server refused as asked (not retryable)
    unended: int = 0  # bodies without a final newline this run (see the log)
    # The export went on with the range it began with, not the one asked for now.
    earlier_range: bool = False


def _warn_if_short_of_estimate(record: WindowRecord) -> None:
    """Warn of a body under half its estimate: a server limit below the safety cap
    that cuts a body at a row's end leaves nothing else to see."""
    estimate = record.estimated_bytes or 0  # compressed if compression is asked for
    if estimate < MIN_ESTIMATE_CHECKED or record.bytes * 2 >= estimate:
        return

    logger.warning(
        "window %s: %d bytes, under half its estimate of %d: a server that cuts "
        "bodies below --safety-cap-mb at a row's end leaves such a body; if yours "
        "does, lower --safety-cap-mb to its limit and --redo the window",
        record.window,
        record.bytes,
        estimate,
    )


def _part_write_error(part: Path, error: OSError) -> JourneyExportError:
    """Why no window can be written: the process's open-files limit, which a rerun
    meets again (exit 2), or the disk (exit 1: a rerun goes on once it has room)."""
    if error.errno == errno.EMFILE:
        return UsageError(
            f"cannot open the part {part}: this process may open no more files "
            "(its limit, ulimit -n); raise the limit or lower --concurrency, then rerun"
        )

    return StateWriteError(
        f"cannot write the part {part}: {error.strerror or error}; rerun once it "
        "can be written (free space, say)"
    )


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class Hooks:
    """Injectable parts: the retry sleep, the clock, the TLS context."""

    sleep: Sleep = anyio.sleep
    now: Callable[[], dt.datetime] = _utc_now
    ssl_context: ssl.SSLContext | None = None
    progress: Progress | None = None


class ExportJob:
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
        self.refused: set[str] = set()  # keys of windows failed by a PermanentError
        self.unended = 0  # bodies without a final newline, this run
        self.policy = RetryPolicy(settings.retry, sleep=hooks.sleep)
        self.assembling = anyio.Lock()
        self.client: JourneyHistoryClient | None = None
        self.pool: WindowPool | None = None
        self.history_lag = settings.history_lag_fallback_seconds
        self.estimates_usable = settings.estimate
        self.assembly_error: str | None = None
        self._flushes: TaskGroup | None = None
        self._in_flight: anyio.Event | None = None  # set once its batch is flushed
        self.progress = hooks.progress or Progress()
        budget = settings.max_duration
        self.deadline = time.monotonic() + budget.total_seconds() if budget else None

    def todo(self) -> list[WindowRecord]:
        return [r for r in self.manifest.windows if r.state in (PENDING, FAILED)]

    async def download_missing(self) -> None:
        if not self.todo():
            return

        self.paths.parts.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)

        async with open_session(self.settings, self.hooks.ssl_context) as session:
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
        if self.settings.history_lag_seconds is not None:
            return self.settings.history_lag_seconds

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

        left = None if self.deadline is None else self.deadline - time.monotonic()
        with anyio.move_on_after(left) as budget:
            async with anyio.create_task_group() as group:
                for record in fresh:
                    group.start_soon(self._estimate_one, record)

        if budget.cancelled_caught:  # the downloads then stop at once, out of time
            logger.warning("the time budget (--max-duration) ran out while estimating")

    async def _estimate_one(self, record: WindowRecord) -> None:
        assert self.client is not None
        if not self.estimates_usable:
            return

        client, window = self.client, record.window

        async def ask() -> Estimate | None:
            async with self.limiter:
                return await client.estimate(window)

        try:
            estimate = await ask_a_few_times(
                ask,
                attempts=ESTIMATE_ATTEMPTS,
                settings=self.settings.retry,
                gate=self.gate,
                sleep=self.hooks.sleep,
                on_retry=lambda error: self._estimate_retried(record, error),
            )
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

        self.manifest.checkpoint()

    def _estimate_retried(
        self, record: WindowRecord, error: BaseException | None
    ) -> None:
        """Count and log an estimate asked again, as the downloads' retries are."""
        stats = self.progress.stats
        stats.retries += 1
        if isinstance(error, ThrottledError):
            stats.throttled += 1

        logger.warning(
            "window %s: estimate failed (%s); asking again",
            record.window,
            error,
            extra={
                "event": "retry",
                "call": "estimate",
                "window": record.window.key,
                "error": str(error),
            },
        )

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
        except BaseException as error:
            temporary.unlink(missing_ok=True)
            failure = self._fetch_failure(record, temporary, error)
            if failure is error:
                raise

            raise failure from None

    def _fetch_failure(
        self, record: WindowRecord, part: Path, error: BaseException
    ) -> BaseException:
        """What a failed download stands for: the disk's errors are the run's, and a
        cut only inferred to be a size limit is asked again at --min-window (there
        a fault is likelier than a limit)."""
        if isinstance(error, OSError):
            return _part_write_error(part, error)

        if isinstance(error, CutShortError) and not self._can_split(record):
            return RetryableError(
                f"{error}; at --min-window it is asked again (cut alike every time, "
                "it is a size limit, which only a smaller --min-window gets past)"
            )

        return error

    async def _done(self, record: WindowRecord, info: PartInfo) -> None:
        part = self.paths.part(record.window)
        os.replace(part.with_suffix(".tmp"), part)
        self.assembler.mark_whole(record, info.written)

        record.state = DONE
        record.provisional = self._is_provisional(record)
        record.rows, record.bytes = info.rows, info.bytes
        record.sha256, record.newline = info.sha256, info.newline
        record.error = None
        if info.unended:
            self.unended += 1

        _warn_if_short_of_estimate(record)
        self.manifest.checkpoint()
        self._progressed(record)
        logger.info(
            "window %s done: %d rows, %d bytes, %.1f s, attempts: %d",
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
        self._fail(record, error)
        self.manifest.checkpoint()

    def _fail(self, record: WindowRecord, error: WindowError) -> None:
        """Record ``record`` as failed; refused unless asking again may help."""
        self.progress.failed += 1
        if isinstance(error, RetryableError):
            self.refused.discard(record.window.key)
        else:
            self.refused.add(record.window.key)  # only another request gets it

        record.state = FAILED
        record.error = str(error)
        logger.error(
            "window %s failed (attempts over every run so far: %d): %s",
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
            # Refused: only a smaller --min-window gets it.
            failure = PermanentError(f"{error}, and the window cannot be split further")
            self._fail(record, failure)
            self.manifest.save()
            return []

        halves = list(self.manifest.split(record))
        self.manifest.save()
        logger.warning("window %s: %s; splitting it in two", record.window, error)
        return halves

    @asynccontextmanager
    async def in_background(self) -> AsyncIterator[None]:
        """While open, each batch of appended windows is flushed to disk in the
        background while the next windows are appended (one batch at a time), and
        the manifest is saved each second if it has changes a checkpoint left
        unsaved, so that ``status`` stays current while one window holds the rest
        up. Closing it waits for the batch in flight."""
        try:
            async with anyio.create_task_group() as group:
                self._flushes = group
                saver: anyio.CancelScope = await group.start(self._save_each_second)
                try:
                    yield
                finally:
                    self._flushes = None
                    saver.cancel()
        except BaseExceptionGroup as error:
            # The task group wraps whatever ends it, the export's own errors too:
            # a lone one is raised as it was raised, with its own cause.
            if len(error.exceptions) == 1:
                inner = error.exceptions[0]
                raise inner from inner.__cause__

            raise

    async def _save_each_second(
        self, *, task_status: TaskStatus[anyio.CancelScope]
    ) -> None:
        with anyio.CancelScope() as scope:
            task_status.started(scope)
            while True:
                await anyio.sleep(MANIFEST_SAVE_SECONDS)
                self.manifest.flush()

    async def assemble(self, *, flush: bool = False) -> None:
        """Append every window that is next in order, and flush the output to disk
        once enough has piled up (or now, with ``flush``); the disk work runs in
        worker threads.

        A failed append or flush (a full disk) stops assembling for this run: the
        windows stay done with their parts kept, and the next run cuts the partial
        output back and appends them again.
        """
        async with self.assembling:
            if self.assembly_error:
                return

            try:
                await self._append_ready()
                if flush:
                    await self._flush_appended(wait=True)
            except (OSError, OutputChangedError) as error:
                self._stop_assembling(error)

    def _stop_assembling(self, error: OSError | OutputChangedError) -> None:
        if isinstance(error, OutputChangedError):
            self.assembly_error = str(error)
        else:
            self.assembly_error = (
                f"cannot write {self.paths.partial}: {error.strerror or error}; "
                "rerun once there is room"
            )

        logger.error("%s", self.assembly_error)

    async def _append_ready(self) -> None:
        assembler = self.assembler
        for record in assembler.ready():
            if self.assembly_error:  # a flush in the background failed
                return

            try:
                size = await anyio.to_thread.run_sync(assembler.append, record)
            except PartChangedError as error:
                logger.error("%s", error)
                assembler.drop(record, str(error))
                break

            assembler.appended(record, size)
            if assembler.flush_due():
                await self._flush_appended(wait=False)

    async def _flush_appended(self, *, wait: bool) -> None:
        """Flush what is appended as one batch, once the batch in flight (if any)
        is done: in the background while :meth:`in_background` is open, unless
        ``wait`` asks to wait for it."""
        await self._wait_for_flush()
        batch = None if self.assembly_error else self.assembler.take_batch()
        if batch is None:
            return

        if wait or self._flushes is None:
            await self._flush(batch)
            return

        self._in_flight = anyio.Event()
        self._flushes.start_soon(self._flush_in_background, batch)

    async def _flush_in_background(self, batch: Batch) -> None:
        assert self._in_flight is not None
        try:
            await self._flush(batch)
        except (OSError, OutputChangedError) as error:
            self._stop_assembling(error)
        finally:
            self._in_flight.set()

    async def _wait_for_flush(self) -> None:
        """Wait until no batch is in flight."""
        if self._in_flight is not None:
            await self._in_flight.wait()

    async def _flush(self, batch: Batch) -> None:
        """Flush the output to disk in a thread, then record what it holds."""
        await anyio.to_thread.run_sync(self.assembler.sync, batch)
        self.assembler.settle(batch)

    def _range_asked(self) -> tuple[str, str]:
        return self.settings.start.isoformat(), self.settings.end.isoformat()

    def _range_exported(self) -> tuple[str, str]:
        request = self.manifest.request
        return str(request["start"]), str(request["end"])

    def result(self, seconds: float) -> ExportResult:
        rows, size = self.manifest.totals()
        finished = [r for r in self.manifest.windows if r.state in (DONE, MERGED)]
        stats = self.progress.stats  # the pool's too
        return ExportResult(
            output=str(self.settings.output),
            start=str(self.manifest.request["start"]),
            end=str(self.manifest.request["end"]),
            earlier_range=self._range_asked() != self._range_exported(),
            windows=len(self.manifest.windows),
            exported=len(finished),
            rows=rows,
            bytes=size,
            seconds=seconds,
            retries=stats.retries,
            throttled=stats.throttled,
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
            unended=self.unended,
            refused=sum(
                r.state == FAILED and r.window.key in self.refused
                for r in self.manifest.windows
            ),
        )
