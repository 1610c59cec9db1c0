"""Incremental runs (``--since-last``): each run starts where the last complete export
of the same request ended, recorded in a small state file."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.config import ExportRequest
from orchestrator.errors import UsageError
from orchestrator.reporting import write_atomically
from orchestrator.timeparse import iso

logger = logging.getLogger(__name__)

STATE_NAME = "journey-export.state.json"


def request_key(request: ExportRequest, window: dt.timedelta) -> str:
    """A digest naming the request: format, columns, filters and window span."""
    identity = {**request.identity(), "window_seconds": window.total_seconds()}
    canonical = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def state_path(given: str | None, output_template: str) -> Path:
    """The state file: as given, else beside the outputs."""
    if given:
        return Path(given)

    folder = Path(output_template).parent
    if "{" in str(folder):
        raise UsageError(
            "--since-last with a templated output folder needs --state-file PATH"
        )

    return folder / STATE_NAME


def read_state(path: Path) -> dict[str, Any]:
    """The recorded ends by request key; an absent file is an empty state."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise UsageError(
            f"state file {path} cannot be read ({error}); fix or remove it and give "
            "--start for the next run"
        ) from None

    if not isinstance(state, dict):
        raise UsageError(f"state file {path} is not a JSON object; remove it")

    return state


def last_end(state: Mapping[str, Any], key: str) -> dt.datetime | None:
    entry = state.get(key)
    if not isinstance(entry, dict) or "end" not in entry:
        return None

    return dt.datetime.fromisoformat(str(entry["end"]))


def record_end(path: Path, key: str, *, end: str, output: str) -> None:
    """Record that the export of ``key`` is complete up to ``end``."""
    state = read_state(path)
    state[key] = {
        "end": end,
        "output": output,
        "recorded": iso(dt.datetime.now(dt.UTC)),
    }
    write_atomically(path, json.dumps(state, indent=2, sort_keys=True) + "\n")
    logger.info("recorded %s as the start of the next --since-last run", end)
