"""The commands behind ``journey-export run``, ``plan``, ``status`` and ``values``."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio

from orchestrator import sfmc
from orchestrator.config import NAME_MAX, RunSettings, build_settings
from orchestrator.configfile import load_config
from orchestrator.credentials import Credentials, load_credentials
from orchestrator.download import Estimate
from orchestrator.errors import ExitCode, JourneyExportError, UsageError
from orchestrator.export import (
    ExportResult,
    Hooks,
    estimate_windows,
    retained_windows,
    run_export,
)
from orchestrator.incremental import (
    STATE_NAME,
    SinceLast,
    nothing_new,
    plan_since_last,
    record_end,
    restore_entry,
    state_file_of,
)
from orchestrator.launch import (
    STOPPING_SIGNALS,
    answer,
    ignore_late_stops,
    json_logs_asked,
    tell_the_end,
)
from orchestrator.manifest import ExportPaths, Manifest
from orchestrator.parts import nearest_existing
from orchestrator.planner import Window
from orchestrator.reporting import (
    Progress,
    ProgressDisplay,
    progress_line,
    prometheus_text,
    report_of,
    write_atomically,
    write_report,
)
from orchestrator.timeparse import iso

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
SHOWN_FAILURES = 3  # failed windows named in the summary line; status lists all
_OPTION_NAMES = (
    *("start", "end", "last", "tz", "output", "format", "columns", "window"),
    *("concurrency", "compression", "keep_parts", "restart", "allow_unknown_values"),
    *("statuses", "activity_types", "definition_ids", "definition_instance_ids"),
    *("activity_ids", "contact_keys_file", "estimate", "safety_cap_mb"),
    *("min_window", "retained_only", "ca_bundle", "allow_domain", "max_duration"),
    *("redo", "since_last", "state_file", "gzip", "flush_mb"),
)


STOPPED_AT_ONCE = "stopped at once; state is kept, rerun the same command"


class Interrupted(JourneyExportError):
    """SIGINT, SIGTERM or SIGHUP stopped the run; its state is kept."""

    exit_code = ExitCode.INTERRUPTED


def options_of(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that build settings; None where a flag was not given."""
    return {name: getattr(args, name, None) for name in _OPTION_NAMES}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class WrittenPathError(UsageError):
    """A path the run would write (report, metrics, state) that it must not or
    cannot write: refused before anything is requested, and no report written."""


def command_run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        return _command_run(args)
    except WrittenPathError:
        raise
    except JourneyExportError as error:
        _report_failure(args, error, seconds=time.monotonic() - started)
        raise


def check_written_paths(
    args: argparse.Namespace, output: Path | None, inputs: list[Path]
) -> None:
    """Before anything is requested: refuse an output that is an input or a state
    file, and a report or metrics path that is the output, one of its own files, an
    input, the other report, or that cannot be written."""
    taken = {path.resolve(): "an input file of this run" for path in inputs}
    if output is not None:
        _check_output_is_free(output, taken)
        paths = ExportPaths(output)
        owned = (output, paths.manifest, paths.partial, paths.lock, paths.parts)
        taken.update({path.resolve(): f"{output}'s own file" for path in owned})

    for flag, path in (("--report", args.report), ("--prometheus", args.prometheus)):
        if path is None:
            continue

        where = path.resolve()
        if where in taken or _in_parts(where, output):
            raise WrittenPathError(
                f"{flag} {path} is {taken.get(where, 'inside the export')}: name a "
                "file of its own"
            )

        _check_writable(flag, path)
        taken[where] = f"the {flag} file"


def _check_output_is_free(output: Path, taken: dict[Path, str]) -> None:
    if output.resolve() in taken or output.name == STATE_NAME:
        what = taken.get(output.resolve(), "named as --since-last's state file")
        raise WrittenPathError(f"--output {output} is {what}: name another file")


def _in_parts(where: Path, output: Path | None) -> bool:
    """Whether ``where`` is inside the output's parts folder."""
    return output is not None and ExportPaths(output).parts.resolve() in where.parents


def _check_writable(flag: str, path: Path) -> None:
    longest = NAME_MAX - len("..lock")  # room for a state file's ".NAME.lock"
    if len(os.fsencode(path.name)) > longest:
        raise WrittenPathError(
            f"{flag} name is longer than {longest} bytes: shorten it"
        )

    if path.is_dir():
        raise WrittenPathError(f"{flag} {path} is a folder: name a file")

    folder = nearest_existing(path.parent.resolve())
    if not folder.is_dir():
        raise WrittenPathError(f"{flag} {path}: {folder} is a file, not a folder")

    try:  # a real write: permissions alone do not tell (root, read-only mounts)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise WrittenPathError(
            f"{flag} {path}: cannot write in {folder} ({error.strerror or error}); "
            "choose a folder you can write to"
        ) from None


def _report_failure(
    args: argparse.Namespace, error: JourneyExportError, *, seconds: float
) -> None:
    """Leave a report of a run that ended with an error, for monitoring: with what
    the export's manifest holds when there is one (a run stopped by a signal)."""
    # A --since-last run's output, once its name is known, not the template.
    output = getattr(args, "resolved_output", None) or getattr(args, "output", None)
    report = {
        "output": str(output or ""),
        "complete": False,
        "exit_code": int(error.exit_code),
        "error": str(error),
        "seconds": round(seconds, 3),
        "start": None,
        "end": None,
        "rows": 0,
        "bytes": 0,
        "windows": 0,
        "exported": 0,
        "failed": [],
        "retries": 0,
        "throttled": 0,
        "finished_at": _now().isoformat(),
        **_recorded_so_far(output),
    }
    try:
        if args.report:
            write_report(args.report, report)

        if args.prometheus:
            write_atomically(args.prometheus, prometheus_text(report), mode=0o644)
    except OSError as problem:
        logger.error("cannot write the report: %s", problem)


def _recorded_so_far(output: str | Path | None) -> dict[str, Any]:
    """The range, windows, rows and bytes an export's manifest records; nothing when
    there is no readable manifest (or the output is a template)."""
    if not output or "{" in str(output):
        return {}

    manifest_path = ExportPaths(Path(output)).manifest
    try:  # a name too long for the manifest's makes even the look raise
        if not manifest_path.is_file():
            return {}

        manifest = Manifest.load(manifest_path)
    except (OSError, JourneyExportError):
        return {}

    rows, size = manifest.totals()
    counts = manifest.counts()
    return {
        "start": manifest.request.get("start"),
        "end": manifest.request.get("end"),
        "windows": len(manifest.windows),
        "exported": counts["done"] + counts["merged"],
        "rows": rows,
        "bytes": size,
    }


def _command_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    options = options_of(args)
    if args.state_file and not args.since_last:
        raise UsageError(
            "--state-file is read only with --since-last: add --since-last, or "
            "drop --state-file"
        )

    if args.since_last:
        credentials = load_credentials(os.environ, config, args.config)
        return _run_since_last(args, options, config, credentials)

    settings = build_settings(options, config, now=_now())
    check_written_paths(args, settings.output, inputs_of(args, options, config))
    credentials = load_credentials(os.environ, config, args.config)
    return _finish(args, _run(args, settings, credentials))


def inputs_of(
    args: argparse.Namespace, options: dict[str, Any], config: dict[str, Any]
) -> list[Path]:
    """The files a run reads (or keeps, as the --since-last state), which it must
    never write over."""
    credentials_file = config.get("credentials", {}).get("file")
    if credentials_file:
        credentials_file = Path(credentials_file).expanduser()
        if args.config and not credentials_file.is_absolute():
            credentials_file = args.config.parent / credentials_file

    merged = {**config.get("export", {}), **config.get("filters", {}), **options}
    found = [
        args.config,
        credentials_file,
        merged.get("contact_keys_file"),
        merged.get("ca_bundle") or config.get("http", {}).get("ca_bundle"),
        _state_file_or_none(options, config),
    ]
    return [Path(path).expanduser() for path in found if path]


def _state_file_or_none(options: dict[str, Any], config: dict[str, Any]) -> Path | None:
    try:
        return state_file_of(options, config)
    except UsageError:  # a templated folder without --state-file: said elsewhere
        return None


def _run(
    args: argparse.Namespace, settings: RunSettings, credentials: Credentials
) -> ExportResult:
    progress = Progress()
    return run_interruptible(
        lambda: _export_with_progress(settings, credentials, progress, args.display)
    )


def _finish(
    args: argparse.Namespace, result: ExportResult, *, problem: str | None = None
) -> int:
    """Print the summary line, write the reports, and give the exit code; a
    ``problem`` after the export (its end not recorded) makes it exit 1."""
    code = ExitCode.WINDOWS_FAILED if problem else exit_code_of(result)
    line = summary_line(result)
    answer(line)  # a stdout nobody reads stops neither the reports nor the code
    _write_reports(
        args, dataclasses.replace(result, error=problem or result.error), code
    )
    as_json = getattr(args, "log_format", "text") == "json"
    if problem:
        tell_the_end(f"journey-export: error: {problem}", int(code), as_json=as_json)
    elif as_json:  # the log ends as with errors
        level = {ExitCode.OK: "info", ExitCode.TIME_BUDGET: "warning"}.get(code)
        tell_the_end(line, int(code), as_json=True, level=level or "error")

    return int(code)


def _run_since_last(
    args: argparse.Namespace,
    options: dict[str, Any],
    config: dict[str, Any],
    credentials: Credentials,
) -> int:
    """Export what is new since the last complete export, and record the new end."""
    if options.get("redo"):
        raise UsageError(
            "--redo works on one export: give that export's --start, --end and "
            "--output instead of --since-last"
        )

    check_written_paths(args, None, inputs_of(args, options, config))
    if args.state_file:
        _check_writable("--state-file", Path(args.state_file))

    plan = plan_since_last(options, config, credentials, now=_now())
    if plan.options is None:
        return _finish(args, nothing_new(plan.start))

    try:
        settings = dataclasses.replace(
            build_settings(plan.options, config, now=_now()),
            history_lag_seconds=plan.lag,
        )
        args.resolved_output = settings.output
        check_written_paths(args, settings.output, inputs_of(args, options, config))
        result = _run(args, settings, credentials)
    except UsageError:
        if plan.recorded_first:  # refused before it began: no first start to keep
            restore_entry(plan.state, plan.key, plan.replaced)
        raise

    return _finish(args, result, problem=_record_the_end(plan, result))


def _record_the_end(plan: SinceLast, result: ExportResult) -> str | None:
    """Record where a complete export ended, the next run's start; say what stands
    in the way when it cannot be recorded, or None."""
    if not result.complete:
        return None

    if result.provisional:
        logger.warning(
            "%d windows of %s are provisional (SFMC may still add rows to them): "
            "its end is not recorded; the next --since-last run refreshes them and "
            "records it, and the run after that goes on from there",
            result.provisional,
            result.output,
        )
        return None

    try:
        record_end(plan.state, plan.key, end=result.end, output=result.output)
    except OSError as error:
        return (
            f"the export is complete, but its end could not be recorded in "
            f"{plan.state} ({error.strerror or error}): fix that, then rerun the same "
            "command, which finds the export and records it"
        )

    return None


def exit_code_of(result: ExportResult) -> ExitCode:
    if result.complete:
        return ExitCode.OK

    if result.out_of_time and not result.failed and not result.error:
        return ExitCode.TIME_BUDGET  # a disk error says more than the budget

    if _all_refused(result):
        return ExitCode.USAGE  # rerunning cannot help: the request must change

    return ExitCode.WINDOWS_FAILED


def _all_refused(result: ExportResult) -> bool:
    """Whether every failed window was refused as asked, and nothing else stopped
    the run: only a changed request (or setting) can get them."""
    failed = len(result.failed)
    return bool(failed) and result.refused == failed and not result.error


def _write_reports(args: argparse.Namespace, result: ExportResult, code: int) -> None:
    report = report_of(result, exit_code=code)
    if args.report:
        write_report(args.report, report)

    if args.prometheus:
        # Counts only, no personal data: readable by a node exporter of another user.
        write_atomically(args.prometheus, prometheus_text(report), mode=0o644)


async def _export_with_progress(
    settings: RunSettings,
    credentials: Credentials,
    progress: Progress,
    display: ProgressDisplay | None,
) -> ExportResult:
    async with anyio.create_task_group() as group:
        if display is not None:
            group.start_soon(_redraw, display, progress, settings.concurrency)

        result = await run_export(settings, credentials, hooks=Hooks(progress=progress))
        group.cancel_scope.cancel()

    if display is not None:
        display.clear()

    return result


async def _redraw(display: ProgressDisplay, progress: Progress, limit: int) -> None:
    while True:
        display.draw(progress_line(progress, concurrency=limit))
        await anyio.sleep(0.5)


def run_interruptible(job: Callable[[], Awaitable[_T]]) -> _T:
    """Run ``job`` until it ends or a stopping signal arrives (SIGINT, SIGTERM,
    SIGHUP: then raise Interrupted).

    A second signal while the job stops ends the process at once, exit code 130:
    what is recorded is as safe as after a kill (every state file is replaced
    whole), and the rerun goes on from it.
    """
    outcome: list[_T] = []
    signals_seen: list[int] = []
    handlers = {signum: signal.getsignal(signum) for signum in STOPPING_SIGNALS}

    async def supervise() -> None:
        stop = anyio.CancelScope()
        try:
            with anyio.open_signal_receiver(*STOPPING_SIGNALS) as signals:
                async with anyio.create_task_group() as group:
                    group.start_soon(_watch_signals, signals, stop, signals_seen)
                    with stop:
                        outcome.append(await job())

                    group.cancel_scope.cancel()
        finally:
            # The receiver leaves each signal's default (a kill) behind: put back
            # what the command line set, which ignores signals once the run is over.
            ignore_late_stops()
            for signum, handler in handlers.items():
                signal.signal(signum, handler)

    try:
        anyio.run(supervise)
    except BaseExceptionGroup as group:
        raise _unwrapped(group) from None

    if not outcome:  # a signal stopped the job before it ended
        raise Interrupted(
            f"stopped by signal {signals_seen[0]}; state is kept, "
            "rerun the same command to go on"
        )

    if signals_seen:
        logger.warning("signal %d came after the run had ended", signals_seen[0])

    return outcome[0]


def _unwrapped(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error a task group wrapped: our own first, else the group itself."""
    for inner in group.exceptions:
        found = _unwrapped(inner) if isinstance(inner, BaseExceptionGroup) else inner
        if isinstance(found, JourneyExportError):
            return found

    return group


async def _watch_signals(
    signals: AsyncIterator[int], stop: anyio.CancelScope, seen: list[int]
) -> None:
    async for signum in signals:
        if seen:
            _stop_at_once(int(signum))

        logger.warning("signal %d: stopping; windows in flight are dropped", signum)
        seen.append(int(signum))
        stop.cancel()


def _stop_at_once(signum: int) -> None:
    """End the process now, as a second signal while stopping asks."""
    line = f"journey-export: signal {signum} again while stopping: {STOPPED_AT_ONCE}"
    tell_the_end(line, ExitCode.INTERRUPTED, as_json=json_logs_asked())
    for stream in (sys.stdout, sys.stderr):
        stream.flush()

    os._exit(ExitCode.INTERRUPTED)


def summary_line(result: ExportResult) -> str:
    """The one line that ends every run."""
    if result.complete and not result.windows:
        ended = iso(dt.datetime.fromisoformat(result.end))
        return f"nothing new since the last export, which ended {ended}"

    done = _counts(result)
    if result.complete:
        return f"export complete: {done} -> {result.output}{_notes(result)}"

    if result.out_of_time and not result.failed:
        return f"export paused (time budget spent): {done}; rerun to go on"

    if not result.failed:  # stopped by something else (a full disk ...)
        error = result.error or "see the log"
        advice = "" if "rerun" in error else "; rerun the same command to go on"
        return f"export incomplete: {done}; {error}{advice}"

    shown = list(result.failed.items())[:SHOWN_FAILURES]
    failed = "; ".join(f"{key}: {error}" for key, error in shown)
    if len(result.failed) > SHOWN_FAILURES:
        failed += f"; {len(result.failed) - SHOWN_FAILURES} more (see status)"

    if _all_refused(result):
        return (
            f"export incomplete: {done}; {len(result.failed)} refused ({failed}); "
            "rerunning as is fails the same way: change what the errors name (a "
            "changed request needs --restart or another --output), then rerun"
        )

    return (
        f"export incomplete: {done}; {len(result.failed)} failed ({failed}); "
        "rerun the same command to request them again"
    )


def _counts(result: ExportResult) -> str:
    """Windows (and their range, if not the one asked for), rows, size, time."""
    of_range = ""
    if result.earlier_range:
        start, end = (
            iso(dt.datetime.fromisoformat(t)) for t in (result.start, result.end)
        )
        of_range = f" of {start} to {end} (the range this export began with)"

    return (
        f"{result.exported}/{result.windows} windows{of_range}, {result.rows:,} "
        f"rows, {result.bytes / 1e6:,.1f} MB in {result.seconds:.1f} s, "
        f"{result.retries} retries, {result.throttled} throttled"
    )


def _notes(result: ExportResult) -> str:
    """What a complete export's summary adds: windows provisional, skipped or
    without a final newline."""
    notes = ""
    if result.provisional:
        notes += f"; {result.provisional} provisional (rerun later to refresh)"

    if result.expired:
        notes += f"; {result.expired} past retention skipped"

    if result.unended:
        notes += (
            f"; {result.unended} without a final newline (a cut body looks so: "
            "see the warnings)"
        )

    return notes


def command_plan(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    options = {**options_of(args), "output": args.output or os.devnull}  # unused
    settings = build_settings(options, config, now=_now())
    windows = retained_windows(settings, _now())
    if args.ask_estimates:
        credentials = load_credentials(os.environ, config, args.config)
        planned = run_interruptible(
            lambda: estimate_windows(settings, credentials, windows)
        )
        print_estimates(
            planned, settings.cap_bytes, compressed=settings.compression != "none"
        )
        return int(ExitCode.OK)

    for window in windows:
        print(f"{window.key}\t{span_text(window.span)}")

    print(count_text(len(windows), "window"))
    return int(ExitCode.OK)


def span_text(span: dt.timedelta) -> str:
    """A span as the flags write it: 1h, 30m, 2m57s, 1m0.5s."""
    hours, rest = divmod(span.total_seconds(), 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [(hours, "h"), (minutes, "m"), (round(seconds, 3), "s")]
    return "".join(f"{value:g}{unit}" for value, unit in parts if value) or "0s"


def count_text(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def print_estimates(
    planned: list[tuple[Window, Estimate | None]], cap_bytes: int, *, compressed: bool
) -> None:
    """Print each window's estimate and the totals; '?' where none was readable.

    A window is noted as over the cap as ``run`` splits it: by its compressed size
    when compression is asked for (``compressed``), else by its size.
    """
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

        over = estimate is not None and estimate.size(compressed=compressed) > cap_bytes
        note = "over the safety cap: split before download" if over else ""
        shown = "\t".join("?" if v is None else str(v) for v in values)
        print(f"{window.key}\t{shown}\t{note}")

    unknown = sum(1 for _, estimate in planned if estimate is None)
    note = f"; {unknown} windows without an estimate not counted" if unknown else ""
    print(
        f"{count_text(len(planned), 'window')}, estimated {totals[0]:,} rows, "
        f"{totals[1]:,} bytes "
        f"({totals[2]:,} compressed){note}"
    )


def command_status(args: argparse.Namespace) -> int:
    paths = ExportPaths(args.output)
    if not paths.manifest.exists():
        raise UsageError(f"no export recorded for {args.output} (no {paths.manifest})")

    manifest = Manifest.load(paths.manifest)
    rows = [("window", "state", "attempts", "rows", "bytes", "last error")]
    for record in manifest.windows:
        state = record.state + (" (provisional)" if record.provisional else "")
        rows.append(
            (
                record.window.key,
                state,
                str(record.attempts),
                f"{record.rows:,}",
                f"{record.bytes:,}",
                record.error or "",
            )
        )

    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[5]]).rstrip())

    print(status_summary(manifest))
    print(f"range: --start {_given(manifest, 'start')} --end {_given(manifest, 'end')}")
    return int(ExitCode.OK)


def _given(manifest: Manifest, key: str) -> str:
    """The request's start or end as a flag takes it (UTC, ``Z``)."""
    moment = dt.datetime.fromisoformat(str(manifest.request[key]))
    return iso(moment)


def status_summary(manifest: Manifest) -> str:
    counts = manifest.counts()
    rows, size = manifest.totals()
    state = "complete" if manifest.complete else "incomplete"
    shown = ", ".join(f"{count} {name}" for name, count in sorted(counts.items()))
    return (
        f"{state}: {len(manifest.windows)} windows ({shown}), {rows:,} rows, "
        f"{size:,} bytes"
    )


def command_values(args: argparse.Namespace) -> int:
    lists = {
        "column": sfmc.COLUMNS,
        "status": sfmc.STATUSES,
        "activity-type": sfmc.ACTIVITY_TYPES,
    }
    print("\n".join(lists[args.kind]))
    return int(ExitCode.OK)
