"""Unattended runs: relative times, local days, incremental runs, budgets, reports."""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator import commands, incremental
from orchestrator.cli import main
from orchestrator.commands import (
    Interrupted,
    exit_code_of,
    run_interruptible,
    summary_line,
)
from orchestrator.config import build_request, build_settings
from orchestrator.download import JourneyHistoryClient
from orchestrator.errors import ExitCode, RetryableError, StateWriteError, UsageError
from orchestrator.incremental import request_key
from orchestrator.job import ExportResult
from orchestrator.manifest import ExportPaths, Manifest
from orchestrator.reporting import Progress, progress_line
from orchestrator.sandbox import History
from orchestrator.timeparse import iso
from tests.conftest import HOUR, expected_output, hour_now
from tests.test_cli import (
    PYTHON,
    env_for,
    journey_export,
    range_args,
    run_python,
    start_sandbox,
)

NOW = dt.datetime(2026, 11, 20, 12, 34, 56, tzinfo=dt.UTC)
MINUTE = dt.timedelta(minutes=1)


def end_not_recorded(path: Path, key: str, *, end: str, output: str) -> None:
    """``record_end`` on a state folder that has become read-only."""
    raise PermissionError(13, "Permission denied", str(path))


def prepare_in_process(patched: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Give main() this environment, and put the root logger back after it (main()
    sets up logging)."""
    for name, value in env.items():
        patched.setenv(name, value)

    root = logging.getLogger()
    patched.setattr(root, "handlers", list(root.handlers))
    patched.setattr(root, "level", root.level)


def settings(**options: object) -> object:
    return build_settings({"output": "o.csv", **options}, {}, now=NOW)


def test_last_counts_back_from_end() -> None:
    built = build_settings({"output": "o", "last": "6h"}, {}, now=NOW)

    assert (built.start, built.end) == (NOW - 6 * HOUR, NOW)


def test_last_and_start_together_are_refused() -> None:
    with pytest.raises(UsageError, match="keep one"):
        build_settings({"output": "o", "last": "6h", "start": "-1h"}, {}, now=NOW)


@pytest.mark.parametrize(
    ("day", "hours"),
    [("2026-03-29", 23), ("2026-10-25", 25), ("2026-06-01", 24)],
)
def test_local_days_across_daylight_saving_are_23_or_25_hours(
    day: str, hours: int
) -> None:
    following = (dt.date.fromisoformat(day) + dt.timedelta(days=1)).isoformat()
    built = build_settings(
        {"output": "o", "start": day, "end": following, "tz": "Europe/Paris"},
        {},
        now=NOW,
    )

    assert built.end - built.start == hours * HOUR
    assert built.start.utcoffset() == dt.timedelta(0)


def test_unknown_zone_is_named() -> None:
    with pytest.raises(UsageError, match="Mars/Olympus"):
        build_settings(
            {"output": "o", "start": "today", "tz": "Mars/Olympus"}, {}, now=NOW
        )


def test_output_template_is_filled_with_utc_times() -> None:
    built = build_settings(
        {
            "output": "exports/journey_{start:%Y%m%d}_{end:%H}.csv.gz",
            "start": "2026-11-03",
            "end": "2026-11-04T06:00:00Z",
        },
        {},
        now=NOW,
    )

    assert str(built.output) == "exports/journey_20261103_06.csv.gz"


@pytest.mark.parametrize(
    "template",
    ["../{start:%Y}/x.csv", "out/{start.__class__}", "out/{0}", "x/{start:%Y}/../../y"],
)
def test_templates_that_escape_or_inject_are_refused(template: str) -> None:
    with pytest.raises(UsageError, match="output"):
        build_settings(
            {"output": template, "start": "2026-11-03", "end": "2026-11-04"},
            {},
            now=NOW,
        )


def test_progress_line_shows_the_counts() -> None:
    progress = Progress(windows=10, finished=4, rows=1234, bytes=5_000_000)
    progress.finished_this_run = 4
    progress.stats.retries = 2
    progress.stats.throttled = 1

    line = progress_line(progress, concurrency=5)

    assert line.startswith("windows 4/10 | 1,234 rows | 5.0 MB |")
    assert "retries 2 | throttled 1 | concurrency 5" in line


@pytest.fixture
def sandbox_port() -> object:
    process, port = start_sandbox("rows_per_hour=40", "first_byte_seconds=0.05")
    yield port
    process.terminate()
    process.wait(10)


def test_since_last_continues_where_the_last_export_ended(
    tmp_path: Path, sandbox_port: int
) -> None:
    env = env_for(sandbox_port)
    template = str(tmp_path / "journey_{start:%Y%m%dT%H%M}.csv")
    first_start = (hour_now() - 6 * HOUR).isoformat()

    refused = journey_export("run", "--since-last", "--output", template, env=env)
    assert refused.returncode == 2
    assert "give --start (or export.start) for the first run" in refused.stderr

    first = journey_export(
        "run", "--since-last", "--start", first_start, "--output", template, env=env
    )
    assert first.returncode == 0, first.stderr
    state = json.loads((tmp_path / "journey-export.state.json").read_text())
    (entry,) = state.values()
    end = dt.datetime.fromisoformat(entry["end"])
    assert dt.timedelta(minutes=19) <= dt.datetime.now(dt.UTC) - end <= HOUR

    second = journey_export("run", "--since-last", "--output", template, env=env)
    assert second.returncode == 0, second.stderr
    outputs = sorted(tmp_path.glob("journey_*.csv"))
    assert len(outputs) in (1, 2)  # a second file when a minute has passed
    if len(outputs) == 2:
        assert outputs[1].name == f"journey_{end:%Y%m%dT%H%M}.csv"


def test_since_last_takes_the_config_files_start_and_window(
    tmp_path: Path, sandbox_port: int
) -> None:
    env = env_for(sandbox_port)
    template = str(tmp_path / "journey_{start:%Y%m%dT%H%M}.csv")
    start = (hour_now() - 4 * HOUR).isoformat()
    configs = {}
    for name, window in (("a", "30m"), ("b", "15m")):
        configs[name] = tmp_path / f"{name}.toml"
        configs[name].write_text(f'[export]\nstart = "{start}"\nwindow = "{window}"\n')

    def since_last(config: Path) -> subprocess.CompletedProcess[str]:
        return journey_export(
            "run", "--config", str(config), "--since-last", "--output", template,
            env=env,
        )  # fmt: skip

    first = since_last(configs["a"])
    assert first.returncode == 0, first.stderr
    assert "windows" in first.stdout
    [output] = tmp_path.glob("journey_*.csv")
    assert output.name == f"journey_{hour_now() - 4 * HOUR:%Y%m%dT%H%M}.csv"
    manifest = Manifest.load(ExportPaths(output).manifest)
    assert manifest.windows[0].window.span == dt.timedelta(minutes=30)

    # Another window span is another request: its chain starts at export.start.
    other = since_last(configs["b"])
    assert other.returncode == 2
    assert f"{output} already holds" in other.stderr

    configs["a"].write_text(configs["a"].read_text() + 'end = "now"\n')
    refused = since_last(configs["a"])
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1
    assert f"config {configs['a']}: export.end: --since-last sets the range" in (
        refused.stderr
    )


def test_max_duration_stops_with_exit_5_and_the_rerun_finishes(
    tmp_path: Path,
) -> None:
    process, port = start_sandbox("rows_per_hour=40", "first_byte_seconds=0.5")
    end = hour_now() - 2 * HOUR
    args = [
        "run",
        *range_args(12, tmp_path / "o.csv", end),
        "--concurrency",
        "1",
        "--no-estimate",
    ]
    try:
        paused = journey_export(*args, "--max-duration", "1s", env=env_for(port))
        assert paused.returncode == 5, paused.stderr
        assert "time budget spent" in paused.stdout
        manifest = Manifest.load(ExportPaths(tmp_path / "o.csv").manifest)
        assert 0 < manifest.counts()["merged"] < 12

        done = journey_export(*args, env=env_for(port))
        assert done.returncode == 0, done.stderr
    finally:
        process.terminate()
        process.wait(10)

    history = History(7, 40)
    assert (tmp_path / "o.csv").read_bytes() == expected_output(
        history, end - 12 * HOUR, end
    )


def test_redo_requests_a_range_again_and_reports_are_written(
    tmp_path: Path, sandbox_port: int
) -> None:
    end = hour_now() - 2 * HOUR
    output = tmp_path / "o.csv"
    args = [
        "run",
        *range_args(4, output, end),
    ]
    env = env_for(sandbox_port)
    assert journey_export(*args, env=env).returncode == 0
    first = output.read_bytes()

    redo = f"{(end - 3 * HOUR).isoformat()}/{(end - 2 * HOUR).isoformat()}"
    report, prom = tmp_path / "r.json", tmp_path / "m.prom"
    done = journey_export(
        "--log-format",
        "json",
        *args,
        "--redo",
        redo,
        "--report",
        str(report),
        "--prometheus",
        str(prom),
        env=env,
    )

    assert done.returncode == 0, done.stderr
    assert output.read_bytes() == first
    events = [json.loads(line) for line in done.stderr.splitlines()]
    assert {"time", "level", "logger", "message"} <= set(events[0])
    redone = [e for e in events if e.get("event") == "window_done"]
    assert len(redone) == 1
    assert redone[0]["window"].startswith((end - 3 * HOUR).strftime("%Y-%m-%dT%H"))
    summary = json.loads(report.read_text())
    assert summary["exit_code"] == 0 and summary["windows"] == 4
    assert summary["failed"] == []
    assert 'journey_export_last_run_success{output="' in prom.read_text()


def test_status_prints_an_aligned_table(tmp_path: Path, sandbox_port: int) -> None:
    end = hour_now() - 2 * HOUR
    output = tmp_path / "o.csv"
    journey_export(
        "run",
        *range_args(2, output, end),
        env=env_for(sandbox_port),
    )

    lines = journey_export("status", "--output", str(output)).stdout.splitlines()

    assert lines[0].split() == [
        "window",
        "state",
        "attempts",
        "rows",
        "bytes",
        "last",
        "error",
    ]
    assert lines[1].index("merged") == lines[0].index("state")
    assert lines[-2].startswith("complete: 2 windows (2 merged)")
    assert lines[-1] == f"range: --start {iso(end - 2 * HOUR)} --end {iso(end)}"


def test_progress_is_drawn_only_on_a_terminal(
    tmp_path: Path, sandbox_port: int
) -> None:
    end = hour_now() - 2 * HOUR
    args = [
        sys.executable,
        "-m",
        "orchestrator",
        "run",
        *range_args(2, tmp_path / "o.csv", end),
    ]
    piped = subprocess.run(
        args, env=env_for(sandbox_port), capture_output=True, text=True, check=False
    )
    assert "\r" not in piped.stderr
    assert "window " in piped.stderr  # INFO lines when nobody watches

    script = tmp_path / "with_terminal.py"
    script.write_text(
        "import os, pty, sys\n"
        "code = pty.spawn(sys.argv[1:])\n"
        "sys.exit(os.waitstatus_to_exitcode(code))\n"
    )
    shown = subprocess.run(
        [sys.executable, str(script), *args[:-1], str(tmp_path / "p.csv")],
        env={**env_for(sandbox_port), "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert shown.returncode == 0, shown.stdout
    assert b"\r\x1b[Kwindows " in shown.stdout
    assert os.path.exists(tmp_path / "p.csv")


def test_gzip_output_is_decompressible_and_identical_after_a_redo(
    tmp_path: Path, sandbox_port: int
) -> None:
    import gzip

    end = hour_now() - 2 * HOUR
    output = tmp_path / "journey.csv.gz"
    args = [
        "run",
        *range_args(4, output, end),
    ]
    env = env_for(sandbox_port)
    assert journey_export(*args, env=env).returncode == 0
    first = output.read_bytes()
    history = History(7, 40)
    assert gzip.decompress(first) == expected_output(history, end - 4 * HOUR, end)

    redo = f"{(end - 3 * HOUR).isoformat()}/{(end - 2 * HOUR).isoformat()}"
    again = journey_export(*args, "--redo", redo, env=env)
    assert again.returncode == 0, again.stderr
    assert output.read_bytes() == first


def test_since_last_survives_a_lost_state_and_a_failed_report(
    tmp_path: Path,
    sandbox_port: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = env_for(sandbox_port)
    template = str(tmp_path / "j_{start:%Y%m%dT%H%M}.csv")
    start = (hour_now() - 4 * HOUR).isoformat()

    def disk_full(path: Path, text: str, *, mode: int = 0o600) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with monkeypatch.context() as patched:  # the metrics fail after the export
        prepare_in_process(patched, env)
        patched.setattr(commands, "write_atomically", disk_full)
        code = main(
            ["run", "--since-last", "--start", start, "--output", template,
             "--prometheus", str(tmp_path / "x.prom")]
        )  # fmt: skip

    assert code == 1
    assert "export complete" in capsys.readouterr().out
    state = tmp_path / "journey-export.state.json"
    recorded = json.loads(state.read_text())
    assert recorded  # the end was recorded before the report failed

    state.unlink()  # as if the run had been killed before recording it
    again = journey_export(
        "run", "--since-last", "--start", start, "--output", template, env=env
    )
    assert again.returncode == 0, again.stderr
    assert "completed without its end being recorded" in again.stderr
    assert json.loads(state.read_text()).keys() == recorded.keys()
    assert len(list(tmp_path.glob("j_*.csv"))) in (1, 2)


def test_since_last_refuses_redo_and_redo_works_with_the_range(
    tmp_path: Path, sandbox_port: int
) -> None:
    env = env_for(sandbox_port)
    template = str(tmp_path / "j_{start:%Y%m%dT%H%M}.csv")
    start = hour_now() - 4 * HOUR
    done = journey_export(
        "run", "--since-last", "--start", start.isoformat(), "--output", template,
        "--report", str(tmp_path / "r.json"), env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())

    refused = journey_export(
        "run", "--since-last", "--output", template, "--redo", "failed", env=env
    )
    assert refused.returncode == 2
    assert "--redo works on one export" in refused.stderr

    window = f"{start.isoformat()}/{(start + HOUR).isoformat()}"
    redo = journey_export(
        "run", "--start", report["start"], "--end", report["end"],
        "--output", report["output"], "--redo", window, env=env,
    )  # fmt: skip
    assert redo.returncode == 0, redo.stderr
    assert "1 windows to request again" in redo.stderr


def test_a_state_file_without_since_last_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    refused = journey_export(
        "run", "--start", "-2h", "--output", str(tmp_path / "out.csv"),
        "--state-file", str(state), env=env_for(1),
    )  # fmt: skip

    assert refused.returncode == 2
    assert "--state-file is read only with --since-last" in refused.stderr
    assert sorted(tmp_path.iterdir()) == []


def test_a_name_holding_another_complete_export_is_refused_clearly(
    tmp_path: Path, sandbox_port: int
) -> None:
    env = env_for(sandbox_port)
    output = str(tmp_path / "day.csv")
    end = hour_now() - 2 * HOUR
    first = ["--start", (end - 2 * HOUR).isoformat(), "--end", end.isoformat()]
    assert journey_export("run", *first, "--output", output, env=env).returncode == 0

    other = ["--start", (end - 3 * HOUR).isoformat(), "--end", end.isoformat()]
    refused = journey_export("run", *other, "--output", output, env=env)

    assert refused.returncode == 2
    assert "already holds a complete export" in refused.stderr
    assert "--restart" not in refused.stderr


def twelve_windows(**fields: Any) -> ExportResult:
    """The result of an export of 12 windows, none exported unless ``fields`` say."""
    made: dict[str, Any] = {
        "output": "o.csv",
        "start": "2026-11-03T00:00:00+00:00",
        "end": "2026-11-03T12:00:00+00:00",
        "windows": 12,
        "exported": 0,
        "rows": 0,
        "bytes": 0,
        "seconds": 1.0,
    }
    return ExportResult(**{**made, **fields})


@pytest.mark.parametrize(
    ("error", "failed", "code"),
    [
        (None, {}, ExitCode.TIME_BUDGET),
        (
            "cannot write o.csv.partial: No space left on device",
            {},
            ExitCode.WINDOWS_FAILED,
        ),
        (
            None,
            {"2026-11-03T05:00Z/2026-11-03T06:00Z": "HTTP 500"},
            ExitCode.WINDOWS_FAILED,
        ),
    ],
)
def test_a_spent_time_budget_does_not_hide_a_failure(
    error: str | None, failed: dict[str, str], code: ExitCode
) -> None:
    result = twelve_windows(exported=3, failed=failed, error=error, out_of_time=True)

    assert exit_code_of(result) == code


def test_a_signal_during_the_last_shielded_step_does_not_undo_a_finished_run() -> None:
    async def job() -> str:
        await anyio.sleep(0.2)  # the signal watcher is in place
        with anyio.CancelScope(shield=True):  # as the final flush and publish are
            os.kill(os.getpid(), signal.SIGTERM)
            await anyio.sleep(0.3)
        return "complete"

    assert run_interruptible(job) == "complete"


def test_a_signal_before_the_run_ends_interrupts_it() -> None:
    async def job() -> str:
        await anyio.sleep(0.2)  # the signal watcher is in place
        os.kill(os.getpid(), signal.SIGTERM)
        await anyio.sleep(5)
        return "complete"

    with pytest.raises(Interrupted, match="stopped by signal 15"):
        run_interruptible(job)


# Sends the signal from inside the import of the command line, which is where a
# signal soon after start-up lands: before any run watches for signals.
SIGNAL_DURING_START_UP = """
import os, signal, sys
from orchestrator.launch import main

class SignalOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == "orchestrator.cli":
            os.kill(os.getpid(), signal.{name})
        return None

sys.meta_path.insert(0, SignalOnImport())
sys.exit(main(["values"]))
"""


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_during_start_up_ends_with_one_line_and_130(name: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_DURING_START_UP.replace("{name}", name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == ExitCode.INTERRUPTED
    assert done.stderr == "journey-export: interrupted; rerun the same command\n"
    assert done.stdout == ""


def test_under_json_logs_the_error_that_ends_a_run_is_json_too(
    tmp_path: Path,
) -> None:
    done = journey_export(
        "--log-format", "json", "run", "--start", "-2h", "--window", "2d",
        "--output", str(tmp_path / "o.csv"), env={},
    )  # fmt: skip

    assert done.returncode == ExitCode.USAGE
    events = [json.loads(line) for line in done.stderr.splitlines()]
    assert events[-1]["event"] == "exit"
    assert events[-1]["exit_code"] == ExitCode.USAGE
    assert events[-1]["message"].startswith("journey-export: error: window '2d'")


def test_under_json_logs_every_run_ends_with_an_exit_event(
    tmp_path: Path, sandbox_port: int
) -> None:
    done = journey_export(
        "--log-format", "json", "run", *range_args(2, tmp_path / "o.csv"),
        env=env_for(sandbox_port),
    )  # fmt: skip

    assert done.returncode == ExitCode.OK, done.stderr
    events = [json.loads(line) for line in done.stderr.splitlines()]
    assert events[-1]["event"] == "exit"
    assert (events[-1]["exit_code"], events[-1]["level"]) == (0, "info")
    assert events[-1]["message"] == done.stdout.strip()


@pytest.mark.parametrize(
    "end",
    ['"bogus"', "5", "null", '"2026-11-03T05:00:00"', '"0001-01-01T00:00:00+05:00"'],
)
def test_since_last_refuses_a_recorded_end_that_is_not_a_time(
    tmp_path: Path, end: str
) -> None:
    state = tmp_path / "state.json"
    key = request_key(build_request({}, {}), HOUR)
    state.write_text(f'{{"{key}": {{"end": {end}}}}}\n')

    refused = since_last_refused(tmp_path, state)

    assert f"state file {state}: the end recorded for request {key}" in refused


@pytest.mark.parametrize("retained_only", [False, True])
def test_a_chain_that_fell_past_retention_names_the_way_on(
    tmp_path: Path, retained_only: bool
) -> None:
    state = tmp_path / "state.json"
    key = request_key(build_request({}, {}), HOUR)
    ended = iso(hour_now() - 40 * 24 * HOUR)
    state.write_text(json.dumps({key: {"end": ended}}))
    flags = ["--retained-only"] if retained_only else []

    done = journey_export(
        "run", "--since-last", "--state-file", str(state), *flags,
        "--output", str(tmp_path / "o_{start:%Y%m%dT%H%MZ}.csv"), env=env_for(9),
    )  # fmt: skip

    if retained_only:  # goes on: here to the token endpoint, which is not there
        assert "past SFMC's 30-day retention" not in done.stderr
        return

    assert done.returncode == ExitCode.USAGE
    assert f"the last export recorded in {state} ended at {ended}" in done.stderr
    assert "add --retained-only to go on from there" in done.stderr


def test_since_last_refuses_a_state_file_nested_too_deeply(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text("[" * 100_000 + "\n")

    refused = since_last_refused(tmp_path, state)

    assert f"state file {state} cannot be read" in refused


def since_last_refused(tmp_path: Path, state: Path) -> str:
    """Run --since-last with ``state``; check the one-line refusal, return it.

    The sandbox address is never contacted: the state file is read first."""
    done = journey_export(
        "run", "--since-last", "--state-file", str(state),
        "--output", str(tmp_path / "o.csv"), env=env_for(9),
    )  # fmt: skip

    assert done.returncode == ExitCode.USAGE
    assert done.stderr.count("\n") == 1
    assert "give --start for the next run" in done.stderr
    return done.stderr


def test_the_summary_names_three_failed_windows_and_counts_the_rest() -> None:
    failed = {f"2026-11-03T{hour:02d}:00:00Z/…": "413 too large" for hour in range(12)}
    result = twelve_windows(failed=failed)

    line = summary_line(result)

    assert line.count("413 too large") == 3
    assert "12 failed" in line
    assert "; 9 more (see status)" in line


def test_the_summary_of_a_run_with_nothing_new_writes_its_end_in_utc_with_z() -> None:
    result = twelve_windows(windows=0, complete=True)

    line = summary_line(result)

    assert line == "nothing new since the last export, which ended 2026-11-03T12:00:00Z"
    nothing = incremental.nothing_new("2026-11-03T12:00:00Z")
    assert (nothing.start, nothing.end) == ("2026-11-03T12:00:00+00:00",) * 2
    assert summary_line(nothing) == line


def test_the_summary_of_a_run_stopped_by_the_disk_names_the_disk() -> None:
    disk_full = "cannot write o.csv.partial: No space left on device; rerun once ..."
    result = twelve_windows(exported=12, error=disk_full)

    line = summary_line(result)

    assert "failed" not in line
    assert line.endswith("No space left on device; rerun once ...")  # advice once
    assert summary_line(twelve_windows(exported=12, error="disk gone")).endswith(
        "disk gone; rerun the same command to go on"
    )


@pytest.mark.parametrize(
    "mistake", [["--start", ""], ["--bogus"], ["--concurrency", "many"]]
)
def test_under_json_logs_a_usage_error_is_one_json_object(mistake: list[str]) -> None:
    done = journey_export("--log-format=json", "run", "--output", "o.csv", *mistake)

    assert done.returncode == ExitCode.USAGE
    (line,) = done.stderr.splitlines()
    event = json.loads(line)
    assert event["event"] == "exit"
    assert event["exit_code"] == ExitCode.USAGE
    assert event["message"].startswith("journey-export")


def test_a_signal_during_start_up_is_json_too_under_json_logs() -> None:
    code = SIGNAL_DURING_START_UP.replace("{name}", "SIGTERM").replace(
        'main(["values"])', 'main(["--log-format", "json", "values"])'
    )
    done = run_python(code)

    assert done.returncode == ExitCode.INTERRUPTED
    event = json.loads(done.stderr)
    assert event["message"] == "journey-export: interrupted; rerun the same command"
    assert event["exit_code"] == ExitCode.INTERRUPTED


def test_a_first_since_last_run_with_a_relative_start_is_resumed_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each window takes 0.6 s and the budget is 1 s: the first two runs stop (exit
    # 5). The same command minutes later must go on with that export each time,
    # though "-6h" then means another minute (and so another output name).
    process, port = start_sandbox("rows_per_hour=40", "first_byte_seconds=0.6")
    template = str(tmp_path / "j_{start:%Y%m%dT%H%MZ}.csv")
    command = ["run", "--since-last", "--start", "-6h", "--output", template]
    command += ["--concurrency", "1", "--no-estimate", "--quiet"]
    state_file = tmp_path / "journey-export.state.json"
    started = dt.datetime.now(dt.UTC)
    codes, given = [], []
    try:
        with monkeypatch.context() as patched:
            prepare_in_process(patched, env_for(port))
            for minutes, budget in (
                (0, ["--max-duration", "1s"]),
                (2, ["--max-duration", "1s"]),
                (4, []),
            ):
                later = started + dt.timedelta(minutes=minutes)
                patched.setattr(commands, "_now", lambda later=later: later)
                codes.append(main([*command, *budget]))
                given += [
                    e.get("given_start")
                    for e in json.loads(state_file.read_text()).values()
                ]
    finally:
        process.terminate()
        process.wait(10)

    assert codes == [ExitCode.TIME_BUDGET, ExitCode.TIME_BUDGET, ExitCode.OK]
    assert given == ["-6h", "-6h", None]  # the --start as given, until complete
    (output,) = tmp_path.glob("j_*.csv")  # one export, complete
    assert not list(tmp_path.glob("j_*.csv.p*"))  # its partial and parts gone
    (entry,) = json.loads(state_file.read_text()).values()
    assert set(entry) == {"end", "output", "recorded"}
    assert entry["output"] == str(output)
    first_start = dt.datetime.strptime(output.name, "j_%Y%m%dT%H%MZ.csv")
    assert started - 6 * HOUR - first_start.replace(tzinfo=dt.UTC) < 5 * MINUTE


def test_a_refused_first_since_last_run_records_no_first_start(
    tmp_path: Path, sandbox_port: int
) -> None:
    template = str(tmp_path / "j_{start:%Y%m%dT%H%MZ}.csv")
    done = journey_export(
        "run", "--since-last", "--start", "-40d", "--window", "1d", "--output",
        template, env=env_for(sandbox_port),
    )  # fmt: skip

    assert done.returncode == 2, done.stderr
    assert "retention" in done.stderr
    state = tmp_path / "journey-export.state.json"
    assert not state.exists() or json.loads(state.read_text()) == {}


def test_a_damaged_first_start_in_the_state_file_is_refused(
    tmp_path: Path, sandbox_port: int
) -> None:
    template = str(tmp_path / "j_{start:%Y%m%dT%H%MZ}.csv")
    command = ["run", "--since-last", "--start", "-6h", "--output", template]
    key = request_key(build_request({}, {}), HOUR)
    entry = {"first_start": "yesterday-ish", "given_start": "-6h", "recorded": "x"}
    (tmp_path / "journey-export.state.json").write_text(json.dumps({key: entry}))

    done = journey_export(*command, env=env_for(sandbox_port))

    assert done.returncode == 2, done.stderr
    assert "the first start recorded for request" in done.stderr
    assert not list(tmp_path.glob("j_*"))


def test_an_end_that_cannot_be_recorded_exits_1_with_its_reports_and_is_recorded_later(
    tmp_path: Path,
    sandbox_port: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    template = str(tmp_path / "j_{start:%Y%m%dT%H%M}.csv")
    report = tmp_path / "report.json"
    start = (hour_now() - 4 * HOUR).isoformat()
    command = ["run", "--since-last", "--start", start, "--output", template]
    command += ["--report", str(report)]

    with monkeypatch.context() as patched:
        prepare_in_process(patched, env_for(sandbox_port))
        with monkeypatch.context() as failing:
            failing.setattr(commands, "record_end", end_not_recorded)
            unrecorded = main(command)
        written = json.loads(report.read_text())
        out, err = capsys.readouterr()
        recorded = main(command)

    assert unrecorded == ExitCode.WINDOWS_FAILED
    assert "export complete" in out
    assert "its end could not be recorded" in err.splitlines()[-1]
    assert (written["exit_code"], written["complete"]) == (1, True)
    assert "could not be recorded" in written["error"]
    assert recorded == ExitCode.OK
    state = json.loads((tmp_path / "journey-export.state.json").read_text())
    (entry,) = state.values()
    assert "end" in entry


def test_a_failed_since_last_run_reports_its_output_by_name_not_template(
    tmp_path: Path, sandbox_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    template = str(tmp_path / "j_{start:%Y%m%dT%H%MZ}.csv")
    start = (hour_now() - 4 * HOUR).strftime("%Y-%m-%dT%H:%MZ")
    command = ["run", "--since-last", "--start", start, "--output", template]

    def manifest_unwritable(*args: object) -> ExportResult:
        raise StateWriteError("cannot write the manifest: Read-only file system")

    with monkeypatch.context() as patched:
        prepare_in_process(patched, env_for(sandbox_port))
        patched.setattr(commands, "_run", manifest_unwritable)
        code = main([*command, "--report", str(tmp_path / "r.json")])

    assert code == ExitCode.WINDOWS_FAILED
    report = json.loads((tmp_path / "r.json").read_text())
    named = dt.datetime.strptime(start, "%Y-%m-%dT%H:%MZ")
    assert report["output"] == str(tmp_path / f"j_{named:%Y%m%dT%H%M}Z.csv")


def test_every_folder_a_since_last_run_makes_is_closed_to_others(
    tmp_path: Path, sandbox_port: int
) -> None:
    folders = {
        "outputs": tmp_path / "exports" / "daily",
        "state": tmp_path / "state",
        "report": tmp_path / "reports",
    }
    metrics = tmp_path / "metrics"
    command = [
        *PYTHON, "run", "--since-last", "--start", "-3h",
        "--output", str(folders["outputs"] / "j_{start:%Y%m%dT%H%MZ}.csv"),
        "--state-file", str(folders["state"] / "state.json"),
        "--report", str(folders["report"] / "r.json"),
        "--prometheus", str(metrics / "journey_export.prom"),
    ]  # fmt: skip
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=env_for(sandbox_port),
        umask=0,  # the folders' modes come from the tool alone
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    made = [*folders.values(), folders["outputs"].parent]
    assert {str(f): stat.S_IMODE(f.stat().st_mode) for f in made} == {
        str(f): 0o700 for f in made
    }
    assert stat.S_IMODE(metrics.stat().st_mode) == 0o755  # read by node_exporter


def test_a_since_last_run_takes_the_lag_that_set_its_end(
    tmp_path: Path, sandbox_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The freshness call answers once, then fails: the run must not take its
    # windows for provisional by the fallback lag (nothing would refresh them).
    template = str(tmp_path / "j_{start:%Y%m%dT%H%MZ}.csv")
    start = (hour_now() - 4 * HOUR).isoformat()
    report = tmp_path / "r.json"
    command = ["run", "--since-last", "--start", start, "--output", template]
    answered = JourneyHistoryClient.freshness
    calls: list[int] = []

    async def once(client: JourneyHistoryClient) -> float | None:
        calls.append(1)
        if len(calls) > 1:
            raise RetryableError("the freshness call failed")

        return await answered(client)

    with monkeypatch.context() as patched:
        prepare_in_process(patched, env_for(sandbox_port))
        patched.setattr(JourneyHistoryClient, "freshness", once)
        code = main([*command, "--report", str(report)])

    assert code == ExitCode.OK
    assert json.loads(report.read_text())["provisional"] == 0
    assert len(calls) == 1


def test_a_since_last_run_recording_an_earlier_end_clears_its_parts_folder(
    tmp_path: Path, sandbox_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    template = str(tmp_path / "j_{start:%Y%m%dT%H%MZ}.csv")
    start = (hour_now() - 4 * HOUR).isoformat()
    command = ["run", "--since-last", "--start", start, "--output", template]

    with monkeypatch.context() as patched:
        prepare_in_process(patched, env_for(sandbox_port))
        with monkeypatch.context() as failing:
            failing.setattr(commands, "record_end", end_not_recorded)
            assert main(command) == ExitCode.WINDOWS_FAILED

        (output,) = tmp_path.glob("j_*.csv")
        left = ExportPaths(output).parts
        left.mkdir()  # as a stop just before its removal leaves it
        assert main(command) == ExitCode.OK

    assert not left.exists()


def test_a_resumed_since_last_run_with_provisional_windows_is_refreshed_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first try stops (time budget); the rerun's freshness call fails, so the
    # fallback lag (2 h) makes its last windows provisional. The chain must not
    # move past them: the next run refreshes them, then records the end.
    process, port = start_sandbox("rows_per_hour=40", "first_byte_seconds=0.6")
    template = str(tmp_path / "j_{start:%Y%m%dT%H%MZ}.csv")
    start = (hour_now() - 4 * HOUR).isoformat()
    command = ["run", "--since-last", "--start", start, "--output", template]
    command += ["--concurrency", "1", "--no-estimate", "--quiet"]
    state_file = tmp_path / "journey-export.state.json"
    report = tmp_path / "r.json"

    async def unavailable(client: JourneyHistoryClient) -> float | None:
        raise RetryableError("the freshness call failed")

    def run(*extra: str) -> tuple[int, dict[str, Any], dict[str, Any]]:
        code = main([*command, *extra, "--report", str(report)])
        (entry,) = json.loads(state_file.read_text()).values()
        return code, json.loads(report.read_text()), entry

    try:
        with monkeypatch.context() as patched:
            prepare_in_process(patched, env_for(port))
            first = run("--max-duration", "1s")
            with monkeypatch.context() as failing:
                failing.setattr(JourneyHistoryClient, "freshness", unavailable)
                second = run()
            third = run()
    finally:
        process.terminate()
        process.wait(10)

    assert first[0] == ExitCode.TIME_BUDGET
    code, summary, entry = second
    assert code == ExitCode.OK
    assert summary["complete"] and summary["provisional"] >= 1
    assert "end" not in entry  # the chain does not move past unsettled rows

    code, summary, entry = third
    assert code == ExitCode.OK
    assert summary["provisional"] == 0
    (output,) = tmp_path.glob("j_*.csv")  # the same export, refreshed
    manifest = Manifest.load(ExportPaths(output).manifest)
    assert entry["end"] == manifest.request["end"]
    assert not any(record.provisional for record in manifest.windows)


def test_a_relative_range_resumed_later_is_named_in_the_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # "-3h" two minutes later is another range; the rerun goes on with the first
    # one, and its summary says which, since the range asked for is not the one
    # exported (the log line saying so is hidden under a progress display).
    process, port = start_sandbox("rows_per_hour=40", "first_byte_seconds=0.6")
    output = tmp_path / "o.csv"
    command = ["run", "--start", "-3h", "--end", "-1h", "--output", str(output)]
    command += ["--concurrency", "1", "--no-estimate", "--quiet"]
    started = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
    try:
        with monkeypatch.context() as patched:
            prepare_in_process(patched, env_for(port))
            patched.setattr(commands, "_now", lambda: started)
            assert main([*command, "--max-duration", "1s"]) == ExitCode.TIME_BUDGET
            first = capsys.readouterr().out
            later = started + 2 * MINUTE
            patched.setattr(commands, "_now", lambda: later)
            assert main(command) == ExitCode.OK
            second = capsys.readouterr().out
    finally:
        process.terminate()
        process.wait(10)

    assert "the range this export began with" not in first
    began = f"{iso(started - 3 * HOUR)} to {iso(started - HOUR)}"
    assert f"of {began} (the range this export began with)" in second


def test_since_last_runs_of_other_requests_share_a_state_file_safely(
    tmp_path: Path,
) -> None:
    # Two chains recording ends at once into one state file: neither may fail on
    # the other's temporary file, nor lose the other's record.
    state = tmp_path / "exports" / "journey-export.state.json"
    errors: list[BaseException] = []

    def chain(key: str) -> None:
        try:
            for night in range(40):
                end = iso(NOW + night * HOUR)
                incremental.record_end(state, key, end=end, output=f"{key}.csv")
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=chain, args=(key,)) for key in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    recorded = json.loads(state.read_text())
    assert sorted(recorded) == ["a", "b"]
    assert {entry["end"] for entry in recorded.values()} == {iso(NOW + 39 * HOUR)}
    assert sorted(path.name for path in state.parent.iterdir()) == [
        ".journey-export.state.json.lock",
        "journey-export.state.json",
    ]
