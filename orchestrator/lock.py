"""A lock file that keeps two runs from writing the same output."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from orchestrator.errors import LockHeldError
from orchestrator.parts import PRIVATE


class OutputLock:
    """An exclusive ``flock`` on ``<output>.lock``, released when the process ends.

    With ``state`` given, the lock file is removed on release if this run created
    it and that file does not exist: a run refused before it saved anything leaves
    no file behind. It is removed while still locked, and a run that locks a file
    no longer at the lock's path tries again, so two runs never hold two different
    lock files. A symbolic link at the path is never followed.
    """

    def __init__(self, path: Path, *, state: Path | None = None) -> None:
        self.path = path
        self._state = state
        self._descriptor: int | None = None
        self._created = False

    def __enter__(self) -> OutputLock:
        if self._descriptor is not None:
            return self  # already held: entering again is a no-op

        while self._descriptor is None:
            descriptor = self._open()
            if descriptor is None:
                continue  # removed between two looks: look again

            self._take(descriptor)
            if _same_file(descriptor, self.path):
                self._descriptor = descriptor
            else:
                os.close(descriptor)  # removed by its last holder: lock the new one

        return self

    def _open(self) -> int | None:
        """Open the lock file, noting whether this run created it."""
        flags = os.O_RDWR | os.O_NOFOLLOW
        try:
            descriptor = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, PRIVATE)
            self._created = True
            return descriptor
        except FileExistsError:
            pass

        try:
            descriptor = os.open(self.path, flags)
        except FileNotFoundError:
            return None

        self._created = False
        return descriptor

    def _take(self, descriptor: int) -> None:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise LockHeldError(
                f"another run is writing this output (lock {self.path} is held); "
                "wait for it to finish, or stop it, then run again"
            ) from None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._descriptor is None:
            return

        try:
            if self._created and self._state is not None and not self._state.exists():
                self.path.unlink(missing_ok=True)
        finally:  # released even if the file cannot be removed
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)
            os.close(self._descriptor)
            self._descriptor = None


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        found = path.stat()
    except FileNotFoundError:
        return False

    held = os.fstat(descriptor)
    return (held.st_dev, held.st_ino) == (found.st_dev, found.st_ino)
