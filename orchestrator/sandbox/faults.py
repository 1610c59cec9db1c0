"""Switchable faults: each kind injected at a seeded rate or on a schedule of attempts.

Where each kind applies:

- status kinds (throttle, blocked, unavailable, error500/502/504) and token_revoked:
  any REST call (download, estimate, freshness) at their rates; downloads by rule;
- body kinds (reset, cut_length, cut_chunked, cut_gzip, stall, slow_first_byte):
  downloads only;
- token_error: the token endpoint; a rule's attempt N means the Nth token request.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from orchestrator.sandbox.query import parse_time

STATUS_KINDS = (
    "throttle",
    "blocked",
    "unavailable",
    "error500",
    "error502",
    "error504",
)
BODY_KINDS = (
    "reset",
    "cut_length",
    "cut_chunked",
    "cut_gzip",
    "stall",
    "slow_first_byte",
)
TOKEN_KINDS = ("token_revoked", "token_error")
KINDS = STATUS_KINDS + BODY_KINDS + TOKEN_KINDS
DOWNLOAD_KINDS = (*STATUS_KINDS, *BODY_KINDS, "token_revoked")
CALL_KINDS = (*STATUS_KINDS, "token_revoked")
NUMBERS = ("retry_after", "stall_seconds", "first_byte_seconds", "seed")
WHOLE_NUMBERS = ("retry_after", "seed")
FIELD_NUMBERS = ("retry_after_seconds", "stall_seconds", "first_byte_seconds", "seed")
NOT_AUTHORIZED = {"message": "Not Authorized", "errorcode": 0, "documentation": ""}
PLAIN_ERRORS = {
    "error500": (500, "Internal Server Error"),
    "error502": (502, "<html><body><h1>502 Bad Gateway</h1></body></html>"),
    "error504": (504, "<html><body><h1>504 Gateway Time-out</h1></body></html>"),
    "token_error": (500, "Internal Server Error"),
}


@dataclass(frozen=True, slots=True)
class FaultRule:
    """Inject `kind` on attempt `attempt` (every attempt if None) of matching windows.

    A rule with `window_start_ms` None matches every window.
    """

    kind: str
    attempt: int | None = 1
    window_start_ms: int | None = None

    def matches(self, window_start_ms: int, attempt: int) -> bool:
        """Whether this rule fires for the given window and attempt (from 1)."""
        if self.window_start_ms not in (None, window_start_ms):
            return False

        return self.attempt is None or self.attempt == attempt


@dataclass(frozen=True, slots=True)
class FaultSettings:
    """Which faults to inject, how often, and their timings (seconds).

    Rates are probabilities per request; the download kinds' rates must sum to at
    most 1, since one draw picks at most one fault. Rules win over rates. The
    timings and the seed are finite numbers >= 0.
    """

    rates: Mapping[str, float] = field(default_factory=dict)
    rules: tuple[FaultRule, ...] = ()
    retry_after_seconds: int = 1
    stall_seconds: float = 60.0
    first_byte_seconds: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        for kind in [*self.rates, *(rule.kind for rule in self.rules)]:
            _check_kind(kind)

        for kind, rate in self.rates.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"fault rate {kind}={rate} is outside 0.0-1.0")

        total = sum(self.rates.get(kind, 0.0) for kind in DOWNLOAD_KINDS)
        if total > 1.0 + 1e-9:
            raise ValueError(f"download fault rates sum to {total:g}, more than 1.0")

        for name in FIELD_NUMBERS:
            _check_number(name, getattr(self, name))

    @property
    def active(self) -> bool:
        """Whether any fault can fire."""
        return bool(self.rules) or any(self.rates.values())


@dataclass(frozen=True, slots=True)
class ErrorAnswer:
    """A complete error response: status, headers and body."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


class FaultInjector:
    """Decide, request by request, which fault (if any) to inject."""

    def __init__(self, settings: FaultSettings) -> None:
        self.settings = settings
        self._rng = random.Random(settings.seed)

    def for_download(self, window_start_ms: int, attempt: int) -> str | None:
        """The fault for attempt `attempt` (from 1) of the window starting there."""
        for rule in self.settings.rules:
            is_download = rule.kind in DOWNLOAD_KINDS
            if is_download and rule.matches(window_start_ms, attempt):
                return rule.kind

        return self._draw(DOWNLOAD_KINDS)

    def for_call(self) -> str | None:
        """The fault for an estimate or freshness call: rates only."""
        return self._draw(CALL_KINDS)

    def for_token(self, request_number: int) -> bool:
        """Whether token request number `request_number` (from 1) fails with 500."""
        for rule in self.settings.rules:
            if rule.kind == "token_error" and rule.attempt in (None, request_number):
                return True

        rate = self.settings.rates.get("token_error", 0.0)
        return rate > 0.0 and self._rng.random() < rate

    def _draw(self, kinds: tuple[str, ...]) -> str | None:
        if not any(self.settings.rates.get(kind) for kind in kinds):
            return None

        draw = self._rng.random()
        for kind in kinds:
            draw -= self.settings.rates.get(kind, 0.0)
            if draw < 0.0:
                return kind

        return None


def not_authorized() -> ErrorAnswer:
    """The answer to a REST call without a valid, unexpired token."""
    return ErrorAnswer(401, json.dumps(NOT_AUTHORIZED).encode())


def rest_error(status: int, errorcode: int, message: str) -> ErrorAnswer:
    """An error in the REST shape: message, errorcode, documentation."""
    document = {"message": message, "errorcode": errorcode, "documentation": ""}
    return ErrorAnswer(status, json.dumps(document).encode())


def fault_answer(kind: str, *, retry_after: int = 1) -> ErrorAnswer:
    """The answer a status or token fault gives instead of the real one."""
    wait = {"Retry-After": str(retry_after)}
    if kind == "throttle":
        text = f"Rate limit exceeded; retry after {retry_after} seconds."
        document = {
            "message": text,
            "errorcode": 50100,
            "documentation": "",
            "retryAfter": retry_after,
        }
        return ErrorAnswer(429, json.dumps(document).encode(), headers=wait)

    if kind == "blocked":
        text = "Too many concurrent requests; the client is temporarily blocked."
        return rest_error(429, 50200, text)

    if kind == "unavailable":
        text = "The service is temporarily unavailable. Try again later."
        return replace(rest_error(503, 50300, text), headers=wait)

    if kind == "token_revoked":
        return not_authorized()

    status, text = PLAIN_ERRORS[kind]
    content_type = "text/html" if text.startswith("<") else "text/plain"
    return ErrorAnswer(status, text.encode(), content_type)


def parse_faults(
    spec: str | Iterable[str], *, base: FaultSettings | None = None
) -> FaultSettings:
    """Build FaultSettings from items such as `throttle=0.1`, `stall@1`, `seed=3`.

    Items are separated by commas or spaces, also within each string of an
    iterable, so a rule's time holds neither. `kind@N` fires on attempt N of every
    window, `kind@*` on every attempt, `kind@N@2024-02-16T09:00:00Z` on attempt N of
    the window starting then. `retry_after`, `stall_seconds`, `first_byte_seconds`
    and `seed` set numbers >= 0, whole for `retry_after` and `seed`. Raises
    ValueError naming the bad item.
    """
    texts = [spec] if isinstance(spec, str) else list(spec)
    items = [item for text in texts for item in re.split(r"[,\s]+", text)]
    settings = base or FaultSettings()
    rates = dict(settings.rates)
    rules = list(settings.rules)
    numbers: dict[str, float] = {}
    for item in filter(None, (item.strip() for item in items)):
        try:
            _parse_item(item, rates, rules, numbers)
        except ValueError as error:
            raise ValueError(f"bad fault {item!r}: {error}") from None

    try:
        return _with_items(settings, rates, rules, numbers)
    except ValueError as error:
        raise ValueError(f"bad faults: {error}") from None


def _with_items(
    settings: FaultSettings,
    rates: dict[str, float],
    rules: list[FaultRule],
    numbers: dict[str, float],
) -> FaultSettings:
    return replace(
        settings,
        rates=rates,
        rules=tuple(rules),
        retry_after_seconds=int(
            numbers.get("retry_after", settings.retry_after_seconds)
        ),
        stall_seconds=numbers.get("stall_seconds", settings.stall_seconds),
        first_byte_seconds=numbers.get(
            "first_byte_seconds", settings.first_byte_seconds
        ),
        seed=int(numbers.get("seed", settings.seed)),
    )


def _parse_item(
    item: str,
    rates: dict[str, float],
    rules: list[FaultRule],
    numbers: dict[str, float],
) -> None:
    if "@" in item:
        rules.append(_parse_rule(item))
        return

    name, equals, value = item.partition("=")
    if not equals:
        raise ValueError("expected kind=rate, kind@attempt or name=number")

    if name in NUMBERS:
        numbers[name] = _number(name, value)
        return

    _check_kind(name)
    rate = _float(value, f"{name}'s rate")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate {rate} is outside 0.0-1.0")

    rates[name] = rate


def _parse_rule(item: str) -> FaultRule:
    kind, _, rest = item.partition("@")
    _check_kind(kind)
    attempt_text, _, start_text = rest.partition("@")
    if attempt_text != "*" and not attempt_text.isdigit():
        raise ValueError(
            f"attempt {attempt_text!r} is not a number: write {kind}@1 (the first "
            f"attempt) or {kind}@* (every attempt)"
        )

    attempt = None if attempt_text == "*" else int(attempt_text)
    if attempt is not None and attempt < 1:
        raise ValueError("attempts count from 1")

    start = parse_time(start_text) if start_text else None
    return FaultRule(kind, attempt, start)


def _float(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a number") from None


def _number(name: str, text: str) -> float:
    number = _float(text, name)
    _check_number(name, number)
    if name in WHOLE_NUMBERS and not number.is_integer():
        raise ValueError(f"{name} {number:g} is not a whole number")

    return number


def _check_number(name: str, number: float) -> None:
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"{name} {number:g} is not a finite number >= 0")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(
            f"unknown fault kind {kind!r}; expected one of {', '.join(KINDS)}"
        )
