from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import pytest

from orchestrator.config import RetrySettings
from orchestrator.errors import PermanentError, RetryableError, ThrottledError
from orchestrator.retry import (
    AdaptiveLimiter,
    RetryPolicy,
    ThrottleGate,
    ask_a_few_times,
    backoff_seconds,
)

SETTINGS = RetrySettings(
    max_attempts=4,
    max_wait_seconds=100,
    backoff_initial_seconds=1,
    backoff_max_seconds=8,
)


class Recorder:
    def __init__(self) -> None:
        self.sleeps: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.sleeps.append(seconds)


async def run(policy: RetryPolicy, errors: list[BaseException]) -> int:
    calls = 0
    async for attempt in policy.retrying(on_retry=lambda state: None):
        with attempt:
            calls += 1
            if errors:
                raise errors.pop(0)
    return calls


def test_backoff_is_exponential_with_full_jitter_and_a_ceiling() -> None:
    rng = random.Random(1)
    for attempt, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (9, 8)]:
        waits = [backoff_seconds(SETTINGS, attempt, None, rng) for _ in range(200)]
        assert max(waits) <= ceiling
        assert min(waits) >= 0.05
        assert max(waits) > ceiling * 0.8


def test_retry_after_is_honoured_with_a_little_jitter() -> None:
    error = ThrottledError("429", retry_after=30)
    wait = backoff_seconds(SETTINGS, 1, error, random.Random(2))

    assert 30 <= wait <= 33


def test_zero_retry_after_falls_back_to_backoff() -> None:
    error = ThrottledError("429 50200", retry_after=0)
    waits = {backoff_seconds(SETTINGS, 3, error, random.Random(n)) for n in range(20)}

    assert all(0.05 <= wait <= 4 for wait in waits)
    assert len(waits) > 1


async def test_retryable_errors_are_retried_until_success() -> None:
    sleep = Recorder()
    policy = RetryPolicy(SETTINGS, sleep=sleep, rng=random.Random(3))

    calls = await run(policy, [RetryableError("503"), RetryableError("reset")])

    assert calls == 3
    assert len(sleep.sleeps) == 2


async def test_permanent_errors_are_not_retried() -> None:
    sleep = Recorder()
    policy = RetryPolicy(SETTINGS, sleep=sleep)

    with pytest.raises(PermanentError):
        await run(policy, [PermanentError("400")])
    assert sleep.sleeps == []


async def test_attempts_are_capped_and_the_last_error_is_raised() -> None:
    sleep = Recorder()
    policy = RetryPolicy(SETTINGS, sleep=sleep)
    errors: list[BaseException] = [RetryableError(f"e{n}") for n in range(10)]

    with pytest.raises(RetryableError, match="e3"):
        await run(policy, errors)
    assert len(sleep.sleeps) == 3


async def test_total_wait_is_capped() -> None:
    sleep = Recorder()
    settings = RetrySettings(max_attempts=50, max_wait_seconds=65)
    # Retry-After 30 plus up to 10 % jitter: two waits fit in 65 s unless the
    # jitter adds up to more than 5 s, so a fixed seed keeps this exact.
    policy = RetryPolicy(settings, sleep=sleep, rng=random.Random(1))
    errors: list[BaseException] = [ThrottledError("429", retry_after=30)] * 10

    with pytest.raises(ThrottledError):
        await run(policy, list(errors))
    assert len(sleep.sleeps) == 2
    assert sum(sleep.sleeps) <= 65


async def test_gate_holds_workers_until_the_pause_ends() -> None:
    now = [100.0]
    sleep = Recorder()
    gate = ThrottleGate(clock=lambda: now[0], sleep=sleep, rng=random.Random(4))

    gate.pause(10)
    gate.pause(4)
    await gate.wait()

    assert gate.pauses == 1
    assert 10 <= sleep.sleeps[0] <= 11


def test_limiter_halves_on_throttling_and_grows_back_slowly() -> None:
    limiter = AdaptiveLimiter(8)

    limiter.throttled()
    limiter.throttled()
    assert limiter.limit == 2

    for _ in range(3):
        limiter.succeeded()
    assert limiter.limit == 2
    limiter.succeeded()
    assert limiter.limit == 3
    for _ in range(6 + 8 + 10 + 12 + 14):
        limiter.succeeded()
    assert limiter.limit == 8


def asking(answers: list[BaseException | str]) -> Callable[[], Awaitable[str]]:
    """A call that raises or returns each of ``answers`` in turn."""

    async def call() -> str:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    return call


async def test_a_helping_request_is_asked_again_after_a_throttle_or_a_5xx() -> None:
    sleeps = Recorder()
    gate = ThrottleGate(sleep=sleeps)
    answers: list[BaseException | str] = [
        ThrottledError("429", retry_after=3),
        RetryableError("503"),
        "estimate",
    ]
    call = asking(answers)

    got = await ask_a_few_times(
        call, attempts=3, settings=SETTINGS, gate=gate, sleep=sleeps
    )

    assert got == "estimate"
    assert gate.pauses == 1  # the throttle paused every worker
    assert sleeps.sleeps[0] >= 3  # for its Retry-After, before the next attempt


async def test_a_helping_request_gives_up_after_its_attempts() -> None:
    sleeps = Recorder()
    answers: list[BaseException | str] = [RetryableError("503") for _ in range(3)]
    answers.append("late")

    with pytest.raises(RetryableError, match="503"):
        await ask_a_few_times(
            asking(answers),
            attempts=3,
            settings=SETTINGS,
            gate=ThrottleGate(sleep=sleeps),
            sleep=sleeps,
        )
    assert answers == ["late"]

    with pytest.raises(PermanentError):  # not retried at all
        await ask_a_few_times(
            asking([PermanentError("400"), "never"]),
            attempts=3,
            settings=SETTINGS,
            gate=ThrottleGate(sleep=sleeps),
            sleep=sleeps,
        )
