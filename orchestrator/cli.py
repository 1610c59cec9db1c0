"""The ``journey-export`` command line: run, plan, status, values, sandbox and demo.

Only this module configures logging and turns errors into exit codes (see
``orchestrator.errors.ExitCode`` and the README).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio

from orchestrator import __version__, sfmc
from orchestrator.config import (
    build_settings,
    load_config,
    load_credentials,
)
from orchestrator.demo import add_commands as add_sandbox_commands
from orchestrator.download import Estimate
from orchestrator.errors import ExitCode, JourneyExportError, UsageError
from orchestrator.export import ExportResult, estimate_windows, run_export
from orchestrator.manifest import ExportPaths, Manifest
from orchestrator.planner import Window, plan_windows

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class Interrupted(JourneyExportError):
    """SIGINT or SIGTERM stopped the run; its state is kept."""

    exit_code = ExitCode.INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(
        _join_relative_times(sys.argv[1:] if argv is None else argv)
    )
    configure_logging(args.log_level)
    try:
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except BaseException as error:
        return _exit_code_for(error)


_TIME_FLAGS = frozenset({"--start", "--end"})


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


def _exit_code_for(error: BaseException) -> int:
    found = _first_known(error)
    if isinstance(found, JourneyExportError):
        print(f"journey-export: error: {found}", file=sys.stderr)
        return int(found.exit_code)
    if isinstance(found, KeyboardInterrupt):
        print(
            "journey-export: interrupted; rerun the same command to go on",
            file=sys.stderr,
        )
        return int(ExitCode.INTERRUPTED)
    if isinstance(found, OSError):
        print(
            f"journey-export: error: {found.strerror or found}: {found.filename}",
            file=sys.stderr,
        )
        return int(ExitCode.WINDOWS_FAILED)
    if isinstance(found, SystemExit):
        raise found
    raise error


def _first_known(error: BaseException) -> BaseException:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _first_known(inner)
            if isinstance(found, JourneyExportError | KeyboardInterrupt | OSError):
                return found
    return error


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
        stream=sys.stderr,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="journey-export",
        description="Export SFMC Journey Builder history in resumable windows.",
        epilog="Exit codes: 0 complete, 1 windows failed (rerun to retry them), "
        "2 bad usage or input, 3 credentials rejected, 4 output locked, "
        "130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="how much to log to stderr (default INFO)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="export a date range into one file")
    _add_request_arguments(run)
    run.set_defaults(handler=command_run)

    plan = commands.add_parser("plan", help="print the windows a run would request")
    _add_request_arguments(plan)
    plan.add_argument(
        "--estimate",
        dest="ask_estimates",
        action="store_true",
        help="ask SFMC for each window's estimated rows and bytes (needs credentials)",
    )
    plan.set_defaults(handler=command_plan)

    status = commands.add_parser("status", help="print each window's state")
    status.add_argument("--output", required=True, type=Path, help="the export's file")
    status.set_defaults(handler=command_status)

    values = commands.add_parser("values", help="list documented names and values")
    values.add_argument("kind", choices=["column", "status", "activity-type"])
    values.set_defaults(handler=command_values)

    add_sandbox_commands(commands)
    return parser


def _add_request_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--config", type=Path, help="TOML config file (flags override it)")
    add("--start", help="start of the range (ISO 8601 with Z or offset, or a date)")
    add("--end", help="end of the range, excluded (same forms, or now)")
    add("--output", help="the file to write")
    add("--format", choices=sfmc.FORMATS, help="csv (default) or tsv")
    add("--columns", help="comma-separated column names (default: SFMC's 8)")
    add("--window", help="window span: 1h (default), 30m, 15m ...")
    add("--concurrency", type=int, help="downloads at once (default 5)")
    add("--compression", choices=["gzip", "deflate", "none"], help="default gzip")
    add("--keep-parts", action="store_true", default=None, help="keep part files")
    add(
        "--restart",
        action="store_true",
        default=None,
        help="discard this output's earlier state and start over",
    )
    add(
        "--allow-unknown-values",
        action="store_true",
        default=None,
        help="send statuses and activity types the documented lists lack",
    )
    add(
        "--no-estimate",
        dest="estimate",
        action="store_false",
        default=None,
        help="do not ask for estimates before downloading",
    )
    add("--ca-bundle", help="PEM file of CAs to verify TLS with (SSL_CERT_FILE works)")
    add(
        "--allow-domain",
        action="append",
        help="also send the token to REST URLs on this domain (repeatable)",
    )
    add("--safety-cap-mb", type=float, help="split windows above this (default 900)")
    add("--min-window", help="never split a window below this span (default 1m)")
    add(
        "--retained-only",
        action="store_true",
        default=None,
        help="export only what SFMC still retains (30 days) instead of refusing",
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


def _options(args: argparse.Namespace) -> dict[str, Any]:
    names = (
        *("start", "end", "output", "format", "columns", "window", "concurrency"),
        *("compression", "keep_parts", "restart", "allow_unknown_values"),
        *("statuses", "activity_types", "definition_ids", "definition_instance_ids"),
        *("activity_ids", "contact_keys_file", "estimate", "safety_cap_mb"),
        *("min_window", "retained_only", "ca_bundle", "allow_domain"),
    )
    return {name: getattr(args, name, None) for name in names}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def command_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    settings = build_settings(_options(args), config, now=_now())
    credentials = load_credentials(os.environ, config, args.config)
    result = run_interruptible(lambda: run_export(settings, credentials))
    print(summary_line(result))
    return int(ExitCode.OK if result.complete else ExitCode.WINDOWS_FAILED)


def run_interruptible(job: Callable[[], Awaitable[_T]]) -> _T:
    """Run ``job`` until it ends or SIGINT/SIGTERM arrives (then raise Interrupted)."""
    outcome: list[_T] = []
    signals_seen: list[int] = []

    async def supervise() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(_watch_signals, group.cancel_scope, signals_seen)
            outcome.append(await job())
            group.cancel_scope.cancel()

    anyio.run(supervise)
    if signals_seen:
        raise Interrupted(
            f"stopped by signal {signals_seen[0]}; state is kept, "
            "rerun the same command to go on"
        )
    return outcome[0]


async def _watch_signals(scope: anyio.CancelScope, seen: list[int]) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            logger.warning("signal %d: stopping; windows in flight are dropped", signum)
            seen.append(int(signum))
            scope.cancel()
            return


def summary_line(result: ExportResult) -> str:
    size = f"{result.bytes / 1e6:,.1f} MB"
    if result.complete:
        return (
            f"export complete: {result.windows} windows, {result.rows:,} rows, "
            f"{size} in {result.seconds:.1f} s, {result.retries} retries -> "
            f"{result.output}"
        )

    failed = "; ".join(f"{key}: {error}" for key, error in result.failed.items())
    if result.error and not failed:
        return f"export incomplete: {result.error}; rerun the same command"
    return (
        f"export incomplete: {len(result.failed)} of {result.windows} windows failed "
        f"({failed}); rerun the same command to request them again"
    )


def command_plan(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    settings = build_settings(
        {**_options(args), "output": args.output or "-"}, config, now=_now()
    )
    if args.ask_estimates:
        credentials = load_credentials(os.environ, config, args.config)
        planned = run_interruptible(lambda: estimate_windows(settings, credentials))
        print_estimates(planned, settings.cap_bytes)
        return int(ExitCode.OK)

    windows = plan_windows(settings.start, settings.end, settings.window)
    for window in windows:
        minutes = window.span.total_seconds() / 60
        print(f"{window.key}\t{minutes:g} min")
    print(f"{len(windows)} windows")
    return int(ExitCode.OK)


def print_estimates(
    planned: list[tuple[Window, Estimate | None]], cap_bytes: int
) -> None:
    """Print each window's estimate and the totals; '?' where none was readable."""
    print("window\trows\tbytes\tcompressed bytes\tnote")
    totals = [0, 0, 0]
    for window, estimate in planned:
        values = (
            (estimate.rows, estimate.bytes, estimate.compressed_bytes)
            if estimate
            else (None, None, None)
        )
        for index, value in enumerate(values):
            totals[index] += value or 0
        over = estimate is not None and estimate.size(compressed=True) > cap_bytes
        note = "over the safety cap: split before download" if over else ""
        shown = "\t".join("?" if v is None else str(v) for v in values)
        print(f"{window.key}\t{shown}\t{note}")
    print(
        f"{len(planned)} windows, estimated {totals[0]:,} rows, {totals[1]:,} bytes "
        f"({totals[2]:,} compressed)"
    )


def command_status(args: argparse.Namespace) -> int:
    paths = ExportPaths(args.output)
    if not paths.manifest.exists():
        raise UsageError(f"no export recorded for {args.output} (no {paths.manifest})")

    manifest = Manifest.load(paths.manifest)
    print("window\tstate\tattempts\trows\tbytes\tlast error")
    for record in manifest.windows:
        print(
            f"{record.window.key}\t{record.state}\t{record.attempts}\t{record.rows}\t"
            f"{record.bytes}\t{record.error or ''}"
        )
    counts = manifest.counts()
    rows, size = manifest.totals()
    state = "complete" if manifest.complete else "incomplete"
    shown = ", ".join(f"{count} {name}" for name, count in sorted(counts.items()))
    print(
        f"{state}: {len(manifest.windows)} windows ({shown}), {rows:,} rows, "
        f"{size:,} bytes"
    )
    return int(ExitCode.OK)


def command_values(args: argparse.Namespace) -> int:
    lists = {
        "column": sfmc.COLUMNS,
        "status": sfmc.STATUSES,
        "activity-type": sfmc.ACTIVITY_TYPES,
    }
    print("\n".join(lists[args.kind]))
    return int(ExitCode.OK)
