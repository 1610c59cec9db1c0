"""The ``journey-export`` command line: its flags, its logging, its exit codes.

This module configures logging and turns errors into exit codes (see
``orchestrator.errors.ExitCode`` and the README), as ``orchestrator.launch`` does for
what happens before it is imported; the commands live in ``orchestrator.commands``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from orchestrator import __version__, commands, sfmc
from orchestrator.demo import add_commands as add_sandbox_commands
from orchestrator.errors import ExitCode, JourneyExportError
from orchestrator.launch import (
    INTERRUPTED_LINE,
    ignore_late_stops,
    json_logs_asked,
    tell_the_end,
)
from orchestrator.reporting import ClearingHandler, JsonFormatter, ProgressDisplay

EPILOG = (
    "exit codes: 0 complete, 1 windows failed (rerun to request them again), "
    "2 bad usage or input, 3 credentials rejected, 4 output locked by another run, "
    "5 time budget spent (rerun to go on), 130 interrupted (rerun to go on)"
)
READING_EPILOG = (
    "exit codes: 0 done, 1 the answer could not be written (a full disk behind "
    "stdout), 2 bad usage or input"
)
PLAN_EPILOG = (
    f"{READING_EPILOG}; with --estimate also 1 token endpoint unreachable, "
    "3 credentials rejected, 130 interrupted"
)
_TIME_FLAGS = frozenset(
    {"--start", "--end", "--last", "--window", "--max-duration", "--redo"}
)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, with where to look."""

    def error(self, message: str) -> NoReturn:
        program = self.prog.split()[0]  # every error starts the same way
        line = f"{program}: error: {message} (see {self.prog} --help)"
        tell_the_end(line, int(ExitCode.USAGE), as_json=json_logs_asked())
        self.exit(int(ExitCode.USAGE))

    def _get_value(self, action: argparse.Action, arg_string: str) -> Any:
        # An unset shell variable ("--contact-keys-file $KEYS") must not widen an
        # export silently, as it would if an empty value meant "not given".
        if action.option_strings and not arg_string.strip():
            self.error(
                f"{action.option_strings[0]} is empty: give a value or leave it out"
            )

        return super()._get_value(action, arg_string)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = build_parser()
    arguments = _join_relative_times(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(arguments)
    args.display = _progress_display(args)
    configure_logging(args)
    try:
        handler: Callable[[argparse.Namespace], int] = args.handler
        code = handler(args)
        # The command is over: a stop from now on would only lose its exit code.
        # (One that came just before this line is caught below.)
        ignore_late_stops()
        return code
    except BaseException as error:
        if isinstance(error, KeyboardInterrupt):
            ignore_late_stops()

        code, line = _exit_code_for(error)
        if line:
            tell_the_end(line, code, as_json=args.log_format == "json")

        return code


def _join_relative_times(argv: Sequence[str]) -> list[str]:
    """Let ``--start -24h`` through: argparse would take ``-24h`` for a flag."""
    joined: list[str] = []
    for item in argv:
        previous = joined[-1] if joined else ""
        if previous in _TIME_FLAGS and item.startswith("-") and item[1:2].isdigit():
            joined[-1] = f"{previous}={item}"
        else:
            joined.append(item)

    return joined


def _exit_code_for(error: BaseException) -> tuple[int, str | None]:
    """The exit code for what ended the command, and the line that says why."""
    found = _first_known(error)
    if isinstance(found, JourneyExportError):
        return int(found.exit_code), f"journey-export: error: {found}"

    if isinstance(found, KeyboardInterrupt):
        return int(ExitCode.INTERRUPTED), INTERRUPTED_LINE

    if isinstance(found, BrokenPipeError):
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the reader went away
        return int(ExitCode.OK), None

    if isinstance(found, OSError):
        where = f": {found.filename}" if found.filename else ""
        line = f"journey-export: error: {found.strerror or found}{where}"
        return int(ExitCode.WINDOWS_FAILED), line

    raise error


def _first_known(error: BaseException) -> BaseException:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _first_known(inner)
            if isinstance(found, JourneyExportError | KeyboardInterrupt | OSError):
                return found

    return error


def _progress_display(args: argparse.Namespace) -> ProgressDisplay | None:
    wanted = args.command == "run" and not getattr(args, "quiet", False)
    if wanted and args.log_format == "text" and sys.stderr.isatty():
        return ProgressDisplay(sys.stderr)

    return None


def configure_logging(args: argparse.Namespace) -> None:
    """Human lines or JSON lines on stderr; quieter under a progress display."""
    level = args.log_level
    if level is None:
        quiet = args.display is not None or getattr(args, "quiet", False)
        level = "WARNING" if quiet else "INFO"

    handler: logging.Handler
    if args.display is not None:
        handler = ClearingHandler(args.display)
    else:
        handler = logging.StreamHandler(sys.stderr)

    if args.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
            )
        )

    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="journey-export",
        description="Export SFMC Journey Builder history in resumable windows.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="how much to log to stderr (default INFO; WARNING beside progress)",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="human lines, or JSON lines with stable keys (default text)",
    )
    subcommands = parser.add_subparsers(
        dest="command", required=True, parser_class=Parser
    )

    run = subcommands.add_parser(
        "run", help="export a date range into one file", epilog=EPILOG
    )
    _add_request_arguments(run)
    _add_run_arguments(run)
    run.set_defaults(handler=commands.command_run)

    plan = subcommands.add_parser(
        "plan", help="print the windows a run would request", epilog=PLAN_EPILOG
    )
    _add_request_arguments(plan)
    plan.add_argument(
        "--estimate",
        dest="ask_estimates",
        action="store_true",
        help="ask SFMC for each window's estimated rows and bytes (needs credentials)",
    )
    plan.set_defaults(handler=commands.command_plan)

    _add_reading_commands(subcommands)
    add_sandbox_commands(subcommands)
    return parser


def _add_reading_commands(subcommands: Any) -> None:
    """The commands that only read: status and values."""
    status = subcommands.add_parser(
        "status", help="print each window's state", epilog=READING_EPILOG
    )
    status.add_argument("--output", required=True, type=Path, help="the export's file")
    status.set_defaults(handler=commands.command_status)

    values = subcommands.add_parser(
        "values", help="list documented names and values", epilog=READING_EPILOG
    )
    values.add_argument(
        "kind",
        choices=["column", "status", "activity-type"],
        help="which list: the columns, the statuses or the activity types",
    )
    values.set_defaults(handler=commands.command_values)


def _flag(parser: argparse.ArgumentParser, name: str, text: str) -> None:
    parser.add_argument(name, action="store_true", default=None, help=text)


def _add_request_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--config", type=Path, help="TOML config file (flags override it)")
    add("--start", help="start: ISO 8601 with Z or offset, a date, yesterday, -24h")
    add("--end", help="end, excluded: same forms, or now (the default)")
    add("--last", help="the range is the span before --end: 6h, 2d")
    add("--tz", help="dates, today and yesterday in this zone (default UTC)")
    add("--output", help="the file to write; {start:%%Y%%m%%d} and {end:...} filled in")
    add("--format", choices=sfmc.FORMATS, help="csv (default) or tsv")
    add(
        "--columns",
        action="append",
        help="column names in order, comma-separated or repeated (default: SFMC's 8)",
    )
    add("--window", help="window span: 1h (default), 30m, 15m ...")
    add("--concurrency", type=int, help="downloads at once (default 5)")
    add(
        "--compression",
        choices=["gzip", "deflate", "none"],
        help="encoding asked of SFMC for the download (default gzip; --gzip is the "
        "output's)",
    )
    add("--ca-bundle", help="PEM file of CAs to verify TLS with (SSL_CERT_FILE works)")
    add(
        "--allow-domain",
        action="append",
        help="also trust auth and REST URLs on this domain (added to the config's)",
    )
    add("--safety-cap-mb", type=float, help="split windows above this (default 900)")
    add("--min-window", help="never split a window below this span (default 1m)")
    _flag(parser, "--allow-unknown-values", "send values the documented lists lack")
    _flag(parser, "--retained-only", "export only what SFMC still retains (30 days)")
    parser.add_argument(
        "--no-estimate",
        dest="estimate",
        action="store_false",
        default=None,
        help="do not ask for estimates before downloading",
    )
    for flag, name in (
        ("--status", "statuses"),
        ("--activity-type", "activity_types"),
        ("--definition-id", "definition_ids"),
        ("--definition-instance-id", "definition_instance_ids"),
        ("--activity-id", "activity_ids"),
    ):
        add(flag, dest=name, action="append", help="filter (repeatable)")

    add("--contact-keys-file", help="file of contact keys, one per line")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    _flag(parser, "--keep-parts", "keep each window's part file after merging")
    _flag(
        parser,
        "--gzip",
        "write the output gzip-compressed (a name ending .gz does too)",
    )
    _flag(parser, "--restart", "export anew; the old output stays until replaced")
    _flag(parser, "--since-last", "start where the last complete export ended")
    add("--state-file", help="where --since-last records its ends")
    add("--max-duration", help="stop cleanly after this long (exit 5): 50m, 6h")
    add(
        "--flush-mb",
        type=float,
        help="flush the output to disk each time this many MB are appended"
        " (0.001 to 100000, default 64)",
    )
    add(
        "--redo",
        action="append",
        help="request again: 'failed', or windows in START/END (repeatable)",
    )
    add("--report", type=Path, help="write a JSON report of the run here")
    add("--prometheus", type=Path, help="write a Prometheus textfile here")
    add("--quiet", action="store_true", help="no progress display")
