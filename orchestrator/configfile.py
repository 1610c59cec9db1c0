"""The TOML config file: read it, and refuse unknown sections, keys and wrong types
naming the file, the key and what is allowed."""

from __future__ import annotations

import datetime as dt
import difflib
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from orchestrator.errors import UsageError
from orchestrator.parts import read_input_file

MAX_CONFIG_BYTES = 2**20  # a device named as the config would never end

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
        "gzip": bool,
        "allow_unknown_values": bool,
        "estimate": bool,
        "safety_cap_mb": (int, float),
        "flush_mb": (int, float),
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


class LoadedConfig(dict[str, dict[str, Any]]):
    """A config's sections, and the file they were read from (to name in errors)."""

    source: Path | None = None


def load_config(path: Path | None) -> LoadedConfig:
    """Read and check a TOML config; an absent path gives an empty config."""
    config = LoadedConfig()
    if path is None:
        return config

    try:
        data = tomllib.loads(read_input_file(path, limit=MAX_CONFIG_BYTES).decode())
    except FileNotFoundError:
        raise UsageError(f"config {path}: no such file") from None
    except OSError as error:
        raise UsageError(
            f"config {path}: {error.strerror or error}; give a TOML file"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"config {path}: cannot be read as TOML: {error}") from None
    except UnicodeDecodeError:
        raise UsageError(f"config {path}: not UTF-8 text; save it as UTF-8") from None

    _check_config(path, data)
    config.update(data)
    config.source = path
    return config


def _check_config(path: Path, data: Mapping[str, Any]) -> None:
    for section, values in data.items():
        if section == "sandbox":
            continue  # the sandbox command checks its own table

        if section not in CONFIG_KEYS:
            raise UsageError(
                f"config {path}: unknown section [{section}]"
                f"{suggest(section, CONFIG_KEYS)}; "
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
            f"config {path}: unknown key {section}.{key}{suggest(key, allowed)}; "
            f"allowed in [{section}]: {', '.join(allowed)}"
        )

    expected = allowed[key]
    wrong_bool = isinstance(value, bool) and expected is not bool
    if wrong_bool or not isinstance(value, expected):
        names = expected if isinstance(expected, tuple) else (expected,)
        wanted = " or ".join(_TOML_TYPE_NAMES[kind] for kind in names)
        hint = " (put the time in quotes)" if isinstance(value, dt.date) else ""
        raise UsageError(
            f"config {path}: {section}.{key} must be {wanted}, "
            f"not {type(value).__name__} {value!r}{hint}"
        )

    if isinstance(value, str) and not value.strip():
        raise UsageError(
            f"config {path}: {section}.{key} is empty: give a value or remove the line"
        )

    if isinstance(value, list) and not all(isinstance(item, str) for item in value):
        raise UsageError(
            f"config {path}: {section}.{key} must be a list of strings (in quotes), "
            f"not {value!r}"
        )


_TOML_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list",
}


def suggest(value: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(value, list(choices), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""
