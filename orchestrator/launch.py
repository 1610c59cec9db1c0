"""The ``journey-export`` entry point: a signal during start-up ends it cleanly.

Importing the command line (aiohttp and the rest) takes a few tenths of a second.
A SIGINT, SIGTERM or SIGHUP in that time, or before a run watches for signals, ends
the process with the usual one line and exit code 130 instead of a traceback or a
bare kill. Nothing has been written to the output by then.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import NoReturn

from orchestrator.errors import ExitCode

INTERRUPTED_LINE = "journey-export: interrupted; rerun the same command"
# Ctrl-C, a stop (systemd, Kubernetes, a scheduler), a closed terminal.
STOPPING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with SIGTERM and SIGHUP treated as SIGINT until a run
    takes over."""
    listen_for_stops()
    try:
        # Imported here, where a signal during the import is caught.
        from orchestrator.cli import main as run_command_line

        return run_command_line(argv)
    except KeyboardInterrupt:
        ignore_late_stops()
        code = int(ExitCode.INTERRUPTED)
        tell_the_end(INTERRUPTED_LINE, code, as_json=json_logs_asked(argv))
        return code
    finally:
        # Ignored by the kernel: Python's exit puts back the default (a kill) for
        # signals it handles, but not for ignored ones.
        for signum in STOPPING_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def run_and_exit() -> NoReturn:
    """The console script: run the command line, then end the process at once.

    By the time :func:`main` returns, everything a run writes has been flushed and
    synced to disk. What a normal exit would add is the interpreter tearing down
    its modules (about 0.1 s of every run), which changes nothing on disk.
    """
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        sys.exit(code)  # a closed pipe, say: let the normal exit report it

    for thread in threading.enumerate():  # none are expected; wait as exit would
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()

    logging.shutdown()
    os._exit(code)


def json_logs_asked(argv: Sequence[str] | None = None) -> bool:
    """Whether the command line asks for --log-format json (read before parsing)."""
    given = list(sys.argv[1:] if argv is None else argv)
    pairs = itertools.pairwise(given)
    return "--log-format=json" in given or ("--log-format", "json") in pairs


def tell_the_end(line: str, code: int, *, as_json: bool, level: str = "error") -> None:
    """The last line on stderr: plain, or under --log-format json one more JSON
    object with the log's keys, ``event`` "exit" and the exit code. Characters that
    would break the line (a newline in a file name) are shown escaped."""
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)
    if not as_json:
        print(line, file=sys.stderr)
        return

    event = {
        "time": dt.datetime.now(dt.UTC).isoformat(),
        "level": level,
        "logger": "journey-export",
        "message": line,
        "event": "exit",
        "exit_code": code,
    }
    print(json.dumps(event), file=sys.stderr)


def listen_for_stops() -> None:
    """Make SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt (until the run is
    over: see :func:`ignore_late_stops`)."""
    _ending.clear()
    for signum in STOPPING_SIGNALS:
        signal.signal(signum, _interrupt)


def ignore_late_stops() -> None:
    """From now on a stopping signal is ignored: the run is over and only tells how
    it ended (a kill by the signal would lose that, and the exit code)."""
    _ending.append(True)


_ending: list[bool] = []  # not empty once the run is over


def _interrupt(signum: int, frame: FrameType | None) -> None:
    if not _ending:
        raise KeyboardInterrupt
