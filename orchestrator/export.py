"""The export: plan the windows, resume from the manifest, download, assemble.

Read top to bottom, :func:`run_export` is the whole job in a few named steps.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import anyio

from orchestrator.auth import TokenSource
from orchestrator.config import Credentials, RunSettings
from orchestrator.download import JourneyHistoryClient
from orchestrator.errors import (
    ManifestError,
    PermanentError,
    TooLargeError,
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
from orchestrator.planner import MIN_SPAN, plan_windows
from orchestrator.pool import PoolEvents, WindowPool
from orchestrator.retry import AdaptiveLimiter, RetryPolicy, Sleep, ThrottleGate

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ExportResult:
    """How a run ended; ``failed`` maps each failed window to its last error."""

    output: str
    windows: int
    exported: int
    rows: int
    bytes: int
    seconds: float
    retries: int = 0
    throttled: int = 0
    complete: bool = False
    failed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Hooks:
    """Injectable parts for tests: the retry sleep and the download cap."""

    sleep: Sleep = anyio.sleep
    cap_bytes: int | None = None
    ssl_context: ssl.SSLContext | None = None


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
        assembler.reconcile()

        job = _Job(settings, credentials, paths, assembler, hooks)
        await job.download_missing()
        await job.assemble()

        if assembler.all_merged() and not manifest.complete:
            assembler.publish()
        return job.result(time.monotonic() - started)


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
        self.gate = ThrottleGate()
        self.limiter = AdaptiveLimiter(settings.concurrency)
        self.policy = RetryPolicy(settings.retry, sleep=hooks.sleep)
        self.assembling = anyio.Lock()
        self.client: JourneyHistoryClient | None = None
        self.pool: WindowPool | None = None

    async def download_missing(self) -> None:
        todo = [r for r in self.manifest.windows if r.state in (PENDING, FAILED)]
        if not todo:
            return
        logger.info(
            "%d of %d windows to download", len(todo), len(self.manifest.windows)
        )

        async with open_session(self.settings, self.hooks) as session:
            tokens = TokenSource(session, self.credentials)
            self.client = JourneyHistoryClient(
                session,
                tokens,
                self.settings.request,
                compression=self.settings.compression,
                **_cap(self.hooks),
            )
            events = PoolEvents(self._done, self._failed, self._too_large)
            self.pool = WindowPool(
                self._fetch,
                events,
                policy=self.policy,
                limiter=self.limiter,
                gate=self.gate,
            )
            await self.pool.run(todo)

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
        record.rows, record.bytes = info.rows, info.bytes
        record.sha256, record.newline = info.sha256, info.newline
        record.error = None
        self.manifest.save()
        logger.info(
            "window %s done: %d rows, %d bytes, %.1f s, %d attempts",
            record.window,
            record.rows,
            record.bytes,
            record.seconds,
            record.attempts,
        )
        await self.assemble()

    async def _failed(self, record: WindowRecord, error: WindowError) -> None:
        record.state = FAILED
        record.error = str(error)
        self.manifest.save()
        logger.error(
            "window %s failed after %d attempts: %s",
            record.window,
            record.attempts,
            error,
        )

    def _too_large(
        self, record: WindowRecord, error: TooLargeError
    ) -> list[WindowRecord]:
        if record.window.span / 2 < MIN_SPAN:
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
        """Append every window that is next in order; the copy runs in a thread."""
        async with self.assembling:
            for part in self.assembler.ready():
                size = await anyio.to_thread.run_sync(self.assembler.append, part)
                self.assembler.appended(part, size)

    def result(self, seconds: float) -> ExportResult:
        rows, size = self.manifest.totals()
        finished = [r for r in self.manifest.windows if r.state in (DONE, MERGED)]
        stats = self.pool.stats if self.pool else None
        return ExportResult(
            output=str(self.settings.output),
            windows=len(self.manifest.windows),
            exported=len(finished),
            rows=rows,
            bytes=size,
            seconds=seconds,
            retries=stats.retries if stats else 0,
            throttled=stats.throttled if stats else 0,
            complete=self.manifest.complete,
            failed={
                r.window.key: r.error or "unknown"
                for r in self.manifest.windows
                if r.state == FAILED
            },
        )


def _cap(hooks: Hooks) -> dict[str, int]:
    return {} if hooks.cap_bytes is None else {"cap_bytes": hooks.cap_bytes}


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
        limit=settings.concurrency + 2,
        ssl=hooks.ssl_context if hooks.ssl_context is not None else True,
    )
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:
        yield session


__all__ = ["ExportResult", "Hooks", "WindowError", "run_export"]
