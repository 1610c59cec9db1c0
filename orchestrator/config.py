"""Build a run's settings once, from the TOML config, the flags and the environment.

Flags override the config file; credentials come only from the environment. Every
problem is a ``UsageError`` naming the file, the key or the flag, and what is allowed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import hashlib
import logging
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from orchestrator import sfmc
from orchestrator.errors import UsageError
from orchestrator.planner import MAX_SPAN, MIN_SPAN
from orchestrator.timeparse import load_zone, parse_duration, parse_time

MAX_CONCURRENCY = 64
COMPRESSIONS = ("gzip", "deflate", "none")
_T = TypeVar("_T")
logger = logging.getLogger(__name__)

# The config file's keys by section, each with the type its value must have.
CONFIG_KEYS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "export": {
        "start": str,
        "end": str,
        "output": str,
        "format": str,
        "columns": list,
        "window": str,
        "concurrency": int,
        "compression": str,
        "keep_parts": bool,
        "allow_unknown_values": bool,
        "estimate": bool,
        "safety_cap_mb": (int, float),
        "min_window": str,
        "retained_only": bool,
        "history_lag_fallback_seconds": (int, float),
        "tz": str,
        "last": str,
        "max_duration": str,
        "state_file": str,
    },
    "filters": {
        "statuses": list,
        "activity_types": list,
        "definition_ids": list,
        "definition_instance_ids": list,
        "activity_ids": list,
        "contact_keys_file": str,
    },
    "retry": {
        "max_attempts": int,
        "max_wait_seconds": (int, float),
        "backoff_initial_seconds": (int, float),
        "backoff_max_seconds": (int, float),
    },
    "http": {
        "connect_timeout_seconds": (int, float),
        "read_timeout_seconds": (int, float),
        "ca_bundle": str,
        "allowed_domains": list,
    },
    "credentials": {
        "file": str,
    },
}
CREDENTIAL_NAMES = (
    "SFMC_CLIENT_ID",
    "SFMC_CLIENT_SECRET",
    "SFMC_AUTH_URL",
    "SFMC_ACCOUNT_ID",
)
MAX_KEY_LENGTH = 1024


@dataclass(frozen=True, slots=True)
class ExportRequest:
    """What is asked of the server: format, columns and filters (body key to values)."""

    format: str = "csv"
    columns: tuple[str, ...] = sfmc.DEFAULT_COLUMNS
    filters: tuple[tuple[str, tuple[str, ...]], ...] = ()
    contact_keys: tuple[str, ...] = field(default=(), repr=False)

    def body_filters(self) -> dict[str, list[str]]:
        """The filter arrays of the JSON body."""
        body = {key: list(values) for key, values in self.filters}
        if self.contact_keys:
            body["contactKeys"] = list(self.contact_keys)
        return body

    def identity(self) -> dict[str, Any]:
        """What the manifest records; contact keys only as a count and a digest."""
        digest = hashlib.sha256("\n".join(self.contact_keys).encode()).hexdigest()
        return {
            "format": self.format,
            "columns": list(self.columns),
            "filters": {key: list(values) for key, values in self.filters},
            "contact_keys": {"count": len(self.contact_keys), "sha256": digest},
        }

    @property
    def delimiter(self) -> str:
        return "\t" if self.format == "tsv" else ","


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """How often and how long one window is retried; seconds throughout."""

    max_attempts: int = 8
    max_wait_seconds: float = 1800.0
    backoff_initial_seconds: float = 1.0
    backoff_max_seconds: float = 120.0


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """Timeouts in seconds (the read timeout is the longest silence between chunks),
    the CA bundle to verify TLS with, and the domains a token may be sent to."""

    connect_timeout_seconds: float = 30.0
    read_timeout_seconds: float = 120.0
    ca_bundle: str | None = None
    allowed_domains: tuple[str, ...] = ("marketingcloudapis.com",)


@dataclass(frozen=True, slots=True)
class Credentials:
    """Client credentials from the environment; the secret never shows in a repr."""

    client_id: str
    client_secret: str = field(repr=False)
    auth_url: str
    account_id: str | None = None


@dataclass(frozen=True, slots=True)
class RunSettings:
    """Everything one export needs, built once and passed down."""

    start: dt.datetime
    end: dt.datetime
    output: Path
    request: ExportRequest
    window: dt.timedelta = dt.timedelta(hours=1)
    concurrency: int = 5
    compression: str = "gzip"
    keep_parts: bool = False
    restart: bool = False
    range_as_given: tuple[str, str] | None = None
    estimate: bool = True
    cap_bytes: int = 900_000_000
    min_window: dt.timedelta = dt.timedelta(minutes=1)
    retained_only: bool = False
    history_lag_fallback_seconds: float = 7200.0
    max_duration: dt.timedelta | None = None
    redo: tuple[str, ...] = ()
    retry: RetrySettings = RetrySettings()
    http: HttpSettings = HttpSettings()


def load_config(path: Path | None) -> dict[str, dict[str, Any]]:
    """Read and check a TOML config; an absent path gives an empty config."""
    if path is None:
        return {}

    try:
        with path.open("rb") as stream:
            data = tomllib.load(stream)
    except FileNotFoundError:
        raise UsageError(f"config {path}: no such file") from None
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise UsageError(f"config {path}: cannot be read as TOML: {error}") from None

    _check_config(path, data)
    return data


def _check_config(path: Path, data: Mapping[str, Any]) -> None:
    for section, values in data.items():
        if section == "sandbox":
            continue  # the sandbox command checks its own table
        if section not in CONFIG_KEYS:
            raise UsageError(
                f"config {path}: unknown section [{section}]"
                f"{_suggest(section, CONFIG_KEYS)}; "
                f"allowed: {', '.join(CONFIG_KEYS)}"
            )
        if not isinstance(values, dict):
            raise UsageError(f"config {path}: [{section}] must be a table")

        for key, value in values.items():
            _check_config_value(path, section, key, value)


def _check_config_value(path: Path, section: str, key: str, value: Any) -> None:
    allowed = CONFIG_KEYS[section]
    if key not in allowed:
        raise UsageError(
            f"config {path}: unknown key {section}.{key}{_suggest(key, allowed)}; "
            f"allowed in [{section}]: {', '.join(allowed)}"
        )

    expected = allowed[key]
    wrong_bool = isinstance(value, bool) and expected is not bool
    if wrong_bool or not isinstance(value, expected):
        names = expected if isinstance(expected, tuple) else (expected,)
        wanted = " or ".join(_TOML_TYPE_NAMES[kind] for kind in names)
        raise UsageError(
            f"config {path}: {section}.{key} must be {wanted}, "
            f"not {type(value).__name__} {value!r}"
        )


_TOML_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list",
}


def _suggest(value: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(value, list(choices), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def check_choices(
    values: Sequence[str],
    allowed: Sequence[str],
    *,
    name: str,
    allow_unknown: bool = False,
    ignore_case: bool = False,
) -> tuple[str, ...]:
    """Return ``values`` spelled as in ``allowed``, or raise naming the unknown one."""
    by_key = {(item.lower() if ignore_case else item): item for item in allowed}
    checked: list[str] = []
    for value in values:
        key = value.lower() if ignore_case else value
        if key in by_key:
            checked.append(by_key[key])
        elif allow_unknown:
            checked.append(value)
        else:
            raise UsageError(
                f"{name} {value!r} is not documented{_suggest(value, allowed)}; "
                f"see 'journey-export values {name}', or pass "
                "--allow-unknown-values to send it anyway"
            )
    return tuple(checked)


def load_credentials(
    env: Mapping[str, str],
    config: Mapping[str, Mapping[str, Any]],
    config_path: Path | None = None,
) -> Credentials:
    """Credentials from the environment, completed by ``credentials.file`` if named.

    A config or credentials file that other users can read draws a warning.
    """
    if config_path is not None:
        warn_if_shared(config_path)
    name = config.get("credentials", {}).get("file")
    if not name:
        return credentials_from_env(env)

    path = Path(name).expanduser()
    warn_if_shared(path)
    return credentials_from_env({**read_credentials_file(path), **env})


def warn_if_shared(path: Path) -> None:
    """Warn when ``path`` is readable or writable by users other than its owner."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return
    if mode & 0o077:
        logger.warning(
            "%s is open to other users (mode %o); run: chmod 600 %s", path, mode, path
        )


def read_credentials_file(path: Path) -> dict[str, str]:
    """Read ``NAME=value`` lines (SFMC_CLIENT_ID ...); values are never shown."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise UsageError(f"credentials file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"credentials file {path}: not UTF-8 text") from None

    found: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        key, sep, value = text.partition("=")
        key = key.strip().removeprefix("export ").strip()
        if not sep or key not in CREDENTIAL_NAMES:
            raise UsageError(
                f"credentials file {path}, line {number}: expected NAME=value with "
                f"NAME one of {', '.join(CREDENTIAL_NAMES)}"
            )
        found[key] = value.strip().strip("'\"")
    return found


def credentials_from_env(env: Mapping[str, str]) -> Credentials:
    """Read SFMC_CLIENT_ID, SFMC_CLIENT_SECRET, SFMC_AUTH_URL and SFMC_ACCOUNT_ID."""
    missing = [
        name
        for name in ("SFMC_CLIENT_ID", "SFMC_CLIENT_SECRET", "SFMC_AUTH_URL")
        if not env.get(name)
    ]
    if missing:
        raise UsageError(
            f"{', '.join(missing)} not set: export the API integration's credentials "
            "in the environment (see README, 'Configuration')"
        )

    return Credentials(
        client_id=env["SFMC_CLIENT_ID"],
        client_secret=env["SFMC_CLIENT_SECRET"],
        auth_url=env["SFMC_AUTH_URL"].rstrip("/"),
        account_id=env.get("SFMC_ACCOUNT_ID") or None,
    )


def read_contact_keys(path: Path) -> tuple[str, ...]:
    """Read one contact key per line; blank lines are skipped, keys are not logged."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"contact keys file {path}: no such file") from None
    except UnicodeDecodeError as error:
        raise UsageError(
            f"contact keys file {path}: not UTF-8 (byte {error.start}); "
            "save it as UTF-8 text, one key per line"
        ) from None
    except OSError as error:
        raise UsageError(f"contact keys file {path}: {error.strerror}") from None

    keys = tuple(line.strip() for line in text.splitlines() if line.strip())
    for number, key in enumerate(keys, start=1):
        if len(key) > MAX_KEY_LENGTH or not key.isprintable():
            raise UsageError(
                f"contact keys file {path}: key {number} is longer than "
                f"{MAX_KEY_LENGTH} characters or holds control characters; "
                "write one plain key per line"
            )
    if not keys:
        raise UsageError(f"contact keys file {path}: holds no key")
    return keys


def build_settings(
    options: Mapping[str, Any],
    config: Mapping[str, Mapping[str, Any]],
    *,
    now: dt.datetime,
) -> RunSettings:
    """Merge flags (``options``, None where not given) over the config file."""
    merged = _merge(options, config)
    request = _build_request(merged)
    start, end = _build_range(merged, now)
    output = merged.get("output")
    if not output:
        raise UsageError("no output file: give --output PATH or export.output")
    max_duration = merged.get("max_duration")

    return RunSettings(
        start=start,
        end=end,
        output=render_output(str(output), start, end),
        request=request,
        window=_build_window(merged.get("window", "1h")),
        concurrency=_bounded_int(merged, "concurrency", 5, 1, MAX_CONCURRENCY),
        compression=_choice(merged, "compression", "gzip", COMPRESSIONS),
        keep_parts=bool(merged.get("keep_parts", False)),
        restart=bool(merged.get("restart", False)),
        range_as_given=_range_as_given(merged),
        estimate=bool(merged.get("estimate", True)),
        cap_bytes=_cap_bytes(merged),
        min_window=_build_window(merged.get("min_window", "1m"), name="min_window"),
        retained_only=bool(merged.get("retained_only", False)),
        max_duration=_duration(max_duration, "max_duration") if max_duration else None,
        redo=tuple(merged.get("redo") or ()),
        history_lag_fallback_seconds=_positive(
            merged, "history_lag_fallback_seconds", 7200.0
        ),
        retry=_build_dataclass(RetrySettings, config.get("retry", {})),
        http=_build_http(merged, config.get("http", {})),
    )


def _merge(
    options: Mapping[str, Any], config: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for section in ("export", "filters"):
        merged.update(config.get(section, {}))
    merged.update({key: value for key, value in options.items() if value is not None})
    return merged


def build_request(
    options: Mapping[str, Any], config: Mapping[str, Mapping[str, Any]]
) -> ExportRequest:
    """The request alone (format, columns, filters), checked as build_settings does."""
    return _build_request(_merge(options, config))


def _build_request(merged: Mapping[str, Any]) -> ExportRequest:
    unknown_ok = bool(merged.get("allow_unknown_values", False))
    fmt = _choice(merged, "format", "csv", sfmc.FORMATS)
    columns = _split_list(merged.get("columns", list(sfmc.DEFAULT_COLUMNS)))
    columns = list(check_choices(columns, sfmc.COLUMNS, name="column"))
    if len(set(columns)) != len(columns):
        raise UsageError("columns: a column is named twice; name each once")

    filters: list[tuple[str, tuple[str, ...]]] = []
    for name, body_key in sfmc.FILTER_KEYS.items():
        values = _split_list(merged.get(name) or [])
        if name == "statuses":
            values = list(
                check_choices(
                    values,
                    sfmc.STATUSES,
                    name="status",
                    allow_unknown=unknown_ok,
                    ignore_case=True,
                )
            )
        elif name == "activity_types":
            values = list(
                check_choices(
                    values,
                    sfmc.ACTIVITY_TYPES,
                    name="activity-type",
                    allow_unknown=unknown_ok,
                    ignore_case=True,
                )
            )
        if values and body_key != "contactKeys":
            filters.append((body_key, tuple(values)))

    keys_file = merged.get("contact_keys_file")
    keys = read_contact_keys(Path(keys_file)) if keys_file else ()
    return ExportRequest(fmt, tuple(columns), tuple(filters), keys)


def _split_list(value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    result: list[str] = []
    for item in items:
        result.extend(part.strip() for part in str(item).split(",") if part.strip())
    return result


def _build_range(
    merged: Mapping[str, Any], now: dt.datetime
) -> tuple[dt.datetime, dt.datetime]:
    zone = load_zone(str(merged["tz"])) if merged.get("tz") else dt.UTC
    last = merged.get("last")
    if last and merged.get("start"):
        raise UsageError("--last and --start both give the start: keep one")
    if not last and not merged.get("start"):
        raise UsageError("no time range: give --start (or --last), and --end")

    end = parse_time(str(merged.get("end") or "now"), now=now, name="end", zone=zone)
    if last:
        start = end - _duration(str(last), "last")
    else:
        start = parse_time(str(merged["start"]), now=now, name="start", zone=zone)
    if end <= start:
        raise UsageError(
            f"end {end.isoformat()} is not after start {start.isoformat()}"
        )
    return start, end


def _build_window(text: str, *, name: str = "window") -> dt.timedelta:
    span = parse_duration(str(text), name=name)
    if not MIN_SPAN <= span <= MAX_SPAN:
        raise UsageError(f"{name} {text!r} is out of range: use 1m to 1d")
    return span


def _range_as_given(merged: Mapping[str, Any]) -> tuple[str, str]:
    if merged.get("since_last"):
        return ("end of the last complete export", "now - history lag")
    start = merged.get("start") or f"end - {merged.get('last')}"
    end = merged.get("end") or "now"
    zone = merged.get("tz")
    return (f"{start} ({zone})", f"{end} ({zone})") if zone else (str(start), str(end))


def _duration(text: str, name: str) -> dt.timedelta:
    span = parse_duration(text, name=name)
    if span <= dt.timedelta(0):
        raise UsageError(f"{name} {text!r} must be longer than zero")
    return span


_TEMPLATE_FIELD = re.compile(r"\{(\w*)(?::([^{}]*))?\}")


def render_output(template: str, start: dt.datetime, end: dt.datetime) -> Path:
    """Fill ``{start:%Y%m%d}`` and ``{end:...}`` in an output name (UTC times).

    Only those two fields exist; a name that would climb out with ``..`` or holds a
    NUL byte is refused.
    """
    times = {"start": start, "end": end}

    def fill(match: re.Match[str]) -> str:
        name, pattern = match.group(1), match.group(2) or "%Y%m%dT%H%M%SZ"
        if name not in times:
            raise UsageError(
                f"output template {template!r}: unknown field {{{name}}}; "
                "use {start:%Y%m%d} or {end:%Y%m%d}"
            )
        return times[name].astimezone(dt.UTC).strftime(pattern)

    rendered = _TEMPLATE_FIELD.sub(fill, template)
    if "{" in rendered or "}" in rendered:
        raise UsageError(
            f"output template {template!r}: only {{start:FORMAT}} and {{end:FORMAT}} "
            "are filled in (FORMAT as strftime, e.g. %Y%m%d)"
        )
    path = Path(rendered)
    if "\0" in rendered or ".." in path.parts or not path.name:
        raise UsageError(
            f"output {rendered!r} is refused: a file name without '..' parts or NUL "
            "bytes is needed"
        )
    return path


def _cap_bytes(merged: Mapping[str, Any]) -> int:
    megabytes = _positive(merged, "safety_cap_mb", 900.0)
    if megabytes > 1000:
        raise UsageError(
            f"safety_cap_mb {megabytes:g} is above SFMC's 1,000 MB download limit; "
            "use at most 1000 (default 900)"
        )
    return int(megabytes * 1_000_000)


def _positive(merged: Mapping[str, Any], name: str, default: float) -> float:
    value = merged.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise UsageError(f"{name} {value!r} must be a number above 0")
    return float(value)


def _bounded_int(
    merged: Mapping[str, Any], name: str, default: int, low: int, high: int
) -> int:
    value = merged.get(name, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not low <= value <= high
    ):
        raise UsageError(f"{name} {value!r} is out of range: use {low} to {high}")
    return value


def _choice(
    merged: Mapping[str, Any], name: str, default: str, allowed: Sequence[str]
) -> str:
    value = str(merged.get(name, default))
    if value not in allowed:
        raise UsageError(
            f"{name} {value!r} is not allowed{_suggest(value, allowed)}; "
            f"use one of {', '.join(allowed)}"
        )
    return value


def _build_http(merged: Mapping[str, Any], table: Mapping[str, Any]) -> HttpSettings:
    timeouts = {k: v for k, v in table.items() if k.endswith("_seconds")}
    base = _build_dataclass(HttpSettings, timeouts)
    bundle = merged.get("ca_bundle") or table.get("ca_bundle")
    if bundle and not Path(bundle).is_file():
        raise UsageError(f"CA bundle {bundle}: no such file; give a PEM file of CAs")

    extra = [str(d).lower().strip(".") for d in merged.get("allow_domain") or []]
    extra += [str(d).lower().strip(".") for d in table.get("allowed_domains", [])]
    return dataclasses.replace(
        base,
        ca_bundle=str(bundle) if bundle else None,
        allowed_domains=(*base.allowed_domains, *extra),
    )


def _build_dataclass(kind: type[_T], values: Mapping[str, Any]) -> _T:
    known = {item.name for item in dataclasses.fields(kind)}  # type: ignore[arg-type]
    chosen = {key: value for key, value in values.items() if key in known}
    for key, value in chosen.items():
        if value <= 0:
            raise UsageError(f"{key} {value!r} must be above 0")
    return kind(**chosen)


def environment() -> Mapping[str, str]:
    """The process environment; a function so tests can pass their own."""
    return os.environ
