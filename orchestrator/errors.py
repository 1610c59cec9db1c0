"""The errors journey-export raises, and the exit code each one ends a run with.

    JourneyExportError
    ├── UsageError          bad flags, config or input; nothing requested (exit 2)
    │   └── ManifestError   the state beside the output is damaged or not ours
    ├── CredentialsError    the token endpoint rejected the credentials (exit 3)
    ├── LockHeldError       another run holds the lock on this output (exit 4)
    ├── StateWriteError     the manifest cannot be written; the run stops (exit 1)
    ├── TokenUnavailableError  the token endpoint keeps failing; the run stops (exit 1)
    └── WindowError         one window could not be exported (window, status)
        ├── RetryableError  asking again may work: throttling, 5xx, network, cut body
        │   └── ThrottledError
        └── PermanentError  asking again cannot help: other 4xx, a body that lies
            └── TooLargeError
                └── CutShortError  framing whole, rows cut: a limit, or a fault

Errors of aiohttp and zlib are translated into this tree in one place, ``download``.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """The documented exit codes of the command line."""

    OK = 0
    WINDOWS_FAILED = 1
    USAGE = 2
    CREDENTIALS = 3
    LOCKED = 4
    TIME_BUDGET = 5
    INTERRUPTED = 130


class JourneyExportError(Exception):
    """Base of every error journey-export raises on purpose."""

    exit_code = ExitCode.WINDOWS_FAILED


class UsageError(JourneyExportError):
    """A flag, configuration value or input file is wrong; nothing was requested."""

    exit_code = ExitCode.USAGE


class ManifestError(UsageError):
    """The manifest beside the output cannot be used as it is."""


class CredentialsError(JourneyExportError):
    """The token endpoint rejected the client id or secret."""

    exit_code = ExitCode.CREDENTIALS


class StateWriteError(JourneyExportError):
    """The manifest could not be written (a full disk, say); the run stops (exit 1)."""

    exit_code = ExitCode.WINDOWS_FAILED


class TokenUnavailableError(JourneyExportError):
    """The token endpoint kept failing; no window can be requested (exit 1)."""

    exit_code = ExitCode.WINDOWS_FAILED


class LockHeldError(JourneyExportError):
    """Another run is writing the same output."""

    exit_code = ExitCode.LOCKED


class WindowError(JourneyExportError):
    """One window could not be exported.

    ``status`` is the HTTP status when the server answered, ``errorcode`` the SFMC
    error code from the body when it had one.
    """

    def __init__(
        self,
        message: str,
        *,
        window: str | None = None,
        status: int | None = None,
        errorcode: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.window = window
        self.status = status
        self.errorcode = errorcode


class RetryableError(WindowError):
    """Asking again may succeed."""


class ThrottledError(RetryableError):
    """The server asked us to slow down; ``retry_after`` is in seconds (0 if unsaid)."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float = 0.0,
        window: str | None = None,
        status: int | None = None,
        errorcode: int | None = None,
    ) -> None:
        super().__init__(message, window=window, status=status, errorcode=errorcode)
        self.retry_after = retry_after


class PermanentError(WindowError):
    """Asking again the same way cannot succeed."""


class TooLargeError(PermanentError):
    """The window's body reached our safety cap, or was cut by the server at its own:
    the window must be split to be exported."""


class CutShortError(TooLargeError):
    """The body's framing was whole but its rows were cut, as a server's size limit
    cuts them: split the window. Unlike the cap, this is inferred, so a window that
    cannot be split further may still come whole when asked again."""
