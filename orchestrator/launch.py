"""The ``journey-export`` entry point: a signal during start-up ends it cleanly.

Importing the command line (aiohttp and the rest) takes a few tenths of a second.
A SIGINT, SIGTERM or SIGHUP in that time, or before a run watches for signals, ends
the process with the usual one line and exit code 130 instead of a traceback or a
bare kill. Nothing has been written to the output by then.
"""

from __future__ import annotations

import contextlib
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
    keep_standard_streams_open()
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
    its modules (about 0.1 s of every run), which changes nothing on disk. Under a
    profiler or a coverage tracer it exits normally, so that they write their
    results.
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        # A reader that went away (a closed pipe) or a full disk behind stdout
        # loses the rest of the answer, not the exit code.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()

    for thread in threading.enumerate():  # none are expected; wait as exit would
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()

    if _observed():
        sys.exit(code)  # a profiler or coverage writes what it found at exit

    logging.shutdown()
    os._exit(code)


def _observed() -> bool:
    """Whether a profiler or a coverage tracer watches this process (by the old
    hooks, or by ``sys.monitoring`` from Python 3.12 on)."""
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return True

    monitoring = getattr(sys, "monitoring", None)
    if monitoring is None:
        return False

    tools = (monitoring.PROFILER_ID, monitoring.COVERAGE_ID)
    return any(monitoring.get_tool(tool) is not None for tool in tools)


def keep_standard_streams_open() -> None:
    """Point a closed stdin, stdout or stderr at /dev/null.

    Otherwise the next file opened (the output, the manifest) would take that
    descriptor's number, and whatever is written to that stream would land in it.
    """
    for descriptor, name in enumerate(("stdin", "stdout", "stderr")):
        try:
            os.fstat(descriptor)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)  # the lowest number free
            if opened != descriptor:
                os.dup2(opened, descriptor)
                os.close(opened)

        if getattr(sys, name) is None:
            mode = "r" if descriptor == 0 else "w"
            setattr(sys, name, open(descriptor, mode, closefd=False))  # noqa: SIM115


def answer(line: str) -> None:
    """Print a line of the command's answer on stdout. A reader that went away (a
    closed pipe, ``| head``) or a full disk there loses the rest of the answer,
    not the command's exit code."""
    try:
        print(line)
    except OSError:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - nothing reads it now


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
        _to_stderr(line)
        return

    event = {
        "time": dt.datetime.now(dt.UTC).isoformat(),
        "level": level,
        "logger": "journey-export",
        "message": line,
        "event": "exit",
        "exit_code": code,
    }
    _to_stderr(json.dumps(event))


def _to_stderr(line: str) -> None:
    with contextlib.suppress(OSError, ValueError):  # nobody reads it any more
        print(line, file=sys.stderr, flush=True)


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
