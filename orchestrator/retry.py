"""The retry policy of a window, and the shared brakes every worker obeys.

``ThrottleGate`` is one pause for all workers after the server throttles; the
``AdaptiveLimiter`` halves concurrency on throttling and grows it back slowly. The
waits are pure functions of the attempt so tests can check them without sleeping.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import tenacity

from orchestrator.config import RetrySettings
from orchestrator.errors import RetryableError, ThrottledError

logger = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]
MIN_WAIT_SECONDS = 0.05
_T = TypeVar("_T")


class ThrottleGate:
    """One pause shared by every worker: nobody starts a request before it ends."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = anyio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._resume_at = 0.0
        self.pauses = 0

    def pause(self, seconds: float) -> None:
        """Hold every worker for ``seconds`` from now (an earlier end is extended)."""
        resume_at = self._clock() + seconds
        if resume_at > self._resume_at:
            self._resume_at = resume_at
            self.pauses += 1

    async def wait(self, *, until: float | None = None) -> None:
        """Sleep until the pause is over, plus a little jitter so workers spread out;
        never past ``until`` (a time of the clock), if given."""
        remaining = self._resume_at - self._clock()
        if remaining > 0:
            pause = remaining + self._rng.uniform(0, min(1.0, remaining / 4))
            await self._sleep(_within(pause, until, self._clock))


class AdaptiveLimiter:
    """A capacity limiter that halves on throttling and grows by one after successes.

    It never goes above ``maximum`` nor below one. Growth needs twice as many
    successes in a row as the current limit (at least four), so it climbs back
    slowly.
    """

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self._limiter = anyio.CapacityLimiter(maximum)
        self._successes = 0

    @property
    def limit(self) -> int:
        return int(self._limiter.total_tokens)

    async def __aenter__(self) -> None:
        await self._limiter.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self._limiter.release()

    def throttled(self) -> None:
        self._successes = 0
        lowered = max(1, self.limit // 2)
        if lowered < self.limit:
            logger.info("throttled: concurrency %d -> %d", self.limit, lowered)
            self._limiter.total_tokens = lowered

    def succeeded(self) -> None:
        self._successes += 1
        if self._successes >= max(4, 2 * self.limit) and self.limit < self.maximum:
            self._successes = 0
            self._limiter.total_tokens = self.limit + 1
            logger.debug("concurrency back up to %d", self.limit)


def backoff_seconds(
    settings: RetrySettings,
    attempt: int,
    error: BaseException | None,
    rng: random.Random,
) -> float:
    """How long to wait after failed attempt number ``attempt`` (1-based).

    A server-given Retry-After is honoured (plus up to 10 % jitter); otherwise the wait
    is exponential backoff with full jitter, never below a small floor.
    """
    if isinstance(error, ThrottledError) and error.retry_after > 0:
        return error.retry_after * (1 + rng.uniform(0, 0.1))

    ceiling = settings.backoff_initial_seconds * 2 ** (attempt - 1)
    ceiling = min(ceiling, settings.backoff_max_seconds)
    return max(MIN_WAIT_SECONDS, rng.uniform(0, ceiling))


class RetryPolicy:
    """Build the tenacity retrying object of one window, the same for all windows."""

    def __init__(
        self,
        settings: RetrySettings,
        *,
        sleep: Sleep = anyio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._sleep = sleep
        self._rng = rng or random.Random()

    def retrying(
        self,
        on_retry: Callable[[tenacity.RetryCallState], None],
        *,
        until: float | None = None,
    ) -> tenacity.AsyncRetrying:
        """Retry while RetryableError is raised; no wait goes past ``until`` (a time
        of ``time.monotonic``), if given: the next attempt then finds it passed."""

        async def sleep(seconds: float) -> None:
            await self._sleep(_within(seconds, until, time.monotonic))

        return tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(RetryableError),
            wait=self._wait,
            stop=self._stop,
            sleep=sleep,
            before_sleep=on_retry,
            reraise=True,
        )

    def _wait(self, state: tenacity.RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        return backoff_seconds(self.settings, state.attempt_number, error, self._rng)

    def _stop(self, state: tenacity.RetryCallState) -> bool:
        if state.attempt_number >= self.settings.max_attempts:
            return True

        upcoming = state.upcoming_sleep or 0.0
        return state.idle_for + upcoming > self.settings.max_wait_seconds


def _within(seconds: float, until: float | None, clock: Callable[[], float]) -> float:
    """``seconds``, cut short so as to end by ``until`` if given (never below 0)."""
    return seconds if until is None else max(0.0, min(seconds, until - clock()))


async def ask_a_few_times(
    call: Callable[[], Awaitable[_T]],
    *,
    attempts: int,
    settings: RetrySettings,
    gate: ThrottleGate,
    sleep: Sleep,
    rng: random.Random | None = None,
    on_retry: Callable[[BaseException | None], None] | None = None,
) -> _T:
    """Await ``call`` up to ``attempts`` times while it raises RetryableError, for a
    request that is only a help (an estimate): the window's policy with fewer
    attempts, and a throttled answer pauses every worker, as a download's does.
    ``on_retry`` is told each error retried. The last error is raised."""
    limited = dataclasses.replace(settings, max_attempts=attempts)
    policy = RetryPolicy(limited, sleep=sleep, rng=rng)

    def pause_if_throttled(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        if on_retry is not None:
            on_retry(error)

        if isinstance(error, ThrottledError):
            gate.pause(state.upcoming_sleep)

    async for attempt in policy.retrying(on_retry=pause_if_throttled):
        with attempt:
            await gate.wait()
            return await call()

    raise AssertionError("unreachable: tenacity reraises the last error")
