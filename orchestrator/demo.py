"""The ``sandbox`` and ``demo`` commands: the built-in SFMC stand-in, and a real export
against it that needs no Salesforce account."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import tomllib
from pathlib import Path
from typing import Any

import anyio

from orchestrator.config import ExportRequest, RunSettings, render_output
from orchestrator.credentials import Credentials
from orchestrator.errors import ExitCode, UsageError
from orchestrator.export import ExportResult, run_export
from orchestrator.launch import answer
from orchestrator.manifest import ExportPaths

logger = logging.getLogger(__name__)

DEMO_HOURS = 48
DEMO_OUTPUT = Path("demo-output/journey_history.csv")


def add_commands(commands: Any) -> None:
    """Add ``sandbox`` and ``demo`` to the command line's subcommands."""
    sandbox = commands.add_parser(
        "sandbox", help="serve the built-in SFMC sandbox on 127.0.0.1"
    )
    sandbox.add_argument("--port", type=int, default=8765, help="default 8765")
    sandbox.add_argument("--config", type=Path, help="TOML file with a [sandbox] table")
    sandbox.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a sandbox setting, e.g. end_inclusive=true or rows_per_hour=500",
    )
    sandbox.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="a fault, e.g. throttle=0.1 (a rate) or stall@1 (first attempts)",
    )
    sandbox.set_defaults(handler=command_sandbox)

    demo = commands.add_parser(
        "demo", help=f"export the last {DEMO_HOURS} hours from an in-process sandbox"
    )
    demo.add_argument(
        "--output",
        type=Path,
        default=DEMO_OUTPUT,
        help=f"the file to write (default {DEMO_OUTPUT})",
    )
    demo.add_argument(
        "--hours",
        type=int,
        default=DEMO_HOURS,
        help=(
            "how many hours to export, ending at the last full hour, 1 to 696 "
            f"(default {DEMO_HOURS})"
        ),
    )
    demo.set_defaults(handler=command_demo)


def sandbox_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sandbox's settings from its config table, then --set and --fault."""
    options: dict[str, Any] = {}
    if args.config is not None:
        options.update(_sandbox_table(args.config))

    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(
                f"--set {item!r}: write KEY=VALUE, e.g. end_inclusive=true"
            )

        options[key.strip()] = value.strip()

    if args.fault:
        options["faults"] = list(args.fault)

    return options


def _sandbox_table(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as stream:
            table = tomllib.load(stream).get("sandbox", {})
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise UsageError(f"config {path}: cannot be read as TOML: {error}") from None

    if not isinstance(table, dict):
        raise UsageError(f"config {path}: [sandbox] must be a table")

    return table


def _settings(options: dict[str, Any]) -> Any:
    from orchestrator.sandbox import settings_from_options

    try:
        return settings_from_options(options)
    except ValueError as error:
        raise UsageError(f"sandbox: {error}") from None


def command_sandbox(args: argparse.Namespace) -> int:
    from orchestrator.sandbox import serve

    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is out of range: use 1 to 65535")

    settings = _settings(sandbox_options(args))

    def tell_how_to_export(server: Any) -> None:  # once it listens
        print(
            f"sandbox on {server.auth_url} (Ctrl-C to stop); export with:\n"
            f"  SFMC_AUTH_URL={server.auth_url} SFMC_CLIENT_ID={settings.client_id} "
            "SFMC_CLIENT_SECRET=<sandbox secret> journey-export run ...",
            flush=True,
        )

    try:
        with contextlib.suppress(KeyboardInterrupt):
            anyio.run(
                lambda: serve(settings, port=args.port, on_ready=tell_how_to_export)
            )
    except OSError as error:
        raise UsageError(
            f"cannot serve on 127.0.0.1:{args.port} ({error.strerror}); "
            "choose another --port"
        ) from None

    return int(ExitCode.OK)


def command_demo(args: argparse.Namespace) -> int:
    if not 1 <= args.hours <= 24 * 29:
        raise UsageError(f"--hours {args.hours} is out of range: use 1 to 696")

    end = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
    start = end - dt.timedelta(hours=args.hours)
    output = _check_demo_output(args.output, start, end)
    if args.log_level is None:  # one line per window is noise for a first look
        logging.getLogger().setLevel(logging.WARNING)

    result = anyio.run(_demo, output, start, end)
    answer(demo_summary(result))
    return int(ExitCode.OK if result.complete else ExitCode.WINDOWS_FAILED)


def _check_demo_output(given: Path, start: dt.datetime, end: dt.datetime) -> Path:
    """The output, its template filled and checked as ``run`` does (no name of an
    export's state, say); refuse to replace a file no demo or export wrote."""
    output = render_output(str(given), start, end)
    if output.exists() and not ExportPaths(output).manifest.exists():
        raise UsageError(
            f"{output} exists and was not written by journey-export; give the demo "
            "another --output"
        )

    return output


async def _demo(output: Path, start: dt.datetime, end: dt.datetime) -> ExportResult:
    from orchestrator.sandbox import SandboxServer

    settings = _settings({})
    async with SandboxServer(settings) as sandbox:
        run = RunSettings(
            start=start,
            end=end,
            output=output,
            request=ExportRequest(),
            restart=True,
        )
        credentials = Credentials(
            client_id=settings.client_id,
            client_secret=settings.client_secret,
            auth_url=sandbox.auth_url,
        )
        logger.info("sandbox on %s; exporting %s", sandbox.auth_url, end - start)
        return await run_export(run, credentials)


def demo_summary(result: ExportResult) -> str:
    with open(result.output, "rb") as stream:
        head = b"".join(stream.readline() for _ in range(3)).decode(errors="replace")

    return (
        f"demo export: {result.windows} windows, {result.rows:,} rows, "
        f"{result.bytes / 1e6:.1f} MB in {result.seconds:.1f} s\n"
        f"written to {Path(result.output).resolve()}\nfirst lines:\n{head}"
    )
