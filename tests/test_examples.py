"""The scheduler examples in examples/ parse, and call journey-export as it exists.

Cheap checks that need no scheduler: each example's journey-export command is
checked against ``journey-export --help`` and ``journey-export run --help`` (flag
names, which flags take a value, choices, global flags before ``run``), its output
template is rendered by ``journey-export plan``, and its hard time limit is compared
with its ``--max-duration``. The cron lines are run by /bin/sh with a stand-in
journey-export to see what each exit code does. Real checkers run where they are
installed (``crontab -n``, ``systemd-analyze verify``) and are skipped otherwise.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CRONTAB = EXAMPLES / "cron" / "journey-export.cron"
SERVICE = EXAMPLES / "systemd" / "journey-export.service"
TIMER = EXAMPLES / "systemd" / "journey-export.timer"
DAG = EXAMPLES / "airflow" / "journey_export_dag.py"
CRONJOB = EXAMPLES / "kubernetes" / "cronjob.yaml"

CRON_WORKDIR = "/var/lib/journey-export"
MAX_DURATION = re.compile(r"^(\d+)([smhd])$")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


# --- journey-export's own description of its flags ----------------------------------


@dataclass(frozen=True)
class Options:
    """The option strings of a parser, those taking a value, and their choices."""

    names: frozenset[str]
    valued: frozenset[str]
    choices: dict[str, frozenset[str]]


def journey_export() -> list[str]:
    """The installed console script, else the module (the same program)."""
    script = Path(sys.executable).with_name("journey-export")
    return [str(script)] if script.exists() else [sys.executable, "-m", "orchestrator"]


@cache
def help_options(*command: str) -> Options:
    """Parse the usage and options that ``journey-export [command] --help`` prints."""
    shown = subprocess.run(
        [*journey_export(), *command, "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=30,
    ).stdout
    names = frozenset(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", shown))
    valued: set[str] = set()
    choices: dict[str, frozenset[str]] = {}
    for flag, value in re.findall(r"\[(--[a-z][a-z0-9-]*) ([^\]\[]+)\]", shown):
        valued.add(flag)
        if value.startswith("{"):
            choices[flag] = frozenset(value.strip("{}").split(","))
    return Options(names, frozenset(valued), choices)


def check_invocation(argv: list[str]) -> dict[str, list[str]]:
    """Fail unless ``argv`` (after the program) is a valid ``journey-export run``.

    Returns each run flag with its values, in order.
    """
    assert "run" in argv, f"no 'run' command in {argv}"
    split = argv.index("run")
    check_flags(argv[:split], help_options(), "journey-export")
    return check_flags(argv[split + 1 :], help_options("run"), "journey-export run")


def check_flags(argv: list[str], options: Options, where: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    items = iter(argv)
    for item in items:
        flag, equals, inline = item.partition("=")
        assert flag.startswith("--"), f"{item!r}: an argument no flag takes"
        assert flag in options.names, f"{flag} is not in `{where} --help`"
        if flag not in options.valued:
            assert not equals, f"{flag} takes no value"
            found.setdefault(flag, [])
            continue
        value = inline if equals else next(items, None)
        assert value is not None, f"{flag} needs a value"
        assert equals or not value.startswith("--"), f"{flag} needs a value"
        if flag in options.choices:
            assert value in options.choices[flag], f"{flag} {value}: not a choice"
        found.setdefault(flag, []).append(value)
    return found


def seconds_of(duration: str) -> int:
    match = MAX_DURATION.match(duration)
    assert match, f"--max-duration {duration!r} is not of the form 50m"
    return int(match.group(1)) * UNIT_SECONDS[match.group(2)]


def check_scheduling_flags(flags: dict[str, list[str]]) -> tuple[str, int]:
    """What every example does: --since-last, a budget, an output named by start.

    Returns the output template and the budget in seconds.
    """
    assert "--since-last" in flags
    assert "--end" not in flags and "--last" not in flags  # --since-last refuses them
    (output,) = flags["--output"]
    # Named by start, to the minute: one file per export, found again on resume.
    assert "{start:" in output and "%H%M" in output, output
    assert "{end" not in output, "a resumed --since-last run has another end"
    (budget,) = flags["--max-duration"]
    return output, seconds_of(budget)


@cache
def check_template(output: str) -> None:
    """``journey-export plan`` renders the output name (it requests nothing)."""
    done = subprocess.run(
        [
            *journey_export(),
            "plan",
            *("--start", "2026-12-01T00:00Z", "--end", "2026-12-01T01:00Z"),
            *("--output", output),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr


# --- cron -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CronJob:
    fields: tuple[str, ...]
    command: str


CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
MONTHS = "jan feb mar apr may jun jul aug sep oct nov dec".split()  # noqa: SIM905
DAYS = "sun mon tue wed thu fri sat".split()  # noqa: SIM905
CRON_NAMES: tuple[dict[str, int], ...] = (
    {},
    {},
    {},
    {month: number for number, month in enumerate(MONTHS, 1)},
    {day: number for number, day in enumerate(DAYS)},
)


def read_crontab() -> tuple[dict[str, str], list[CronJob]]:
    environment: dict[str, str] = {}
    jobs: list[CronJob] = []
    for line in CRONTAB.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        assignment = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$", text)
        if assignment:
            environment[assignment.group(1)] = assignment.group(2)
            continue
        parts = text.split(None, 5)
        assert len(parts) == 6, f"not five time fields and a command: {text}"
        jobs.append(CronJob(tuple(parts[:5]), parts[5]))
    return environment, jobs


def check_cron_field(text: str, index: int) -> None:
    low, high = CRON_RANGES[index]
    for item in text.split(","):
        span, _, step = item.partition("/")
        assert not step or (step.isdigit() and int(step) > 0), f"bad step in {text}"
        if span == "*":
            continue
        ends = span.split("-")
        assert len(ends) <= 2, f"bad range {span}"
        for end in ends:
            value = CRON_NAMES[index].get(end.lower())
            number = value if value is not None else int(end)
            assert low <= number <= high, f"{end} outside {low}-{high} in {text}"


def cron_command(command: str) -> str:
    """The shell command cron runs: no bare %, and each \\% becomes %."""
    assert re.search(r"(?<!\\)%", command) is None, "a bare % ends a cron command"
    return command.replace("\\%", "%")


def shell_invocation(command: str) -> list[str]:
    """The arguments of the one ``journey-export`` call in a shell command."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    start = tokens.index("journey-export")
    argv: list[str] = []
    for token in tokens[start + 1 :]:
        if set(token) <= set("();<>|&"):
            break
        argv.append(token)
    return argv


def test_crontab_fields_and_flags() -> None:
    environment, jobs = read_crontab()
    assert environment["SHELL"] == "/bin/sh"
    assert "/opt/journey-export/.venv/bin" in environment["PATH"].split(":")
    assert environment.get("MAILTO"), "cron mails the alert lines to MAILTO"
    assert len(jobs) == 2
    for job in jobs:
        for index, field in enumerate(job.fields):
            check_cron_field(field, index)
        command = cron_command(job.command)
        assert "flock" not in command, "journey-export locks its output itself"
        flags = check_invocation(shell_invocation(command))
        output, budget = check_scheduling_flags(flags)
        check_template(output)
        # Runs are an hour apart: the budget must end each before the next starts.
        assert budget < 3600
        assert ">>logs/journey-export.log 2>&1" in command


def crontab_checker() -> list[str] | None:
    """A syntax check that installs nothing: Debian's -n or cronie's -T, if there."""
    crontab = shutil.which("crontab")
    if crontab is None:
        return None
    usage = subprocess.run(
        [crontab, "-h"], check=False, capture_output=True, text=True, timeout=10
    ).stderr
    if re.search(r"-n\s+\(dry run", usage):
        return [crontab, "-n"]
    if re.search(r"-T\b.*test", usage, re.IGNORECASE):
        return [crontab, "-T"]
    return None


def test_crontab_passes_the_cron_syntax_check() -> None:
    checker = crontab_checker()
    if checker is None:
        pytest.skip("no crontab with a dry-run syntax check (Debian -n, cronie -T)")
    done = subprocess.run(
        [*checker, str(CRONTAB)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr


FAKE_JOURNEY_EXPORT = """#!/bin/sh
printf '%s\\n' "$@" > "$FAKE_ARGV"
echo "a line of journey-export's own output"
exit "$FAKE_EXIT"
"""


@pytest.fixture
def cron_sandbox(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    if not Path("/bin/sh").exists():
        pytest.skip("no /bin/sh to run the cron lines with")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "journey-export"
    fake.write_text(FAKE_JOURNEY_EXPORT)
    fake.chmod(0o755)
    workdir = tmp_path / "work"
    (workdir / "logs").mkdir(parents=True)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "FAKE_ARGV": str(tmp_path / "argv"),
    }
    yield workdir, env


def run_cron_line(
    job: CronJob, workdir: Path, env: dict[str, str], code: int
) -> subprocess.CompletedProcess[str]:
    command = cron_command(job.command)
    assert command.count(CRON_WORKDIR) >= 1
    command = command.replace(CRON_WORKDIR, str(workdir))
    return subprocess.run(
        ["/bin/sh", "-c", command],
        check=False,
        env={**env, "FAKE_EXIT": str(code)},
        capture_output=True,
        text=True,
        timeout=10,
    )


@pytest.mark.parametrize(
    ("code", "flag", "alert"),
    [
        (0, False, False),
        (5, True, False),
        (4, True, False),
        (1, True, True),
        (130, True, True),
        (137, True, True),  # killed (SIGKILL, the OOM killer): state kept
        (143, True, True),  # SIGTERM before journey-export could catch it
        (2, False, True),
        (3, False, True),
        (127, False, True),  # journey-export not found: the install needs fixing
    ],
)
def test_cron_lines_treat_exit_codes(
    cron_sandbox: tuple[Path, dict[str, str]], code: int, flag: bool, alert: bool
) -> None:
    workdir, env = cron_sandbox
    nightly, retry = read_crontab()[1]
    for job in (nightly, retry):
        (workdir / "rerun.flag").touch()  # the retry line runs only with it
        done = run_cron_line(job, workdir, env, code)
        assert (workdir / "rerun.flag").exists() is flag
        # What a line prints is mailed: an alert, or nothing at all.
        mailed = done.stdout + done.stderr
        assert bool(mailed) is alert, mailed
        if alert:
            assert f"exit {code}" in mailed
        log = (workdir / "logs" / "journey-export.log").read_text()
        assert "journey-export's own output" in log

    argv = Path(env["FAKE_ARGV"]).read_text().splitlines()
    assert "exports/journey_{start:%Y%m%dT%H%MZ}.csv" in argv


def test_cron_retry_line_waits_for_the_flag(
    cron_sandbox: tuple[Path, dict[str, str]],
) -> None:
    workdir, env = cron_sandbox
    retry = read_crontab()[1][1]
    done = run_cron_line(retry, workdir, env, 1)
    assert done.returncode == 0
    assert done.stdout + done.stderr == ""
    assert not Path(env["FAKE_ARGV"]).exists(), "journey-export ran without the flag"


# --- systemd --------------------------------------------------------------------------


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections of settings, each a list of values; continued lines joined."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    logical = ""
    for line in path.read_text().splitlines():
        text = line.strip()
        if not logical and (not text or text[0] in "#;"):
            continue
        logical += text[:-1] + " " if text.endswith("\\") else text
        if text.endswith("\\"):
            continue
        entry, logical = logical, ""
        if entry.startswith("["):
            assert entry.endswith("]"), entry
            current = sections.setdefault(entry[1:-1], {})
            continue
        assert current is not None, f"{entry} outside a section"
        key, equals, value = entry.partition("=")
        assert equals, f"not KEY=value: {entry}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def exec_start_argv() -> list[str]:
    (command,) = read_unit(SERVICE)["Service"]["ExecStart"]
    assert re.search(r"%(?!%)", command.replace("%%", "")) is None, "bare % specifier"
    return shlex.split(command.replace("%%", "%"))


def test_systemd_service_settings_and_flags() -> None:
    service = {key: values[-1] for key, values in read_unit(SERVICE)["Service"].items()}
    assert service["Type"] == "oneshot"
    assert "EnvironmentFile" in service or "LoadCredential" in service
    assert service["NoNewPrivileges"] == "yes"
    assert service["UMask"] == "0077"
    assert service["Restart"] == "on-failure"
    assert set(service["RestartPreventExitStatus"].split()) == {"2", "3"}
    # systemd refuses RestartForceExitStatus= in a Type=oneshot unit.
    assert "RestartForceExitStatus" not in service
    assert "5" not in service.get("SuccessExitStatus", "").split()

    argv = exec_start_argv()
    assert argv[0].endswith("/journey-export")
    _, budget = check_scheduling_flags(check_invocation(argv[1:]))
    timeout = re.fullmatch(r"(\d+)min", service["TimeoutStartSec"])
    assert timeout, service["TimeoutStartSec"]
    assert int(timeout.group(1)) * 60 > budget


def test_systemd_timer_settings() -> None:
    timer = read_unit(TIMER)
    assert timer["Timer"]["OnCalendar"]
    assert timer["Timer"]["Persistent"] == ["true"]
    assert timer["Timer"]["Unit"] == [SERVICE.name]
    assert timer["Install"]["WantedBy"] == ["timers.target"]


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart's program exists: point it at this checkout's.
    program = exec_start_argv()[0]
    real = journey_export()
    if len(real) != 1:
        pytest.skip("no journey-export console script to stand in for ExecStart")
    (tmp_path / SERVICE.name).write_text(SERVICE.read_text().replace(program, real[0]))
    shutil.copy(TIMER, tmp_path / TIMER.name)
    done = subprocess.run(
        [analyze, "verify", SERVICE.name, TIMER.name],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout + done.stderr == ""


# --- Kubernetes -----------------------------------------------------------------------


def parse_yaml_documents(text: str) -> list[Any]:
    """Parse block-style YAML as the manifest is written: mappings, sequences, plain,
    quoted and flow-list scalars, full-line comments. Not a general YAML parser."""
    documents: list[list[tuple[int, str]]] = [[]]
    for line in text.splitlines():
        stripped = line.strip()
        if stripped == "---":
            documents.append([])
        elif stripped and not stripped.startswith("#"):
            documents[-1].append((len(line) - len(line.lstrip(" ")), stripped))
    return [_block(lines, 0)[0] for lines in documents if lines]


def _block(lines: list[tuple[int, str]], at: int) -> tuple[Any, int]:
    indent, text = lines[at]
    if text == "-" or text.startswith("- "):
        items: list[Any] = []
        while at < len(lines) and lines[at][0] == indent and lines[at][1][:1] == "-":
            rest = lines[at][1][1:].strip()
            if not rest:
                value, at = _block(lines, at + 1)
            elif re.match(r"^[\w.-]+:(\s|$)", rest):
                lines[at] = (indent + 2, rest)  # "- key: v" opens a mapping
                value, at = _block(lines, at)
            else:
                value, at = _scalar(rest), at + 1
            items.append(value)
        return items, at

    mapping: dict[str, Any] = {}
    while at < len(lines) and lines[at][0] == indent and lines[at][1][:1] != "-":
        key, colon, rest = lines[at][1].partition(":")
        assert colon, f"not 'key: value': {lines[at][1]}"
        rest = rest.strip()
        nested = at + 1 < len(lines) and (
            lines[at + 1][0] > indent
            or (lines[at + 1][0] == indent and lines[at + 1][1][:1] == "-")
        )
        if rest:
            mapping[key], at = _scalar(rest), at + 1
        elif nested:
            mapping[key], at = _block(lines, at + 1)
        else:
            mapping[key], at = None, at + 1
    return mapping, at


def _scalar(text: str) -> Any:
    if text.startswith('"'):
        return json.loads(text)
    if text.startswith("'"):
        return text[1:-1].replace("''", "'")
    if text.startswith("["):
        inner = text[1:-1].strip()
        return [_scalar(item.strip()) for item in inner.split(",")] if inner else []
    if text == "{}":
        return {}
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return {"true": True, "false": False, "null": None, "~": None}.get(text, text)


def test_yaml_reader_agrees_with_pyyaml_where_installed() -> None:
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        pytest.skip("PyYAML is not installed (not a dependency of journey-export)")
    text = CRONJOB.read_text()
    assert parse_yaml_documents(text) == list(yaml.safe_load_all(text))


def test_kubernetes_cronjob() -> None:
    documents = parse_yaml_documents(CRONJOB.read_text())
    by_kind = {document["kind"]: document for document in documents}
    assert set(by_kind) == {"CronJob", "PersistentVolumeClaim"}
    claim = by_kind["PersistentVolumeClaim"]
    cronjob = by_kind["CronJob"]
    assert cronjob["apiVersion"] == "batch/v1"

    spec = cronjob["spec"]
    assert len(spec["schedule"].split()) == 5
    for index, field in enumerate(spec["schedule"].split()):
        check_cron_field(field, index)
    assert spec["concurrencyPolicy"] == "Forbid"

    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] >= 1
    rules = {
        rule["action"]: rule["onExitCodes"]["values"]
        for rule in job["podFailurePolicy"]["rules"]
        if "onExitCodes" in rule
    }
    assert rules == {"FailJob": [2, 3], "Ignore": [5]}

    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
    (container,) = pod["containers"]
    assert container["command"] == ["journey-export"]
    assert {"secretRef": {"name": "journey-export-sfmc"}} in container["envFrom"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False

    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    data = volumes["data"]["persistentVolumeClaim"]["claimName"]
    assert data == claim["metadata"]["name"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}

    flags = check_invocation(container["args"])
    output, budget = check_scheduling_flags(flags)
    check_template(output)
    # The outputs, manifests, state file and report live on the claim.
    for path in (output, *flags["--report"]):
        assert path.startswith(mounts["data"] + "/"), path
    assert "--state-file" not in flags  # the state file sits beside the outputs
    assert pod["activeDeadlineSeconds"] > budget
    assert job["activeDeadlineSeconds"] > pod["activeDeadlineSeconds"]


# --- Airflow --------------------------------------------------------------------------


def dag_module() -> ast.Module:
    return ast.parse(DAG.read_text(), filename=str(DAG))


def module_value(module: ast.Module, name: str) -> Any:
    """A module-level constant; names of other constants in it are looked up."""
    constants: dict[str, Any] = {}
    for node in module.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                constants[node.targets[0].id] = _literal(node.value, constants)
            except ValueError:
                continue
    return constants[name]


def _literal(node: ast.expr, constants: dict[str, Any]) -> Any:
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    if isinstance(node, ast.List):
        return [_literal(item, constants) for item in node.elts]
    if isinstance(node, ast.Call) and ast.unparse(node.func) == "timedelta":
        return dt.timedelta(
            **{kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
        )
    return ast.literal_eval(node)


def test_airflow_dag_compiles() -> None:
    compile(DAG.read_text(), str(DAG), "exec")


def test_airflow_dag_runs_journey_export_as_it_exists() -> None:
    module = dag_module()
    assert module_value(module, "JOURNEY_EXPORT").endswith("/journey-export")
    flags = check_invocation(module_value(module, "EXPORT_ARGS"))
    output, budget = check_scheduling_flags(flags)
    check_template(output)
    assert module_value(module, "REPORT") == flags["--report"][0]
    # Exit 2 and 3 fail at once; every other code is retried.
    assert set(module_value(module, "FAIL_FAST")) == {2, 3}
    timeout: dt.timedelta = module_value(module, "TASK_TIMEOUT")
    assert timeout.total_seconds() > budget


def test_airflow_dag_retries_and_runs_one_at_a_time() -> None:
    calls = {
        ast.unparse(node.func): {kw.arg: kw.value for kw in node.keywords}
        for node in ast.walk(dag_module())
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("dag", "task")
    }
    assert ast.literal_eval(calls["task"]["retries"]) > 0
    assert ast.literal_eval(calls["dag"]["catchup"]) is False
    assert ast.literal_eval(calls["dag"]["max_active_runs"]) == 1
    names = {node.id for node in ast.walk(dag_module()) if isinstance(node, ast.Name)}
    assert {"AirflowFailException", "AirflowException"} <= names
