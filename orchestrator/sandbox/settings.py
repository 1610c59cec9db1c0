"""The sandbox's switches: one frozen value, buildable from a flat dict of strings."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from orchestrator.sandbox.faults import FaultSettings, parse_faults

EmptyWindow = Literal["header", "empty", "204"]
Newline = Literal["lf", "crlf"]
Transfer = Literal["chunked", "length"]
CapBehaviour = Literal["cut", "error"]
Shape = Literal["a", "b", "garbage"]

TRUE_WORDS = frozenset(("1", "true", "yes", "on"))
FALSE_WORDS = frozenset(("0", "false", "no", "off"))
NONE_WORDS = frozenset(("", "none", "off", "null"))
NEWLINES = {"lf": "\n", "crlf": "\r\n"}
LEAST: dict[str, int] = {  # where 0 is impossible; every other number may be 0
    "token_lifetime_seconds": 1,
    "cap_bytes": 1,
    "max_concurrent_downloads": 1,
    "bandwidth_bytes_per_second": 1,
}
MOST: dict[str, float] = {  # beyond these a typo would take the machine's memory
    "rows_per_hour": 1_000_000,
    "token_lifetime_seconds": 86_400,
    "first_byte_seconds": 3_600,
    "cache_megabytes": 16_384,
}
KIND_NAMES: dict[object, str] = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "text",
}


@dataclass(frozen=True, slots=True)
class SandboxSettings:
    """How the sandbox answers; every unconfirmed API behaviour is a switch here.

    end_inclusive: a download's `end` is inclusive (t <= end) instead of t < end.
    empty_window: an empty result is a header-only file, an empty body or a 204.
    transfer: chunked transfer encoding or a Content-Length.
    honour_accept_encoding: False answers identity whatever the client accepts.
    deflate_raw: `deflate` answers raw DEFLATE instead of the zlib wrapping.
    false_encoding: claim Content-Encoding gzip but send the plain bytes.
    cap_bytes: a download body reaching this many bytes (as sent, compressed or not)
    is cut there with complete framing ("cut") or refused with 400 10006 ("error").
    max_concurrent_downloads: past it a download gets 429 errorcode 50200.
    first_byte_seconds: delay before every download's headers.
    bandwidth_bytes_per_second: per connection, for download bodies.
    estimate_shape, freshness_shape: field names "a" or "b", or unparseable.
    cache_megabytes: memory for rendered hours; raise it for large benchmarks.
    rest_url_override: the rest_instance_url the token answer gives instead of
    the sandbox's own (to play a tampered answer).

    Numbers are finite and >= 0; a token lifetime, a cap, a concurrency limit and a
    bandwidth are >= 1 (None, where allowed, means no limit).
    """

    seed: int = 7
    rows_per_hour: int = 200
    end_inclusive: bool = False
    empty_window: EmptyWindow = "header"
    newline: Newline = "lf"
    bom: bool = False
    client_id: str = "sandbox-client"
    client_secret: str = field(default="sandbox-secret", repr=False)
    token_lifetime_seconds: int = 1080
    history_lag_seconds: int = 1200
    transfer: Transfer = "chunked"
    honour_accept_encoding: bool = True
    deflate_raw: bool = False
    false_encoding: bool = False
    cap_bytes: int | None = None
    cap_behaviour: CapBehaviour = "cut"
    max_concurrent_downloads: int | None = None
    first_byte_seconds: float = 0.0
    bandwidth_bytes_per_second: int | None = None
    estimate_shape: Shape = "a"
    freshness_shape: Shape = "a"
    cache_megabytes: int = 256
    rest_url_override: str | None = None
    faults: FaultSettings = field(default_factory=FaultSettings)

    def __post_init__(self) -> None:
        for name, hint in _hints().items():
            value = getattr(self, name)
            expected = _expected(name, hint, value)
            if expected is not None:
                raise ValueError(_bad(name, value, expected))

    @property
    def line_ending(self) -> str:
        """The newline characters the files use."""
        return NEWLINES[self.newline]


def settings_from_options(options: Mapping[str, object]) -> SandboxSettings:
    """Build settings from a flat mapping of option names (dashes allowed) to values.

    Values may be strings as typed on a command line. `faults` takes a string such
    as "throttle=0.1,stall@1" (see faults.parse_faults), a list of such items or a
    FaultSettings. Raises ValueError with a one-line message naming the bad option.
    """
    hints = _hints()
    changes: dict[str, Any] = {}
    for key, value in options.items():
        name = key.replace("-", "_")
        if name not in hints:
            known = ", ".join(hints)
            raise ValueError(f"unknown sandbox option {key!r}; known options: {known}")

        changes[name] = _convert(name, hints[name], value)

    return SandboxSettings(**changes)


@functools.cache
def _hints() -> dict[str, object]:
    hints = typing.get_type_hints(SandboxSettings)
    return {item.name: hints[item.name] for item in dataclasses.fields(SandboxSettings)}


def _expected(name: str, hint: object, value: object) -> str | None:
    """What the field `name` should hold instead of `value`; None if it will do."""
    choices = _choices(hint)
    if choices:
        return None if value in choices else f"one of {', '.join(choices)}"

    if isinstance(value, bool) or not isinstance(value, int | float):
        return None

    if not math.isfinite(value):
        return "a finite number"

    least, most = LEAST.get(name, 0), MOST.get(name, math.inf)
    if value > most:
        return f"a number <= {most:,.0f}"

    return None if value >= least else f"a number >= {least}"


def _choices(hint: object) -> tuple[str, ...]:
    if typing.get_origin(hint) is Literal:
        return tuple(str(choice) for choice in typing.get_args(hint))

    return ()


def _convert(name: str, hint: object, value: object) -> object:
    if hint is FaultSettings:
        return _faults(name, value)

    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in NONE_WORDS):
            return None

        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))

    choices = _choices(hint)
    if choices:
        return _choice(name, value, choices)

    try:
        return _scalar(hint, value)
    except (TypeError, ValueError):
        expected = KIND_NAMES.get(hint, str(hint))
        raise ValueError(_bad(name, value, expected)) from None


def _scalar(hint: object, value: object) -> object:
    if hint is bool:
        return _boolean(value)

    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise TypeError(value)

    if hint is int:
        return int(value) if isinstance(value, int | str) else _whole(value)

    if hint is float:
        return float(value)

    return str(value)


def _whole(value: float) -> int:
    if not value.is_integer():
        raise ValueError(value)

    return int(value)


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value

    text = str(value).strip().lower()
    if text in TRUE_WORDS | FALSE_WORDS:
        return text in TRUE_WORDS

    raise ValueError(value)


def _choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    text = str(value).strip().lower()
    if text not in choices:
        raise ValueError(_bad(name, value, f"one of {', '.join(choices)}"))

    return text


def _faults(name: str, value: object) -> FaultSettings:
    if isinstance(value, FaultSettings):
        return value

    if isinstance(value, str) or (
        isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
    ):
        return parse_faults(value)

    raise ValueError(_bad(name, value, 'a string such as "throttle=0.1,stall@1"'))


def _bad(name: str, value: object, expected: str) -> str:
    return f"sandbox option {name!r}: expected {expected}, got {value!r}"
