"""A lock file that keeps two runs from writing the same output."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from orchestrator.errors import LockHeldError
from orchestrator.parts import PRIVATE


class OutputLock:
    """An exclusive ``flock`` on ``<output>.lock``, released when the process ends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._descriptor: int | None = None

    def __enter__(self) -> OutputLock:
        if self._descriptor is not None:
            return self  # already held: entering again is a no-op

        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, PRIVATE)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise LockHeldError(
                f"another run is writing this output (lock {self.path} is held); "
                "wait for it to finish, or stop it, then run again"
            ) from None

        self._descriptor = descriptor
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._descriptor is not None:
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)
            os.close(self._descriptor)
            self._descriptor = None
