"""Build a run's settings once, from the TOML config and the flags.

Flags override the config file; credentials are not read here (``credentials``: the
environment, then the config's credentials file). Every
problem is a ``UsageError`` naming the file, the key or the flag, and what is allowed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import logging
import math
import os
import re
import reprlib
import ssl
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from orchestrator import sfmc
from orchestrator.configfile import LoadedConfig, suggest
from orchestrator.errors import UsageError
from orchestrator.parts import read_input_file
from orchestrator.planner import MAX_SPAN, MIN_SPAN
from orchestrator.timeparse import iso, load_zone, parse_duration, parse_time

MAX_CONCURRENCY = 64
NAME_MAX, PATH_MAX = 255, 4096  # Linux's limits, in bytes
MAX_WINDOWS = 100_000  # 30 days of 1-minute windows is 43,200
STATE_SUFFIXES = (".manifest.json", ".partial", ".lock")  # beside every output
_START_KEYS = frozenset({"start", "last"})  # a flag giving one overrides both
# How an error names a value of these keys (by default, by the key itself).
_ERROR_NAMES = {
    "columns": "column",
    "statuses": "status",
    "activity_types": "activity-type",
}
FLUSH_MB = 64  # MB appended to the output between two flushes to disk
FLUSH_BYTES = FLUSH_MB * 1_000_000
MIN_FLUSH_MB = 0.001
MAX_FLUSH_MB = 100_000
COMPRESSIONS = ("gzip", "deflate", "none")
_T = TypeVar("_T")

logger = logging.getLogger(__name__)

MAX_KEY_LENGTH = 1024
MAX_CONTACT_KEYS_BYTES = 100 * 2**20


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
    # Known already (a --since-last run's end was set by it): not asked again.
    history_lag_seconds: float | None = None
    max_duration: dt.timedelta | None = None
    gzip_output: bool = False
    redo: tuple[str, ...] = ()
    zone: dt.tzinfo = dt.UTC  # --tz: how dates without an offset are read
    flush_bytes: int = FLUSH_BYTES
    retry: RetrySettings = RetrySettings()
    http: HttpSettings = HttpSettings()


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
                f"{name} {reprlib.repr(value)} is not documented"
                f"{suggest(value, allowed)}; "
                f"see 'journey-export values {name}', or pass "
                "--allow-unknown-values to send it anyway"
            )

    return tuple(checked)


def read_contact_keys(path: Path) -> tuple[str, ...]:
    """Read one contact key per line; blank lines are skipped, keys are not logged."""
    try:
        data = read_input_file(path, limit=MAX_CONTACT_KEYS_BYTES)
        text = data.decode("utf-8-sig")
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
    with _naming_the_config_key(options, config):
        return _build_settings(_merge(options, config), config, now)


def _build_settings(
    merged: Mapping[str, Any], config: Mapping[str, Mapping[str, Any]], now: dt.datetime
) -> RunSettings:
    request = _build_request(merged)
    zone = _zone(merged)
    start, end = _build_range(merged, now, zone)
    output = merged.get("output")
    if not output:
        raise UsageError("no output file: give --output PATH or export.output")

    max_duration = merged.get("max_duration")
    window = _window_for(start, end, merged.get("window", "1h"))
    min_window = _build_window(merged.get("min_window", "1m"), name="min_window")
    if min_window > window:
        raise UsageError(
            f"min_window {merged.get('min_window')!r} is longer than the window span "
            f"{merged.get('window', '1h')!r}: no window could ever be split; give "
            "--min-window at most --window"
        )

    return RunSettings(
        start=start,
        end=end,
        output=render_output(os.path.expanduser(str(output)), start, end),
        request=request,
        window=window,
        concurrency=_bounded_int(merged, "concurrency", 5, 1, MAX_CONCURRENCY),
        compression=_choice(merged, "compression", "gzip", COMPRESSIONS),
        keep_parts=bool(merged.get("keep_parts", False)),
        restart=bool(merged.get("restart", False)),
        range_as_given=_range_as_given(merged),
        estimate=bool(merged.get("estimate", True)),
        cap_bytes=_cap_bytes(merged),
        flush_bytes=_flush_bytes(merged),
        min_window=min_window,
        retained_only=bool(merged.get("retained_only", False)),
        max_duration=_duration(max_duration, "max_duration") if max_duration else None,
        redo=tuple(merged.get("redo") or ()),
        zone=zone,
        gzip_output=bool(merged.get("gzip")) or str(output).endswith(".gz"),
        history_lag_fallback_seconds=_positive(
            merged, "history_lag_fallback_seconds", 7200.0, sfmc.MAX_LAG_SECONDS
        ),
        retry=_build_retry(config.get("retry", {})),
        http=_build_http(merged, config.get("http", {})),
    )


def _merge(
    options: Mapping[str, Any], config: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    merged = {
        key: config[section][key]
        for key, section in _from_file(options, config).items()
        if section in ("export", "filters")
    }
    merged.update({key: value for key, value in options.items() if value is not None})
    return merged


def _from_file(
    options: Mapping[str, Any], config: Mapping[str, Mapping[str, Any]]
) -> dict[str, str]:
    """Each key the config file sets and no flag overrides, with its section.

    A flag giving the start (``--start`` or ``--last``) overrides both start keys.
    """
    given = {key for key, value in options.items() if value is not None}
    if given & _START_KEYS:
        given |= _START_KEYS

    return {
        key: section
        for section in ("export", "filters", "retry", "http")
        for key in config.get(section, {})
        if key not in given
    }


@contextlib.contextmanager
def _naming_the_config_key(
    options: Mapping[str, Any], config: Mapping[str, Mapping[str, Any]]
) -> Iterator[None]:
    """Add to a bad value's error where the config file set it, if it did."""
    try:
        yield
    except UsageError as error:
        source = config.source if isinstance(config, LoadedConfig) else None
        for key, section in _from_file(options, config).items():
            named = _ERROR_NAMES.get(key, key)
            if source and str(error).startswith((f"{named} ", f"{named}:")):
                raise UsageError(
                    f"{error} (config {source}: {section}.{key})"
                ) from None

        raise


def build_request(
    options: Mapping[str, Any], config: Mapping[str, Mapping[str, Any]]
) -> ExportRequest:
    """The request alone (format, columns, filters), checked as build_settings does."""
    with _naming_the_config_key(options, config):
        return _build_request(_merge(options, config))


def _build_request(merged: Mapping[str, Any]) -> ExportRequest:
    unknown_ok = bool(merged.get("allow_unknown_values", False))
    fmt = _choice(merged, "format", "csv", sfmc.FORMATS)
    columns = _split_list(merged.get("columns", list(sfmc.DEFAULT_COLUMNS)), "columns")
    columns = list(
        check_choices(columns, sfmc.COLUMNS, name="column", allow_unknown=unknown_ok)
    )
    if not columns:
        raise UsageError("columns: none given; name at least one (see 'values column')")

    twice = sorted({column for column in columns if columns.count(column) > 1})
    if twice:
        raise UsageError(f"columns: {', '.join(twice)} named twice; name each once")

    filters: list[tuple[str, tuple[str, ...]]] = []
    for name, body_key in sfmc.FILTER_KEYS.items():
        given = merged.get(name)
        values = _split_list(given or [], name)
        named_nothing = given is not None and given != [] and not values
        if named_nothing and name != "contact_keys":  # [] in a config: no filter
            raise UsageError(
                f"{name}: the value given names nothing; drop it or name one"
            )

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
    keys = read_contact_keys(Path(keys_file).expanduser()) if keys_file else ()
    return ExportRequest(fmt, tuple(columns), tuple(filters), keys)


def _split_list(value: Any, name: str) -> list[str]:
    """Comma-separated and repeated values as one list; an empty one is refused."""
    items = value if isinstance(value, list) else [value]
    result = [part.strip() for item in items for part in str(item).split(",")]
    if "" in result and any(result):
        raise UsageError(
            f"{name}: an empty name between commas in {value!r}; remove the extra comma"
        )

    return [part for part in result if part]


def _zone(merged: Mapping[str, Any]) -> dt.tzinfo:
    return load_zone(str(merged["tz"])) if merged.get("tz") else dt.UTC


def _build_range(
    merged: Mapping[str, Any], now: dt.datetime, zone: dt.tzinfo
) -> tuple[dt.datetime, dt.datetime]:
    last = merged.get("last")
    if last and merged.get("start"):
        raise UsageError("--last and --start both give the start: keep one")

    if not last and not merged.get("start"):
        raise UsageError(
            "no time range: give --start or --last (--end defaults to now)"
        )

    end = parse_time(str(merged.get("end") or "now"), now=now, name="end", zone=zone)
    if last:
        try:
            start = end - _duration(str(last), "last")
        except OverflowError:
            raise UsageError(
                f"last {last!r} before {iso(end)} reaches before year 1: give "
                "a range within SFMC's retention"
            ) from None
    else:
        start = parse_time(str(merged["start"]), now=now, name="start", zone=zone)

    # The API speaks milliseconds: a finer range would be requested floored but
    # checked exact, and a row at the edge could land in the wrong window.
    start, end = _whole_millis(start), _whole_millis(end)
    if end <= start:
        raise UsageError(f"end {iso(end)} is not after start {iso(start)}")

    if end > now:
        raise UsageError(
            f"end {iso(end)} is in the future (now is "
            f"{iso(now.replace(microsecond=0))}): leave --end out to export up to now"
        )

    return start, end


def _whole_millis(moment: dt.datetime) -> dt.datetime:
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def _build_window(text: str, *, name: str = "window") -> dt.timedelta:
    span = parse_duration(str(text), name=name)
    if not MIN_SPAN <= span <= MAX_SPAN:
        raise UsageError(f"{name} {text!r} is out of range: use 1m to 1d")

    return span


# The most an output's name and path grow by in the files kept beside and under it:
# "PATH.manifest.json.tmp", and "PATH.parts/<start>Z_<end>Z.part.kept".
NAME_GROWTH = len(".manifest.json.tmp")
PATH_GROWTH = len(".parts/20261203T050000Z_20261203T060000Z.part.kept")


def _check_name_length(path: Path) -> None:
    """Refuse a name too long for the files kept beside and under it (NAME_MAX,
    PATH_MAX)."""
    name_bytes = len(os.fsencode(path.name)) + NAME_GROWTH
    path_bytes = len(os.fsencode(path.absolute())) + PATH_GROWTH
    if name_bytes > NAME_MAX or path_bytes >= PATH_MAX:
        raise UsageError(
            f"output name {path.name[:40]!r}... is too long: for the files kept "
            f"beside it, a name must stay within {NAME_MAX - NAME_GROWTH} bytes and "
            f"the whole path within {PATH_MAX - PATH_GROWTH - 1}; choose a shorter one"
        )


def _window_for(start: dt.datetime, end: dt.datetime, text: str) -> dt.timedelta:
    """The window span, if it cuts the range into no more than MAX_WINDOWS."""
    span = _build_window(text)
    count = math.ceil((end - start) / span)
    if count > MAX_WINDOWS:
        raise UsageError(
            f"window {text!r} cuts {iso(start)} to {iso(end)} into "
            f"{count:,} windows, more than {MAX_WINDOWS:,}: shorten the range (SFMC "
            "keeps 30 days) or widen --window"
        )

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

    Only those two fields exist; the name is then checked as
    :func:`check_output_path` does.
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

    if not template.isprintable():
        raise UsageError("output name holds control characters; write a plain path")

    rendered = _TEMPLATE_FIELD.sub(fill, template)
    if "{" in rendered or "}" in rendered:
        raise UsageError(
            f"output template {template!r}: only {{start:FORMAT}} and {{end:FORMAT}} "
            "are filled in (FORMAT as strftime, e.g. %Y%m%d)"
        )

    return check_output_path(rendered)


def check_output_path(rendered: str) -> Path:
    """Refuse an output that names a folder, climbs out with ``..``, is too long for
    its state files beside it, or is named like one of them."""
    path = Path(rendered)
    if rendered.endswith(("/", os.sep)):
        raise UsageError(
            f"output {rendered!r} ends with '/': name a file, not a folder"
        )

    if ".." in path.parts or not path.name:
        raise UsageError(
            f"output {rendered!r} is refused: --output must name a file, without "
            "'..' parts; write the path from / or down from the working folder"
        )

    _check_name_length(path)
    if path.is_dir():
        raise UsageError(f"output {rendered!r} is a folder: name a file in it")

    folder = path.parent
    in_parts = (
        folder.name.endswith(".parts")
        and folder.with_name(
            folder.name.removesuffix(".parts") + ".manifest.json"
        ).exists()
    )
    if path.name.endswith(STATE_SUFFIXES) or in_parts:
        raise UsageError(
            f"output {rendered!r} is named like an export's own state (a name ending "
            f"in {', '.join(STATE_SUFFIXES)}, or in an export's .parts folder): name "
            "it plainly"
        )

    return path


def _cap_bytes(merged: Mapping[str, Any]) -> int:
    megabytes = _positive(merged, "safety_cap_mb", 900.0)
    if megabytes < 1:
        raise UsageError(f"safety_cap_mb {megabytes:g} is too small: use 1 to 1000")

    if megabytes > 1000:
        raise UsageError(
            f"safety_cap_mb {megabytes:g} is above SFMC's 1,000 MB download limit; "
            "use at most 1000 (default 900)"
        )

    return int(megabytes * 1_000_000)


def _flush_bytes(merged: Mapping[str, Any]) -> int:
    megabytes = merged.get("flush_mb", FLUSH_MB)
    if not _finite_positive(megabytes) or not MIN_FLUSH_MB <= megabytes <= MAX_FLUSH_MB:
        raise UsageError(
            f"flush_mb {megabytes!r} is out of range: give a number of MB from "
            f"{MIN_FLUSH_MB:g} to {MAX_FLUSH_MB:g} (default {FLUSH_MB})"
        )

    return int(megabytes * 1_000_000)


def _positive(
    merged: Mapping[str, Any], name: str, default: float, highest: float = math.inf
) -> float:
    return float(_in_range(name, merged.get(name, default), highest=highest))


def _in_range(
    name: str, value: Any, *, lowest: float = 0, highest: float = math.inf
) -> Any:
    """``value`` if it is a finite number above 0, at least ``lowest`` (when above
    0) and at most ``highest``; else a UsageError saying so."""
    if not _finite_positive(value) or value < lowest or value > highest:
        least = f"from {lowest:,g}" if lowest else "above 0"
        upto = f", at most {highest:,.15g}" if math.isfinite(highest) else ""
        raise UsageError(
            f"{name} {value!r} is out of range: use a number {least}{upto}"
        )

    return value


def _finite_positive(value: Any) -> bool:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and math.isfinite(value) and value > 0


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
            f"{name} {value!r} is not allowed{suggest(value, allowed)}; "
            f"use one of {', '.join(allowed)}"
        )

    return value


def _build_http(merged: Mapping[str, Any], table: Mapping[str, Any]) -> HttpSettings:
    timeouts = {k: v for k, v in table.items() if k.endswith("_seconds")}
    base = _build_dataclass(HttpSettings, timeouts)
    bundle = merged.get("ca_bundle") or table.get("ca_bundle")
    if bundle:
        bundle = Path(bundle).expanduser()
        _check_ca_bundle(bundle)

    extra = [str(d).lower().strip(".") for d in merged.get("allow_domain") or []]
    extra += [str(d).lower().strip(".") for d in table.get("allowed_domains", [])]
    for domain in extra:
        if "." not in domain or not domain.replace(".", "").replace("-", "").isalnum():
            raise UsageError(
                f"allowed domain {domain!r} is refused: give a full domain such as "
                "example.com (not a top-level domain or a pattern)"
            )

    return dataclasses.replace(
        base,
        ca_bundle=str(bundle) if bundle else None,
        allowed_domains=(*base.allowed_domains, *extra),
    )


def _check_ca_bundle(path: Path) -> None:
    if not path.is_file():
        raise UsageError(f"CA bundle {path}: not a file; give a PEM file of CAs")

    try:
        ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, ValueError) as error:
        raise UsageError(
            f"CA bundle {path} holds no usable certificate ({error}); give a PEM file"
        ) from None


# The most each retry and timeout setting may be: beyond these a run would wait so
# long that it only looks hung.
_HIGHEST = {
    "max_attempts": 100,
    "max_wait_seconds": 7 * 86400,
    "backoff_initial_seconds": 3600,
    "backoff_max_seconds": 3600,
    "connect_timeout_seconds": 3600,
    "read_timeout_seconds": 86400,
}


# A timeout below a tenth of a second only fails healthy requests over and over.
_LOWEST = {"connect_timeout_seconds": 0.1, "read_timeout_seconds": 0.1}


def _build_dataclass(kind: type[_T], values: Mapping[str, Any]) -> _T:
    known = {item.name for item in dataclasses.fields(kind)}  # type: ignore[arg-type]
    chosen = {key: value for key, value in values.items() if key in known}
    for key, value in chosen.items():
        _in_range(key, value, lowest=_LOWEST.get(key, 0), highest=_HIGHEST[key])

    return kind(**chosen)


def _build_retry(table: Mapping[str, Any]) -> RetrySettings:
    retry = _build_dataclass(RetrySettings, table)
    if retry.backoff_initial_seconds > retry.backoff_max_seconds:
        raise UsageError(
            f"backoff_initial_seconds {retry.backoff_initial_seconds:g} is above "
            f"backoff_max_seconds {retry.backoff_max_seconds:g}: the first wait "
            "cannot be longer than the longest"
        )

    return retry
