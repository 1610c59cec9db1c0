"""The worker pool: download windows concurrently, each with its own retries.

One window's failure never cancels the others. Cancellation (Ctrl-C, SIGTERM) is not
a failure: it passes through untouched and leaves the window pending. A spent time
budget starts no new attempt (``OutOfTime``): windows in flight finish, the rest
stay pending.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import anyio.abc
import tenacity

from orchestrator.errors import (
    JourneyExportError,
    ThrottledError,
    TooLargeError,
    WindowError,
)
from orchestrator.manifest import WindowRecord
from orchestrator.parts import PartInfo
from orchestrator.planner import Window
from orchestrator.retry import AdaptiveLimiter, RetryPolicy, ThrottleGate

logger = logging.getLogger(__name__)

Fetch = Callable[[WindowRecord], Awaitable[PartInfo]]
MIN_THROTTLE_PAUSE = 1.0


@dataclass(slots=True)
class PoolEvents:
    """What the pool reports back; the export records each in the manifest."""

    done: Callable[[WindowRecord, PartInfo], Awaitable[None]]
    failed: Callable[[WindowRecord, WindowError], Awaitable[None]]
    too_large: Callable[[WindowRecord, TooLargeError], list[WindowRecord]]


@dataclass(slots=True)
class PoolStats:
    """Counters of one run."""

    retries: int = 0
    throttled: int = 0
    retry_reasons: list[str] = field(default_factory=list)
    concurrency: int = 0  # downloads at once now (0: not started yet)


class OutOfTime(Exception):
    """The run's time budget is spent: start no new attempt."""


class WindowPool:
    """Run ``fetch`` for each window under a shared limiter, gate and retry policy."""

    def __init__(
        self,
        fetch: Fetch,
        events: PoolEvents,
        *,
        policy: RetryPolicy,
        limiter: AdaptiveLimiter,
        gate: ThrottleGate,
        deadline: float | None = None,
        stats: PoolStats | None = None,
    ) -> None:
        self._fetch = fetch
        self._events = events
        self._policy = policy
        self._limiter = limiter
        self._gate = gate
        self._deadline = deadline
        self.out_of_time = False
        self.stats = stats or PoolStats()
        self._group: anyio.abc.TaskGroup | None = None
        self._fatal: JourneyExportError | None = None
        self._first_attempts: dict[Window, float] = {}

    async def run(self, records: list[WindowRecord]) -> None:
        """Export every record, oldest first; return when each is done or failed.

        An error that concerns the whole run (credentials rejected, a refused URL)
        stops every window and is raised here.
        """
        # Windows wait for their turn here, not each as a task of its own: tens of
        # thousands of waiting tasks would cost memory, and time once the budget is
        # spent. Twice the most workers keeps the next windows queued at the
        # limiter.
        turns = anyio.Semaphore(2 * self._limiter.maximum)
        async with anyio.create_task_group() as group:
            self._group = group
            for record in records:
                await turns.acquire()
                if self._budget_spent():
                    self.out_of_time = True
                    break

                group.start_soon(self._export_in_turn, record, turns)

        if self._fatal is not None:
            raise self._fatal

    async def _export_in_turn(
        self, record: WindowRecord, turns: anyio.Semaphore
    ) -> None:
        try:
            await self._export(record)
        finally:
            turns.release()

    async def _export(self, record: WindowRecord) -> None:
        try:
            await self._export_window(record)
        except JourneyExportError as error:  # concerns the whole run
            self._stop_all(error)
        finally:
            self._first_attempts.pop(record.window, None)

    async def _export_window(self, record: WindowRecord) -> None:
        try:
            info = await self._attempts(record)
        except TooLargeError as error:
            for half in self._events.too_large(record, error):
                self._start(half)

            return
        except WindowError as error:
            await self._events.failed(record, error)
            return
        except OutOfTime:
            self.out_of_time = True
            return

        # From the first attempt on, not from the start of the run: a window that
        # waited its turn for a worker did not take that long.
        started = self._first_attempts[record.window]  # forgotten by _export
        record.seconds = time.monotonic() - started
        await self._events.done(record, info)

    def _budget_spent(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _start(self, record: WindowRecord) -> None:
        assert self._group is not None
        self._group.start_soon(self._export, record)

    def _stop_all(self, error: JourneyExportError) -> None:
        assert self._group is not None
        self._fatal = self._fatal or error
        self._group.cancel_scope.cancel()

    async def _attempts(self, record: WindowRecord) -> PartInfo:
        retrying = self._policy.retrying(
            on_retry=self._on_retry(record), until=self._deadline
        )
        async for attempt in retrying:
            with attempt:
                return await self._attempt(record)

        raise AssertionError("unreachable: tenacity reraises the last error")

    async def _attempt(self, record: WindowRecord) -> PartInfo:
        await self._gate.wait(until=self._deadline)
        async with self._limiter:
            await self._gate.wait(until=self._deadline)
            if self._budget_spent():
                raise OutOfTime

            record.attempts += 1
            self._first_attempts.setdefault(record.window, time.monotonic())
            try:
                info = await self._fetch(record)
            except ThrottledError as error:
                self._throttled(error)
                raise

        self._limiter.succeeded()
        self.stats.concurrency = self._limiter.limit
        return info

    def _throttled(self, error: ThrottledError) -> None:
        self.stats.throttled += 1
        # No Retry-After (50200: too many at once) still pauses everyone a while:
        # a short pause would only let the same requests collide again.
        pause = error.retry_after or max(
            MIN_THROTTLE_PAUSE, self._policy.settings.backoff_initial_seconds
        )
        self._gate.pause(pause)
        self._limiter.throttled()
        self.stats.concurrency = self._limiter.limit

    def _on_retry(
        self, record: WindowRecord
    ) -> Callable[[tenacity.RetryCallState], None]:
        def log_retry(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            self.stats.retries += 1
            record.error = str(error)
            logger.warning(
                "window %s: attempt %d failed (%s); retrying in %.1f s",
                record.window,
                state.attempt_number,
                error,
                state.upcoming_sleep,
                extra={
                    "event": "retry",
                    "window": record.window.key,
                    "attempt": state.attempt_number,
                    "error": str(error),
                    "wait_seconds": round(state.upcoming_sleep, 3),
                },
            )

        return log_retry
