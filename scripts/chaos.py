"""Chaos runs of the real command line against the sandbox, with kills and faults.

Each scenario is drawn from its seed: the sandbox's switches, the request, fault
rates and when to kill the export. The sandbox is served in a thread of this
process on 127.0.0.1; every export is a real ``python -m orchestrator run``
subprocess. A scenario exports once without faults (the clean run), then with
faults, killing the export with SIGKILL or SIGTERM at random moments and rerunning
the same command until it exits 0. The output is compared with the clean run byte
for byte, and its rows with the ground truth as a multiset.

    .venv/bin/python scripts/chaos.py --scenarios 200 --jobs 2

Exits 1 if any scenario's output differs from its clean run or breaks a rule
(a wrong exit code, a traceback, a hang, files left behind).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import csv
import datetime as dt
import io
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.manifest import ExportPaths, Manifest
from orchestrator.sandbox import (
    History,
    SandboxServer,
    parse_faults,
    settings_from_options,
)
from orchestrator.sandbox.faults import DOWNLOAD_KINDS
from tests.conftest import draw_columns, expected_output

_T = TypeVar("_T")

HOUR = dt.timedelta(hours=1)
PYTHON = [sys.executable, "-m", "orchestrator"]
RATE_KINDS = DOWNLOAD_KINDS  # every download fault, in the sandbox's order
WINDOWS = ("1h", "1h", "1h", "1h", "30m", "20m", "15m", "10m", "2h")
STATUS_FILTERS = (("Failed",), ("complete", "Active"), ("Waiting", "Unknown"))
# Windows split down to one minute, so a window shorter than two minutes cannot be
# split. With SFMC's 8 default columns such a window holds well under 12 kB; rows of
# more columns are wider, so the cap grows with the columns (cap_for): a cap no
# window can meet would fail the clean run, and test nothing. (Our own
# --safety-cap-mb cannot go below 1 MB, more than the windows here hold, so only the
# server's cap makes windows split.)
CAPS = (12_000, 20_000, 40_000)
READ_TIMEOUT = 0.6
STALL_SECONDS = 2.0
RUN_TIMEOUT = 120.0
MAX_RUNS = 15
FRAGMENT_BYTES = 512
# Log text that a healthy sandbox (one that never lies about its bodies) must never
# cause: a body refused as permanently wrong, or a window that cannot be exported.
UNEXPECTED = (
    "is not deflate data",
    "is not gzip data",
    "not the requested",
    "cannot be split further",
    "has no header line",
)


@dataclass(frozen=True, slots=True)
class Kill:
    """Send ``signal`` at ``moment`` (a share of the clean run's duration) into a
    run; ``then_kill`` seconds later, SIGKILL too."""

    signal: int
    moment: float
    then_kill: float | None = None

    def delay(self, clean_seconds: float) -> float:
        """Seconds after the start: the process needs about 0.4 s to start up."""
        return 0.2 + self.moment * max(0.5, clean_seconds)


@dataclass(frozen=True, slots=True)
class Scenario:
    """Everything one scenario does, drawn from its seed."""

    index: int
    seed: str
    sandbox: dict[str, str]
    faults: str
    start: dt.datetime
    end: dt.datetime
    flags: tuple[str, ...]
    fmt: str
    columns: tuple[str, ...]
    window: dt.timedelta
    statuses: tuple[str, ...]
    config: str
    kills: tuple[Kill, ...]
    again: tuple[Kill, ...] | None
    fragment: str

    def describe(self) -> str:
        names = ("end_inclusive", "empty_window", "newline", "bom", "transfer")
        shown = [f"{name}={self.sandbox[name]}" for name in names]
        shown.append(f"fragment={self.fragment}")
        flags = [flag for flag in self.flags if not flag.startswith("--columns")]
        return " ".join([*shown, f"columns={len(self.columns)}", *flags])


@dataclass(slots=True)
class Run:
    """One export process: how it ended."""

    code: int
    sent: str | None
    seconds: float
    stderr: str


@dataclass(slots=True)
class Outcome:
    """What one scenario found."""

    index: int
    seed: str
    rows_expected: int = 0
    rows_lost: int = 0
    rows_duplicated: int = 0
    identical: bool = False
    clean_is_truth: bool = False
    runs: list[str] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    describe: str = ""
    reproduce: str = ""

    @property
    def ok(self) -> bool:
        return self.identical and not self.problems and self.clean_is_truth


# Drawing a scenario


def draw_scenario(seed: int, index: int, fragment: str) -> Scenario:
    rng = random.Random(f"chaos:{seed}:{index}")
    fragmented = rng.random() < 0.25  # drawn always: --fragment none keeps the rest
    sandbox = draw_sandbox(rng)
    fmt = rng.choice(["csv", "tsv"])
    inclusive = sandbox["end_inclusive"] == "true"
    columns = draw_columns(rng, inclusive)
    start, end, window = draw_range(rng)
    statuses = rng.choice(STATUS_FILTERS) if rng.random() < 0.15 else ()
    if rng.random() < 0.2:  # the server refuses a large body: 400 errorcode 10006
        cap = cap_for(rng.choice(CAPS), columns)
        sandbox.update(cap_bytes=str(cap), cap_behaviour="error")

    flags = draw_flags(rng, fmt, columns, window, statuses)
    return Scenario(
        index=index,
        seed=f"{seed}:{index}",
        sandbox=sandbox,
        faults=draw_faults(rng),
        start=start,
        end=end,
        flags=flags,
        fmt=fmt,
        columns=columns,
        window=window,
        statuses=statuses,
        config=draw_config(rng),
        kills=draw_kills(rng),
        again=draw_again(rng),
        fragment=fragment if fragmented else "none",
    )


def cap_for(cap: int, columns: tuple[str, ...]) -> int:
    """A size cap scaled to the row width: 25 columns make rows about 3 times wider
    than the 8 default ones."""
    return cap * max(8, len(columns)) // 8


def draw_sandbox(rng: random.Random) -> dict[str, str]:
    pick = rng.choice
    return {
        "seed": str(rng.randrange(10_000)),
        "rows_per_hour": str(rng.randint(50, 300)),
        "end_inclusive": pick(["true", "false"]),
        "empty_window": pick(["header", "empty", "204"]),
        "newline": pick(["lf", "crlf"]),
        "bom": pick(["true", "false"]),
        "transfer": pick(["chunked", "length"]),
        "honour_accept_encoding": pick(["true", "true", "true", "false"]),
        "deflate_raw": pick(["true", "false", "false"]),
        "token_lifetime_seconds": pick(["1080", "1080", "1080", "2"]),
        "max_concurrent_downloads": pick(["none", "none", "none", "2"]),
        "first_byte_seconds": pick(["0", "0.05", "0.1", "0.2"]),
        "bandwidth_bytes_per_second": pick(["none", "none", "none", "40000"]),
        "estimate_shape": pick(["a", "a", "b", "garbage"]),
        "freshness_shape": pick(["a", "a", "b", "garbage"]),
    }


def draw_faults(rng: random.Random) -> str:
    kinds = rng.sample(RATE_KINDS, rng.randint(2, 8))
    budget = rng.uniform(0.2, 0.6)
    weights = [rng.random() + 0.1 for _ in kinds]
    items = [
        f"{kind}={budget * weight / sum(weights):.3f}"
        for kind, weight in zip(kinds, weights, strict=True)
    ]
    if rng.random() < 0.4:
        items.append(f"token_error={rng.uniform(0.02, 0.2):.3f}")

    items += [
        f"stall_seconds={STALL_SECONDS}",
        f"first_byte_seconds={rng.choice([0.3, 1.5])}",
        f"retry_after={rng.choice([0, 0, 1])}",
        f"seed={rng.randrange(1 << 30)}",
    ]
    return ",".join(items)


def draw_range(rng: random.Random) -> tuple[dt.datetime, dt.datetime, dt.timedelta]:
    window = parse_span(rng.choice(WINDOWS))
    now = dt.datetime.now(dt.UTC)
    hour = now.replace(minute=0, second=0, microsecond=0)
    if rng.random() < 0.15:  # recent: the last windows are provisional
        end = now - dt.timedelta(minutes=rng.randint(3, 15))
        end = end.replace(microsecond=end.microsecond // 1000 * 1000)
    else:
        end = hour - (3 + rng.randrange(72)) * HOUR

    start = end - rng.randint(3, 6) * HOUR
    if rng.random() < 0.4:  # short first and last windows, odd milliseconds
        start += dt.timedelta(
            minutes=rng.randint(1, 50), milliseconds=rng.randrange(1000)
        )
        end -= dt.timedelta(
            minutes=rng.randint(0, 20), milliseconds=rng.randrange(1000)
        )

    return start, end, window


def draw_flags(
    rng: random.Random,
    fmt: str,
    columns: tuple[str, ...],
    window: dt.timedelta,
    statuses: tuple[str, ...],
) -> tuple[str, ...]:
    flags = [
        f"--format={fmt}",
        f"--window={int(window.total_seconds() // 60)}m",
        f"--concurrency={rng.randint(2, 8)}",
        f"--compression={rng.choice(['gzip', 'deflate', 'none'])}",
        f"--columns={','.join(columns)}",
    ]
    if rng.random() < 0.2:
        flags.append("--keep-parts")

    if rng.random() < 0.3:
        flags.append("--no-estimate")

    if statuses:
        flags.append(f"--status={','.join(statuses)}")

    if rng.random() < 0.4:  # flush after almost every window, kills between flushes
        flags.append("--flush-mb=0.001")

    return tuple(flags)


def draw_config(rng: random.Random) -> str:
    return (
        "[retry]\n"
        f"max_attempts = {rng.randint(2, 4)}\n"
        "backoff_initial_seconds = 0.02\n"
        "backoff_max_seconds = 0.1\n"
        "[http]\n"
        "connect_timeout_seconds = 5\n"
        f"read_timeout_seconds = {READ_TIMEOUT}\n"
    )


def draw_kills(rng: random.Random) -> tuple[Kill, ...]:
    if rng.random() < 0.25:
        return ()

    kills = []
    for _ in range(rng.choice([1, 1, 2, 2, 3, 4])):
        kind = rng.random()
        after = rng.uniform(0.1, 1.2)
        if kind < 0.65:
            kills.append(Kill(signal.SIGKILL, after))
        elif kind < 0.9:
            kills.append(Kill(signal.SIGTERM, after))
        else:  # SIGKILL while the SIGTERM is being handled
            kills.append(Kill(signal.SIGTERM, after, rng.uniform(0.0, 0.2)))

    return tuple(kills)


def draw_again(rng: random.Random) -> tuple[Kill, ...] | None:
    """Whether to run the command again once complete, and how to kill that run."""
    if rng.random() < 0.7:
        return None

    return draw_kills(rng)[:1] if rng.random() < 0.5 else ()


def parse_span(text: str) -> dt.timedelta:
    number, unit = int(text[:-1]), text[-1]
    return dt.timedelta(hours=number) if unit == "h" else dt.timedelta(minutes=number)


# The network: a proxy on 127.0.0.1 that delivers answers in small pieces


class FragmentingProxy:
    """Forward TCP to the sandbox, delivering the first FRAGMENT_BYTES of each
    answer's body in pieces of 1 to 16 bytes, 1 ms apart, as a slow or congested
    link does. Bytes are never changed, dropped or reordered: only their timing.

    ``scope`` "files" slices only download bodies (Content-Disposition:
    attachment); "all" slices every answer, tokens and JSON included.
    """

    def __init__(self, target_port: int, scope: str, seed: str) -> None:
        self.port = 0
        self._target = target_port
        self._scope = scope
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _connect(
        self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter
    ) -> None:
        try:
            server, to_server = await asyncio.open_connection("127.0.0.1", self._target)
        except OSError:
            to_client.close()
            return

        await asyncio.gather(
            self._forward(client, to_server), self._answers(server, to_client)
        )

    async def _forward(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def _answers(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        recent, remaining = b"", 0
        try:
            while data := await reader.read(65536):
                while data:
                    if remaining:
                        size = min(len(data), remaining, self._rng.randint(1, 16))
                        await self._send(writer, data[:size], pause=0.001)
                        data, remaining = data[size:], remaining - size
                        continue

                    seen = recent + data
                    end = seen.find(b"\r\n\r\n")
                    if end < 0:
                        await self._send(writer, data)
                        recent, data = seen[-4096:], b""
                        continue

                    cut = end + 4 - len(recent)
                    await self._send(writer, data[:cut])
                    head, recent, data = seen[: end + 4], b"", data[cut:]
                    if self._scope == "all" or b"attachment" in head[-2048:]:
                        remaining = FRAGMENT_BYTES
        except OSError:
            pass
        finally:
            writer.close()

    @staticmethod
    async def _send(
        writer: asyncio.StreamWriter, data: bytes, pause: float = 0
    ) -> None:
        writer.write(data)
        await writer.drain()
        if pause:
            await asyncio.sleep(pause)


# The sandbox, served from a thread of this process


class ThreadSandbox:
    """A SandboxServer on 127.0.0.1 whose event loop runs in a daemon thread."""

    def __init__(self, options: dict[str, str]) -> None:
        self.server = SandboxServer(settings_from_options(options))
        self.proxy: FragmentingProxy | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> ThreadSandbox:
        self._thread.start()
        self._call(self.server.start())
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.proxy is not None:
            self._call(self.proxy.close())

        self._call(self.server.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def port(self) -> int:
        """Where exports connect: the proxy when there is one."""
        return self.proxy.port if self.proxy else self.server.port

    def set_faults(self, spec: str, fragment: str, seed: str) -> None:
        """Switch faults on and forget the counts of the clean run."""

        async def switch() -> None:
            self.server.update(faults=parse_faults(spec))
            self.server.stats.reset()
            if fragment != "none":
                self.proxy = FragmentingProxy(self.server.port, fragment, seed)
                await self.proxy.start()
                # The token answer names the REST URL; point it at the proxy too.
                # The sandbox has no setting for it, hence its private attribute.
                self.server._app.base_url = f"http://127.0.0.1:{self.proxy.port}/"

        self._call(switch())

    def faults(self) -> dict[str, int]:
        async def read() -> dict[str, int]:
            return dict(self.server.stats.faults)

        return self._call(read())

    def _call(self, job: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(job, self._loop).result(30)


# Ground truth and comparison


def ground_truth(scenario: Scenario) -> bytes:
    """The bytes a correct export writes: header, then windows oldest first."""
    history = History(
        int(scenario.sandbox["seed"]), int(scenario.sandbox["rows_per_hour"])
    )
    return expected_output(
        history,
        scenario.start,
        scenario.end,
        span=scenario.window,
        columns=scenario.columns,
        fmt=scenario.fmt,
        newline="\r\n" if scenario.sandbox["newline"] == "crlf" else "\n",
        filters={"statuses": list(scenario.statuses)} if scenario.statuses else None,
    )


def parsed_rows(data: bytes, fmt: str) -> collections.Counter[tuple[str, ...]]:
    """The data rows (header excluded) as a multiset, parsed by the csv module."""
    text = io.StringIO(data.decode("utf-8"), newline="")
    reader = csv.reader(text, delimiter="\t" if fmt == "tsv" else ",")
    next(reader, None)
    return collections.Counter(tuple(row) for row in reader)


# Running exports


def export_command(scenario: Scenario, output: Path, config: Path) -> list[str]:
    return [
        *PYTHON,
        "run",
        f"--config={config}",
        f"--start={scenario.start.isoformat()}",
        f"--end={scenario.end.isoformat()}",
        f"--output={output}",
        *scenario.flags,
    ]


def sandbox_command(scenario: Scenario) -> list[str]:
    command = [*PYTHON, "sandbox", "--port", "8765"]
    for key, value in scenario.sandbox.items():
        command += ["--set", f"{key}={value}"]

    return [*command, "--fault", scenario.faults]


def environment(port: int) -> dict[str, str]:
    return {
        **os.environ,
        "SFMC_CLIENT_ID": "sandbox-client",
        "SFMC_CLIENT_SECRET": "sandbox-secret",
        "SFMC_AUTH_URL": f"http://127.0.0.1:{port}",
    }


def run_export(
    command: list[str],
    env: dict[str, str],
    log: Path,
    kill: Kill | None = None,
    clean_seconds: float = 1.0,
) -> Run:
    started = time.monotonic()
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
        sent = _signal_later(process, kill, clean_seconds) if kill else None
        try:
            code = process.wait(RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            sent, code = "hang", -999

    text = log.read_text(errors="replace")
    return Run(code, sent, time.monotonic() - started, text)


def _signal_later(
    process: subprocess.Popen[bytes], kill: Kill, clean_seconds: float
) -> str | None:
    try:
        process.wait(kill.delay(clean_seconds))
        return None  # it ended first
    except subprocess.TimeoutExpired:
        pass

    process.send_signal(kill.signal)
    name = "kill" if kill.signal == signal.SIGKILL else "term"
    if kill.then_kill is not None:
        try:
            process.wait(kill.then_kill)
        except subprocess.TimeoutExpired:
            process.kill()
            name = "term+kill"

    return name


def check_run(run: Run, outcome: Outcome) -> None:
    """Record a run's code, and a problem if the code or its stderr is wrong."""
    outcome.runs.append(f"{run.sent}:{run.code}" if run.sent else str(run.code))
    for text in UNEXPECTED:
        if text in run.stderr:
            found = [ln for ln in run.stderr.splitlines() if text in ln][:1]
            outcome.problems.append(f"unexpected error from a healthy server: {found}")

    allowed = {0, 1}
    if run.sent == "kill":
        allowed |= {-signal.SIGKILL}
    elif run.sent == "term":
        allowed |= {130, -signal.SIGTERM}
    elif run.sent == "term+kill":
        allowed |= {130, -signal.SIGTERM, -signal.SIGKILL}

    if run.code not in allowed:
        last = run.stderr.strip().splitlines()[-3:]
        outcome.problems.append(f"exit {run.code} after {run.sent}: {last}")

    if "Traceback" in run.stderr:
        outcome.problems.append("traceback: " + run.stderr[-1500:])


def export_until_done(
    command: list[str],
    env: dict[str, str],
    logs: Path,
    kills: Sequence[Kill],
    clean_seconds: float,
    outcome: Outcome,
) -> None:
    """Run the same command until it exits 0, killing the first runs as drawn."""
    pending = list(kills)
    for number in range(MAX_RUNS):
        kill = pending.pop(0) if pending else None
        log = logs / f"run{len(outcome.runs)}.log"
        run = run_export(command, env, log, kill, clean_seconds)
        check_run(run, outcome)
        if run.code == 0:
            return

        if run.sent == "hang":
            outcome.problems.append(f"run {number + 1} hung for {RUN_TIMEOUT:.0f} s")
            return

    outcome.problems.append(f"not complete after {MAX_RUNS} runs")


def clean_export(command: list[str], env: dict[str, str], folder: Path) -> Run:
    """The run without faults; a concurrency cap may still fail windows: rerun."""
    started = time.monotonic()
    for attempt in range(MAX_RUNS):
        run = run_export(command, env, folder / f"clean{attempt}.log")
        if run.code != 1:
            break

    run.seconds = (time.monotonic() - started) / (attempt + 1)
    return run


# One scenario


def run_scenario(scenario: Scenario, work: Path) -> Outcome:
    started = time.monotonic()
    folder = work / f"scenario-{scenario.index:04d}"
    folder.mkdir(parents=True)
    config = folder / "chaos.toml"
    config.write_text(scenario.config)
    config.chmod(0o600)
    clean = folder / f"clean.{scenario.fmt}"
    chaos = folder / f"chaos.{scenario.fmt}"
    with ThreadSandbox(scenario.sandbox) as sandbox:
        first = clean_export(
            export_command(scenario, clean, config), environment(sandbox.port), folder
        )
        sandbox.set_faults(scenario.faults, scenario.fragment, scenario.seed)
        env = environment(sandbox.port)
        command = export_command(scenario, chaos, config)
        outcome = Outcome(scenario.index, scenario.seed)
        export_until_done(command, env, folder, scenario.kills, first.seconds, outcome)
        if scenario.again is not None and not outcome.problems:
            # The same command once more: complete exports stay as they are, and
            # provisional windows (a recent range) are requested again.
            outcome.runs.append("|")
            kills = scenario.again
            export_until_done(command, env, folder, kills, first.seconds, outcome)

        outcome.faults = sandbox.faults()

    if first.code != 0:
        outcome.problems.append(f"clean run exit {first.code}: {first.stderr[-500:]}")

    compare(scenario, clean, chaos, outcome)
    check_leftovers(scenario, chaos, outcome)
    outcome.seconds = time.monotonic() - started
    outcome.describe = scenario.describe()
    outcome.reproduce = (
        f"{shlex.join(sandbox_command(scenario))}\n"
        f"  (config {config}: {scenario.config!r})\n"
        f"  {shlex.join(command)}\n  kills {scenario.kills}, "
        f"fragmenting proxy: {scenario.fragment}"
    )
    return outcome


def compare(scenario: Scenario, clean: Path, chaos: Path, outcome: Outcome) -> None:
    truth = ground_truth(scenario)
    expected = parsed_rows(truth, scenario.fmt)
    outcome.rows_expected = sum(expected.values())
    clean_bytes = clean.read_bytes() if clean.exists() else b""
    outcome.clean_is_truth = clean_bytes == truth
    if not chaos.exists():
        outcome.problems.append("no output")
        outcome.rows_lost = outcome.rows_expected
        return

    data = chaos.read_bytes()
    found = parsed_rows(data, scenario.fmt)
    outcome.rows_lost = sum((expected - found).values())
    outcome.rows_duplicated = sum((found - expected).values())
    outcome.identical = data == clean_bytes
    if not outcome.identical:
        doubled = [",".join(row)[:60] for row in (found - expected)][:3]
        outcome.problems.append(
            f"output differs from the clean run: {outcome.rows_lost} rows lost, "
            f"{outcome.rows_duplicated} duplicated {doubled}"
        )

    if not outcome.clean_is_truth:
        outcome.problems.append("the clean run differs from the ground truth")


def check_leftovers(scenario: Scenario, output: Path, outcome: Outcome) -> None:
    """Once complete: no partial output, no parts but those asked to be kept."""
    paths = ExportPaths(output)
    if not output.exists():
        return

    if paths.partial.exists():
        outcome.problems.append("the .partial file is left behind")

    if paths.manifest.exists() and not Manifest.load(paths.manifest).complete:
        outcome.problems.append("the manifest is not complete")

    if paths.parts.exists():
        stray = [p.name for p in paths.parts.iterdir() if not p.name.endswith(".part")]
        if stray:
            outcome.problems.append(f"stray files in the parts folder: {stray}")
        elif "--keep-parts" not in scenario.flags:
            outcome.problems.append("the parts folder is left behind")


def scenario_job(seed: int, index: int, work: str, fragment: str) -> Outcome:
    scenario = draw_scenario(seed, index, fragment)
    try:
        return run_scenario(scenario, Path(work))
    except Exception as error:  # report it as this scenario's failure, go on
        outcome = Outcome(index, scenario.seed, describe=scenario.describe())
        outcome.problems.append(f"chaos harness error: {type(error).__name__}: {error}")
        return outcome


# The command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1, help="the run's seed")
    parser.add_argument("--jobs", type=int, default=2, help="scenarios at once")
    parser.add_argument("--first", type=int, default=0, help="first scenario index")
    parser.add_argument("--work", type=Path, help="folder for outputs (kept)")
    parser.add_argument(
        "--fragment",
        choices=["files", "all", "none"],
        default="files",
        help="in a quarter of the scenarios, deliver the start of download bodies "
        "(files) or of every answer (all) in small pieces through a proxy",
    )
    return parser.parse_args(argv)


def line(outcome: Outcome) -> str:
    state = "ok  " if outcome.ok else "FAIL"
    faults = sum(outcome.faults.values())
    identical = "yes" if outcome.identical else "NO"
    return (
        f"{state} #{outcome.index:<4d} seed {outcome.seed:<8s} "
        f"rows {outcome.rows_expected:5d} lost {outcome.rows_lost} "
        f"dup {outcome.rows_duplicated} identical {identical} "
        f"faults {faults:3d} runs {','.join(outcome.runs)} {outcome.seconds:.1f}s | "
        f"{outcome.describe}"
    )


def summary(outcomes: list[Outcome], seconds: float) -> list[str]:
    identical = sum(o.identical for o in outcomes)
    faults: collections.Counter[str] = collections.Counter()
    for outcome in outcomes:
        faults.update(outcome.faults)

    runs = [code for o in outcomes for code in o.runs]
    kills = sum(code.startswith("kill") for code in runs)
    terms = sum(code.startswith("term") for code in runs)
    return [
        f"scenarios: {len(outcomes)}",
        f"rows expected: {sum(o.rows_expected for o in outcomes)}",
        f"rows lost: {sum(o.rows_lost for o in outcomes)}",
        f"rows duplicated: {sum(o.rows_duplicated for o in outcomes)}",
        f"outputs byte-identical to the clean run: {identical}/{len(outcomes)}",
        f"clean runs equal to the ground truth: "
        f"{sum(o.clean_is_truth for o in outcomes)}/{len(outcomes)}",
        f"scenarios with problems: {sum(bool(o.problems) for o in outcomes)}",
        f"export runs: {len(runs)} ({kills} SIGKILL, {terms} SIGTERM)",
        f"faults injected: {sum(faults.values())} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(faults.items()))})",
        f"wall time: {seconds:.0f} s",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="chaos-"))
    print(f"chaos: {args.scenarios} scenarios, seed {args.seed}, work {work}")
    started = time.monotonic()
    outcomes: list[Outcome] = []
    indexes = range(args.first, args.first + args.scenarios)
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        jobs = [
            pool.submit(scenario_job, args.seed, i, str(work), args.fragment)
            for i in indexes
        ]
        for job in concurrent.futures.as_completed(jobs):
            outcome = job.result()
            outcomes.append(outcome)
            print(line(outcome), flush=True)

    outcomes.sort(key=lambda outcome: outcome.index)
    for outcome in outcomes:
        if not outcome.ok:
            print(f"\n#{outcome.index} seed {outcome.seed}:")
            print("\n".join(f"  problem: {p}" for p in outcome.problems))
            print(f"  reproduce: {outcome.reproduce}")

    print()
    print("\n".join(summary(outcomes, time.monotonic() - started)))
    return 0 if all(outcome.ok for outcome in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
