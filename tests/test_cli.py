"""The command line as users and schedulers run it: real processes, real signals."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator.commands import STOPPED_AT_ONCE, check_written_paths, inputs_of
from orchestrator.errors import UsageError
from orchestrator.incremental import STATE_NAME
from orchestrator.launch import json_logs_asked
from orchestrator.manifest import ExportPaths, Manifest
from orchestrator.reporting import prometheus_text
from orchestrator.sandbox import History
from tests.conftest import HOUR, expected_output, hour_now

MINUTE = dt.timedelta(minutes=1)

PYTHON = [sys.executable, "-m", "orchestrator"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"sandbox did not listen on {port}")


def start_sandbox(*settings: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [*PYTHON, "sandbox", "--port", str(port)]
    for item in settings:
        command += ["--set", item]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_port(port)
    return process, port


@pytest.fixture
def sandbox_port() -> Iterator[int]:
    process, port = start_sandbox("rows_per_hour=50")
    yield port
    process.terminate()
    process.wait(10)


def env_for(port: int) -> dict[str, str]:
    return {
        **os.environ,
        "SFMC_CLIENT_ID": "sandbox-client",
        "SFMC_CLIENT_SECRET": "sandbox-secret",
        "SFMC_AUTH_URL": f"http://127.0.0.1:{port}",
    }


def journey_export(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PYTHON, *args],
        capture_output=True,
        text=True,
        env=env or dict(os.environ),
        timeout=120,
        check=False,
    )


def range_args(hours: int, output: Path, end: dt.datetime | None = None) -> list[str]:
    end = end or hour_now() - 2 * HOUR
    start = end - hours * HOUR
    return [
        "--start",
        start.isoformat(),
        "--end",
        end.isoformat(),
        "--output",
        str(output),
    ]


def test_time_without_offset_exits_2_with_one_line(tmp_path: Path) -> None:
    done = journey_export(
        "run", "--start", "2026-11-03T05:00:00", "--end", "2026-11-04", "--output", "x"
    )

    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "2026-11-03T05:00:00Z for UTC" in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_credentials_exit_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFMC_")}
    done = journey_export("run", *range_args(2, tmp_path / "o.csv"), env=env)

    assert done.returncode == 2
    assert "SFMC_CLIENT_ID" in done.stderr


def test_unknown_column_exits_2_with_a_suggestion(tmp_path: Path) -> None:
    done = journey_export(
        "run", *range_args(2, tmp_path / "o.csv"), "--columns", "ContactKy"
    )

    assert done.returncode == 2
    assert "did you mean ContactKey" in done.stderr


def utc_text(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_plan_prints_the_windows_and_requests_nothing() -> None:
    start = hour_now() - 5 * HOUR + dt.timedelta(minutes=30)
    done = journey_export(
        "plan", "--start", utc_text(start), "--end", utc_text(start + 150 * MINUTE)
    )

    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"{utc_text(start)}/{utc_text(start + 30 * MINUTE)}")
    assert lines[-1] == "3 windows"


def test_plan_refuses_what_a_run_refuses_past_retention() -> None:
    start = hour_now() - 31 * 24 * HOUR
    dates = ("--start", utc_text(start), "--end", utc_text(start + 48 * HOUR))
    refused = journey_export("plan", *dates)
    retained = journey_export("plan", *dates, "--retained-only")

    assert refused.returncode == 2
    assert "30-day retention" in refused.stderr
    assert "--retained-only" in refused.stderr
    assert retained.returncode == 0, retained.stderr
    windows = retained.stdout.splitlines()[:-1]
    first = dt.datetime.strptime(windows[0][:20], "%Y-%m-%dT%H:%M:%SZ")
    assert first.replace(tzinfo=dt.UTC) >= hour_now() - 30 * 24 * HOUR - HOUR
    assert retained.stdout.splitlines()[-1] == f"{len(windows)} windows"
    assert 20 <= len(windows) <= 26
    assert "not planned" in retained.stderr


def test_values_lists_documented_names() -> None:
    done = journey_export("values", "column")

    assert "Result.Messages" in done.stdout.split()
    assert len(done.stdout.split()) == 25


def test_run_then_status(tmp_path: Path, sandbox_port: int) -> None:
    output = tmp_path / "o.csv"
    done = journey_export("run", *range_args(3, output), env=env_for(sandbox_port))

    assert done.returncode == 0, done.stderr
    assert "export complete: 3/3 windows" in done.stdout
    assert "sandbox-secret" not in done.stderr + done.stdout

    status = journey_export("status", "--output", str(output))
    assert status.returncode == 0
    assert status.stdout.splitlines()[-2].startswith("complete: 3 windows (3 merged)")


def test_credentials_rejected_exit_3(tmp_path: Path, sandbox_port: int) -> None:
    env = {**env_for(sandbox_port), "SFMC_CLIENT_SECRET": "wrong"}
    done = journey_export("run", *range_args(2, tmp_path / "o.csv"), env=env)

    assert done.returncode == 3
    assert "credentials rejected" in done.stderr


def test_plain_http_to_another_host_is_refused(tmp_path: Path) -> None:
    env = {**env_for(1), "SFMC_AUTH_URL": "http://auth.example.com"}
    done = journey_export("run", *range_args(2, tmp_path / "o.csv"), env=env)

    assert done.returncode == 2
    assert "SFMC_AUTH_URL" in done.stderr


def wait_for_file(path: Path, timeout: float = 30) -> None:
    """Wait until ``path`` exists (a slow machine may take seconds to start)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def slow_run(
    output: Path, port: int, hours: int, end: dt.datetime, *flags: str
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*PYTHON, "run", *range_args(hours, output, end), "--concurrency", "2", *flags],
        env=env_for(port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_sigterm_exits_130_and_the_rerun_completes(tmp_path: Path) -> None:
    process, port = start_sandbox("rows_per_hour=50", "first_byte_seconds=0.4")
    end = hour_now() - 2 * HOUR
    try:
        output = tmp_path / "o.csv"
        report = tmp_path / "report.json"
        run = slow_run(output, port, 12, end, "--report", str(report))
        wait_for_file(ExportPaths(output).manifest)  # the run has started
        time.sleep(1)  # a window or two done
        run.send_signal(signal.SIGTERM)
        assert run.wait(30) == 130
        manifest = Manifest.load(ExportPaths(output).manifest)
        assert not manifest.complete
        stopped = json.loads(report.read_text())
        assert stopped["exit_code"] == 130
        assert stopped["windows"] == 12
        assert stopped["rows"] == manifest.totals()[0]
        assert stopped["seconds"] > 0
        assert stopped["start"] == (end - 12 * HOUR).isoformat()

        done = journey_export("run", *range_args(12, output, end), env=env_for(port))
        assert done.returncode == 0, done.stderr
    finally:
        process.terminate()
        process.wait(10)

    history = History(7, 50)
    assert output.read_bytes() == expected_output(history, end - 12 * HOUR, end)


@pytest.mark.parametrize(
    ("argv", "asked"),
    [
        ([], False),
        (["--log-format"], False),
        (["--log-format", "json"], True),
        (["--log-format=json", "run"], True),
        (["run", "--log-format", "text"], False),
    ],
)
def test_json_logs_are_seen_before_parsing(argv: list[str], asked: bool) -> None:
    assert json_logs_asked(argv) is asked


def test_a_newline_in_a_path_does_not_break_the_error_line(tmp_path: Path) -> None:
    config = tmp_path / "a\nb.toml"
    done = journey_export("run", "--config", str(config), *range_args(1, tmp_path))

    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "a\\nb.toml: no such file" in done.stderr


def write_file(path: Path) -> Path:
    path.write_text("x")
    return path


def make_folder(path: Path) -> Path:
    path.mkdir()
    return path


def link_to_a_victim(path: Path) -> Path:
    """A symbolic link at ``path`` to a file of the user's beside it."""
    victim = path.with_name("victim.txt")
    victim.write_text("precious")
    path.symlink_to(victim)
    return victim


def make_pipe(path: Path) -> Path:
    os.mkfifo(path)
    return path


def foreign_file_in_parts(output: Path) -> Path:
    (folder := ExportPaths(output).parts).mkdir()
    (kept := folder / "notes.txt").write_text("precious")
    return kept


NOT_REGULAR = "is not a regular file, and this export keeps one there"


def beside(suffix: str, make: Callable[[Path], Path]) -> Callable[[Path], Path]:
    """Make something at the output's path plus ``suffix``."""
    return lambda output: make(output.with_name(output.name + suffix))


STATE_IN_THE_WAY: dict[str, tuple[Callable[[Path], Path], str]] = {
    "foreign file in parts": (foreign_file_in_parts, "holds files this export did not"),
    "parts is a file": (beside(".parts", write_file), "is not a folder, and this"),
    "partial is a folder": (beside(".partial", make_folder), NOT_REGULAR),
    "lock is a folder": (beside(".lock", make_folder), NOT_REGULAR),
    "manifest's temporary file is a link": (
        beside(".manifest.json.tmp", link_to_a_victim),
        NOT_REGULAR,
    ),
    "partial is a link": (beside(".partial", link_to_a_victim), NOT_REGULAR),
    "lock is a link": (beside(".lock", link_to_a_victim), NOT_REGULAR),
    "partial without a manifest": (
        beside(".partial", write_file),
        "exists but no export of it is recorded",
    ),
    "output is a pipe": (make_pipe, "exists and is not a regular file"),
}


@pytest.mark.parametrize("restart", [(), ("--restart",)])
@pytest.mark.parametrize("case", sorted(STATE_IN_THE_WAY))
def test_what_stands_where_an_export_keeps_its_files_is_refused(
    tmp_path: Path, case: str, restart: tuple[str, ...]
) -> None:
    output = tmp_path / "o.csv"
    make, message = STATE_IN_THE_WAY[case]
    kept = make(output)
    before = sorted(p.name for p in tmp_path.rglob("*"))

    done = journey_export("run", *range_args(1, output), *restart, env=env_for(9))

    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert done.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing deleted
    assert kept.exists()
    if kept.name == "victim.txt":
        assert kept.read_text() == "precious"


def test_a_users_file_at_the_lock_path_is_never_deleted(tmp_path: Path) -> None:
    output = tmp_path / "o.csv"
    ExportPaths(output).lock.write_text("important")
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)  # past retention: refused
    done = journey_export(
        "run", "--start", start.isoformat(), "--end", (start + HOUR).isoformat(),
        "--output", str(output), env=env_for(9),
    )  # fmt: skip

    assert done.returncode == 2
    assert ExportPaths(output).lock.read_text() == "important"


@pytest.mark.parametrize("inside", ["o.csv.parts", "any.parts"])
def test_an_output_in_a_parts_folder_is_refused(tmp_path: Path, inside: str) -> None:
    (tmp_path / inside).mkdir()
    done = journey_export(
        "run", *range_args(1, tmp_path / inside / "z.csv"), env=env_for(9)
    )

    assert done.returncode == 2
    assert "named like an export's parts folder" in done.stderr


def test_an_output_under_a_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    done = journey_export(
        "run", *range_args(1, tmp_path / "afile" / "x.csv"), env=env_for(9)
    )

    assert done.returncode == 2
    assert f"{tmp_path / 'afile'} is a file, not a folder" in done.stderr


@pytest.mark.parametrize("flag", ["--report", "--prometheus"])
def test_a_report_no_one_can_write_is_refused_before_the_export(
    tmp_path: Path, flag: str
) -> None:
    # Nobody, root included, creates files in /proc: only a real write tells.
    output = tmp_path / "o.csv"
    done = journey_export(
        "run", *range_args(1, output), flag, "/proc/report.json", env=env_for(9)
    )

    assert done.returncode == 2
    assert f"{flag} /proc/report.json: cannot write in /proc" in done.stderr
    assert not output.exists()


# A job whose stopping hangs: the second signal must end the process at once.
HANGING_STOP = """
import anyio
from orchestrator.commands import run_interruptible

async def job():
    try:
        print("running", flush=True)
        await anyio.sleep(60)
    finally:
        with anyio.CancelScope(shield=True):
            print("stopping", flush=True)
            await anyio.sleep(60)

run_interruptible(job)
"""


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGHUP])
def test_a_second_signal_while_stopping_exits_130_at_once(
    first: signal.Signals,
) -> None:
    job = subprocess.Popen(
        [sys.executable, "-c", HANGING_STOP],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert job.stdout is not None
    assert job.stdout.readline() == "running\n"
    job.send_signal(first)
    assert job.stdout.readline() == "stopping\n"
    job.send_signal(signal.SIGINT)

    assert job.wait(20) == 130
    assert job.stderr is not None
    last = job.stderr.read().splitlines()[-1]
    assert last == f"journey-export: signal 2 again while stopping: {STOPPED_AT_ONCE}"


# --flush-mb 0.001: the output is flushed, and windows recorded as merged, after
# almost every window, so a kill lands between flushes as well as before the first.
@pytest.mark.parametrize(
    ("seed", "flags"), [(1, ()), (2, ()), (3, ()), (4, ("--flush-mb", "0.001"))]
)
def test_kill_9_then_rerun_gives_the_same_bytes(
    tmp_path: Path, seed: int, flags: tuple[str, ...]
) -> None:
    process, port = start_sandbox("rows_per_hour=200", "first_byte_seconds=0.3")
    end = hour_now() - 2 * HOUR
    rng = random.Random(seed)
    try:
        clean = tmp_path / "clean.csv"
        done = journey_export("run", *range_args(10, clean, end), env=env_for(port))
        assert done.returncode == 0, done.stderr

        killed = tmp_path / "killed.csv"
        for round_number in range(2):
            run = slow_run(killed, port, 10, end, *flags)
            time.sleep(rng.uniform(0.5, 1.5))
            run.kill()
            run.wait(10)
            if round_number == 0:
                assert not killed.exists()  # the first kill landed mid-export
        done = journey_export("run", *range_args(10, killed, end), env=env_for(port))
        assert done.returncode == 0, done.stderr
    finally:
        process.terminate()
        process.wait(10)

    assert killed.read_bytes() == clean.read_bytes()
    assert not ExportPaths(killed).partial.exists()


def test_demo_writes_a_file(tmp_path: Path) -> None:
    output = tmp_path / "demo.csv"
    done = journey_export("demo", "--output", str(output), "--hours", "6")

    assert done.returncode == 0, done.stderr
    assert f"written to {output}" in done.stdout
    assert output.read_bytes().startswith(b"TransactionTime,ContactKey,Status")


def test_demo_fills_an_output_template_with_the_range_it_exports(
    tmp_path: Path,
) -> None:
    template = str(tmp_path / "d-{start:%H}-{end:%H}.csv")
    done = journey_export("demo", "--output", template, "--hours", "3")

    assert done.returncode == 0, done.stderr
    (written,) = tmp_path.glob("d-*.csv")
    start, end = (int(hour) for hour in written.stem.split("-")[1:])
    assert (end - start) % 24 == 3


def test_demo_refuses_an_output_named_like_an_exports_state(tmp_path: Path) -> None:
    done = journey_export("demo", "--output", str(tmp_path / "j.csv.partial"))

    assert done.returncode == 2
    assert "named like an export's own state" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_range_args_are_hour_aligned() -> None:
    start = dt.datetime.fromisoformat(range_args(1, Path("x"))[1])
    assert start.minute == 0


def test_usage_errors_are_one_line() -> None:
    done = journey_export("run", "--concurrency", "abc")

    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "invalid int value" in done.stderr and "--help" in done.stderr


def test_a_failed_run_still_leaves_a_report(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    done = journey_export(
        "run", "--start", "2020-01-01", "--end", "2020-01-02",
        "--output", str(tmp_path / "o.csv"), "--report", str(report),
        env=env_for(1),
    )  # fmt: skip

    assert done.returncode == 2
    summary = json.loads(report.read_text())
    assert summary["exit_code"] == 2 and "retention" in summary["error"]
    counts = ("windows", "exported", "rows", "bytes", "retries", "throttled")
    assert {name: summary[name] for name in counts} == dict.fromkeys(counts, 0)
    assert (summary["start"], summary["end"]) == (None, None)  # no export began


def test_the_metrics_file_writes_a_label_as_the_text_format_allows() -> None:
    # Raw UTF-8 and tabs; only a backslash, a double quote and a line feed escaped.
    output = 'exports/café\t"q"\\x\ny'
    report = {"output": output, "exit_code": 0, "seconds": 1.0, "failed": []}
    report |= {"rows": 1, "bytes": 2, "windows": 3, "exported": 3, "retries": 0}
    text = prometheus_text({**report, "throttled": 0, "complete": True})

    assert 'output="exports/café\t\\"q\\"\\\\x\\ny"' in text


def test_redo_of_a_range_outside_the_export_is_refused(
    tmp_path: Path, sandbox_port: int
) -> None:
    end = hour_now() - 2 * HOUR
    args = range_args(2, tmp_path / "o.csv", end)
    assert journey_export("run", *args, env=env_for(sandbox_port)).returncode == 0

    done = journey_export(
        "run", *args, "--redo", "2020-01-01T00:00Z/2020-01-02T00:00Z",
        env=env_for(sandbox_port),
    )  # fmt: skip
    assert done.returncode == 2
    assert "names no window" in done.stderr


def test_a_sandbox_on_a_taken_port_says_only_that() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = journey_export("sandbox", "--port", str(port))

    assert done.returncode == 2
    assert done.stdout == ""  # no "sandbox on ..." for a sandbox that never served
    assert done.stderr.startswith(
        f"journey-export: error: cannot serve on 127.0.0.1:{port}"
    )
    assert done.stderr.count("\n") == 1


@pytest.mark.parametrize("flag", ["--contact-keys-file", "--end", "--report", "--tz"])
def test_an_empty_flag_value_is_refused_not_taken_as_unset(
    tmp_path: Path, flag: str
) -> None:
    output = str(tmp_path / "o.csv")
    done = journey_export("run", "--start", "-2h", "--output", output, flag, "")

    assert done.returncode == 2
    assert f"{flag} is empty: give a value or leave it out" in done.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("target", ["o.csv", "o.csv.manifest.json", "keys.txt"])
def test_a_report_over_the_output_its_state_or_an_input_is_refused(
    tmp_path: Path, sandbox_port: int, target: str
) -> None:
    end = hour_now() - 2 * HOUR
    output = tmp_path / "o.csv"
    env = env_for(sandbox_port)
    assert journey_export("run", *range_args(2, output, end), env=env).returncode == 0
    (tmp_path / "keys.txt").write_text("0035eIxWuV6UIUbqOD\n")
    before = {path: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}

    for flag in ("--report", "--prometheus"):
        done = journey_export(
            "run", *range_args(2, output, end), flag, str(tmp_path / target),
            "--contact-keys-file", str(tmp_path / "keys.txt"), env=env,
        )  # fmt: skip

        assert done.returncode == 2
        assert f"{flag} {tmp_path / target} is " in done.stderr
        after = {
            path: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()
        }
        assert after == before


@pytest.mark.parametrize("name", ["a.csv.partial", "a.csv.lock", "a.csv.manifest.json"])
def test_an_output_named_like_another_exports_state_is_refused(
    tmp_path: Path, name: str
) -> None:
    done = journey_export("run", "--start", "-2h", "--output", str(tmp_path / name))

    assert done.returncode == 2
    assert "is named like an export's own state" in done.stderr


def written_paths_args(**paths: Path | None) -> argparse.Namespace:
    return argparse.Namespace(**{"report": None, "prometheus": None, **paths})


def test_an_output_or_report_over_a_file_the_run_reads_or_keeps_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = {"credentials": {"file": "~/creds.env"}}
    args = written_paths_args(config=None)
    options = {"output": str(tmp_path / "o.csv"), "contact_keys_file": "keys.txt"}
    inputs = inputs_of(args, options, config)
    assert tmp_path / "creds.env" in inputs  # ~ expanded, as the credentials are
    assert tmp_path / "journey-export.state.json" in inputs  # --since-last's state

    output = tmp_path / "o.csv"
    for report in (tmp_path / "creds.env", tmp_path / "journey-export.state.json"):
        with pytest.raises(UsageError, match="is an input file of this run"):
            check_written_paths(written_paths_args(report=report), output, inputs)

    with pytest.raises(UsageError, match=r"o\.csv\.parts is .*o\.csv's own file"):
        parts = tmp_path / "o.csv.parts"
        check_written_paths(written_paths_args(report=parts), output, inputs)

    with pytest.raises(UsageError, match=r"--output .*keys.txt is an input file"):
        check_written_paths(written_paths_args(), Path("keys.txt"), inputs)

    with pytest.raises(UsageError, match="named as --since-last's state file"):
        check_written_paths(written_paths_args(), tmp_path / "x" / STATE_NAME, inputs)

    same = written_paths_args(report=tmp_path / "r", prometheus=tmp_path / "r")
    with pytest.raises(UsageError, match=r"--prometheus .* is the --report file"):
        check_written_paths(same, output, inputs)


def test_plan_needs_no_output_even_beside_a_folder_named_plan(tmp_path: Path) -> None:
    (tmp_path / "plan").mkdir()
    done = subprocess.run(
        [*PYTHON, "plan", "--start", "-3h", "--end", "-2h"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(" windows\n")


def test_the_longest_names_allowed_really_work(
    tmp_path: Path, sandbox_port: int
) -> None:
    output = tmp_path / ("o" * (255 - len(".manifest.json.tmp") - 4) + ".csv")
    report = tmp_path / ("r" * (255 - len("..lock")))
    end = hour_now() - 2 * HOUR
    args = [*range_args(2, output, end), "--keep-parts", "--report", str(report)]

    done = journey_export("run", *args, env=env_for(sandbox_port))
    assert done.returncode == 0, done.stderr
    assert json.loads(report.read_text())["complete"]

    longer = journey_export(
        "run", *args[:-1], str(report) + "r", env=env_for(sandbox_port)
    )
    assert longer.returncode == 2
    assert "--report name is longer than 249 bytes" in longer.stderr


def test_a_redo_span_may_start_with_a_relative_time(tmp_path: Path) -> None:
    done = journey_export(
        "run", *range_args(2, tmp_path / "o.csv"), "--redo", "-24h/now", env={}
    )

    assert done.returncode == 2
    assert "SFMC_CLIENT_ID" in done.stderr  # --redo was read: credentials come next


def test_a_long_unknown_value_is_shortened_in_the_error() -> None:
    done = journey_export("plan", "--last", "1h", "--status", "x" * 100_000)

    assert done.returncode == 2
    assert "is not documented" in done.stderr
    assert len(done.stderr) < 400


# A signal after the run is over, while it only tells how it ended, is ignored.
LATE_STOP = """
import os, signal
from orchestrator import launch
from orchestrator.commands import run_interruptible

async def job():
    return 1

launch.listen_for_stops()
run_interruptible(job)
for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    os.kill(os.getpid(), signum)
print("survived", flush=True)
"""


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_signal_after_the_run_is_over_changes_nothing() -> None:
    done = run_python(LATE_STOP)

    assert (done.returncode, done.stdout) == (0, "survived\n"), done.stderr


@pytest.mark.parametrize(
    ("args", "closing", "code"),
    [
        (["values", "column"], ">&-", 0),
        (["values", "column"], "2>&-", 0),
        (["run", "--bogus"], "2>&-", 2),
        (["plan", "--start", "-3h"], ">&- 2>&-", 0),
    ],
)
def test_a_closed_stdout_or_stderr_changes_no_exit_code(
    args: list[str], closing: str, code: int
) -> None:
    script = f'exec "$@" {closing}'
    command = ["sh", "-c", script, "sh", *PYTHON, *args]
    done = subprocess.run(command, capture_output=True, timeout=60, check=False)

    assert done.returncode == code, done.stderr


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_a_run_whose_stdout_reader_went_away_keeps_its_exit_code_and_reports(
    tmp_path: Path, unbuffered: str
) -> None:
    # Each window takes 2 s to answer and the budget is 1 s: the run ends with
    # exit 5 after its first window, whose summary line nobody reads.
    process, port = start_sandbox("rows_per_hour=50", "first_byte_seconds=2")
    env = {**env_for(port), "PYTHONUNBUFFERED": unbuffered}
    report = tmp_path / "report.json"
    command = [*PYTHON, "--log-format", "json", "run", "--max-duration", "1s"]
    command += [*range_args(3, tmp_path / "o.csv"), "--concurrency", "1"]
    command += ["--no-estimate", "--report", str(report)]
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            command,
            check=False,
            stdout=write,
            stderr=subprocess.PIPE,
            env=env,
            timeout=60,
        )
    finally:
        os.close(write)
        process.terminate()
        process.wait(10)

    assert done.returncode == 5, done.stderr
    assert json.loads(report.read_text())["exit_code"] == 5
    last = json.loads(done.stderr.splitlines()[-1])
    assert (last["event"], last["exit_code"]) == ("exit", 5)


@pytest.mark.parametrize("length", [242, 255])
def test_an_output_name_too_long_for_its_manifest_is_refused_with_exit_2(
    tmp_path: Path, length: int
) -> None:
    # The name itself fits the filesystem; the manifest's beside it would not.
    output = tmp_path / ("b" * (length - 4) + ".csv")
    done = journey_export(
        "run", *range_args(2, output), "--report", str(tmp_path / "r.json")
    )

    assert done.returncode == 2, done.stderr
    assert "is too long" in done.stderr
    assert json.loads((tmp_path / "r.json").read_text())["exit_code"] == 2


def test_a_profiler_gets_to_write_its_profile(tmp_path: Path) -> None:
    # The command ends the process without the interpreter's teardown, except
    # under a profiler or a coverage tracer, whose results are written at exit.
    profile = tmp_path / "values.prof"
    command = [sys.executable, "-m", "cProfile", "-o", str(profile)]
    done = subprocess.run(
        [*command, "-m", "orchestrator", "values", "column"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert "TransactionTime" in done.stdout
    assert profile.stat().st_size > 0


@pytest.mark.parametrize(
    ("late", "window", "spans", "total"),
    [
        (0.0, "1h", ["1h"], "1 window"),
        (0.0, "20m", ["20m", "20m", "20m"], "3 windows"),
        (30.5, "1h", ["59m29.5s"], "1 window"),
    ],
)
def test_plan_prints_spans_as_the_flags_write_them(
    late: float, window: str, spans: list[str], total: str
) -> None:
    end = hour_now() - 2 * HOUR
    start = end - HOUR + dt.timedelta(seconds=late)
    done = journey_export(
        "plan", "--start", start.isoformat(), "--end", end.isoformat(),
        "--window", window,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    *windows, last = done.stdout.splitlines()
    assert [line.split("\t")[1] for line in windows] == spans
    assert last == total


def test_a_usage_error_of_a_subcommand_starts_as_every_error_does() -> None:
    done = journey_export("values", "bogus")

    assert done.returncode == 2
    assert done.stderr.startswith("journey-export: error: argument kind: invalid")
    assert "(see journey-export values --help)" in done.stderr


@pytest.mark.parametrize("hard", [16, 4096])
def test_too_few_open_files_are_raised_or_named_with_their_fix(
    tmp_path: Path, sandbox_port: int, hard: int
) -> None:
    # A soft limit of 16 is raised up to the hard limit; a hard limit too low for
    # --concurrency 16 is refused before anything is requested, and named.
    output = tmp_path / "o.csv"
    args = [*PYTHON, "run", *range_args(24, output), "--concurrency", "16"]

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (16, hard))

    done = subprocess.run(
        args,
        capture_output=True,
        text=True,
        env=env_for(sandbox_port),
        timeout=120,
        check=False,
        preexec_fn=few_files,
    )
    if hard == 4096:
        assert done.returncode == 0, done.stderr
    else:
        assert done.returncode == 2, done.stderr
        assert "may open at most 16 files (ulimit -n)" in done.stderr
        assert not ExportPaths(output).manifest.exists()  # nothing requested
        done = journey_export(*args[len(PYTHON) :], env=env_for(sandbox_port))
        assert done.returncode == 0, done.stderr

    assert output.read_bytes() == expected_output(
        History(7, 50), hour_now() - 26 * HOUR, hour_now() - 2 * HOUR
    )
