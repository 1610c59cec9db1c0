"""The ``journey-export`` entry point: a signal during start-up ends it cleanly.

Importing the command line (aiohttp and the rest) takes a few tenths of a second.
A SIGINT or SIGTERM in that time, or before a run watches for signals itself, ends
the process with the usual one line and exit code 130 instead of a traceback or a
bare kill. Nothing has been written to the output by then.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from types import FrameType

from orchestrator.errors import ExitCode

INTERRUPTED_LINE = "journey-export: interrupted; rerun the same command"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with SIGTERM treated as SIGINT until a run takes over."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        # Imported here, where a signal during the import is caught.
        from orchestrator.cli import main as run_command_line

        return run_command_line(argv)
    except KeyboardInterrupt:
        print(INTERRUPTED_LINE, file=sys.stderr)
        return int(ExitCode.INTERRUPTED)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
