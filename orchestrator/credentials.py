"""Credentials: from the environment, or from a file the config names; never from
flags. The secret never shows in a repr, a log line or an error."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import UsageError
from orchestrator.parts import read_input_file

logger = logging.getLogger(__name__)


MAX_CREDENTIALS_BYTES = 64 * 1024  # NAME=value lines; a device would never end
CREDENTIAL_NAMES = (
    "SFMC_CLIENT_ID",
    "SFMC_CLIENT_SECRET",
    "SFMC_AUTH_URL",
    "SFMC_ACCOUNT_ID",
)


@dataclass(frozen=True, slots=True)
class Credentials:
    """Client credentials from the environment; the secret never shows in a repr."""

    client_id: str
    client_secret: str = field(repr=False)
    auth_url: str
    account_id: str | None = None


def load_credentials(
    env: Mapping[str, str],
    config: Mapping[str, Mapping[str, Any]],
    config_path: Path | None = None,
) -> Credentials:
    """Credentials from the environment, completed by ``credentials.file`` if named.

    A credentials file that other users can read or change draws a warning; a
    config file (which holds no secret) only if they can change it.
    """
    if config_path is not None:
        warn_if_writable_by_others(config_path)

    name = config.get("credentials", {}).get("file")
    if not name:
        return credentials_from_env(env)

    path = Path(name).expanduser()
    if not path.is_absolute() and config_path is not None:
        path = config_path.parent / path  # relative to the config file

    found = read_credentials_file(path)  # first: a folder or a missing file is an error
    warn_if_shared(path)
    try:
        return credentials_from_env({**found, **env})
    except UsageError as error:
        raise UsageError(f"{error} (nor in credentials file {path})") from None


def warn_if_shared(path: Path) -> None:
    """Warn when ``path`` is readable or writable by users other than its owner."""
    _warn_if_open(path, 0o077, "is open to other users", "", "chmod 600")


def warn_if_writable_by_others(path: Path) -> None:
    """Warn when users other than the owner can change ``path``: they could point
    the export at another credentials file or server."""
    why = ", who could send the credentials elsewhere"
    _warn_if_open(path, 0o022, "can be changed by other users", why, "chmod go-w")


def _warn_if_open(path: Path, bits: int, what: str, why: str, fix: str) -> None:
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return

    if mode & bits:
        logger.warning(
            "%s %s (mode %o)%s; run: %s %s", path, what, mode, why, fix, path
        )


def read_credentials_file(path: Path) -> dict[str, str]:
    """Read ``NAME=value`` lines (SFMC_CLIENT_ID ...); values are never shown."""
    try:
        data = read_input_file(path, limit=MAX_CREDENTIALS_BYTES)
        lines = data.decode("utf-8").splitlines()
    except OSError as error:
        raise UsageError(
            f"credentials file {path}: {error.strerror}; make credentials.file in the "
            "config name a readable file of NAME=value lines"
        ) from None
    except UnicodeDecodeError:
        raise UsageError(
            f"credentials file {path}: not UTF-8 text; write it as NAME=value lines "
            "in UTF-8"
        ) from None

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

        if key in found:
            raise UsageError(
                f"credentials file {path}, line {number}: {key} is given a second "
                "time; keep one line for it"
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
        auth_url=env["SFMC_AUTH_URL"].rstrip("/").removesuffix("/v2/token"),
        account_id=env.get("SFMC_ACCOUNT_ID") or None,
    )
