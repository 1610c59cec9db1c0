"""Measuring one command: wall time, CPU, peak memory, and what else the machine did.

CPU comes from wait4(2), so it is exact for the whole process tree that was waited
for (curl and sh under xargs included), with nothing polled. Peak resident memory
comes from GNU time's %M: a child forked straight from this Python process would
report this process's own size as its peak (the kernel keeps the larger of the two),
while GNU time forks from a small program. The sandbox's CPU and the rest of the
machine's are read from /proc before and after, to tell whether the sandbox or
another program was in the way.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

TICK = os.sysconf("SC_CLK_TCK")
GNU_TIME = "/usr/bin/time"


@dataclass(frozen=True, slots=True)
class Run:
    """One measured command; times in seconds, memory in KiB."""

    wall: float
    cpu: float
    peak_rss_kib: int
    sandbox_cpu: float
    other_cpu: float
    output: str

    def as_dict(self) -> dict[str, object]:
        return {
            "wall": round(self.wall, 4),
            "cpu": round(self.cpu, 3),
            "peak_rss_kib": self.peak_rss_kib,
            "sandbox_cpu": round(self.sandbox_cpu, 3),
            "other_cpu": round(self.other_cpu, 3),
        }


def machine_busy() -> float:
    """CPU seconds every core of the machine has spent busy since boot."""
    with open("/proc/stat") as stream:
        fields = stream.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / TICK


def wait_for_quiet(limit: float, *, idle_cores: float = 0.25) -> float:
    """Wait until the machine uses less than ``idle_cores`` of CPU over half a
    second, or ``limit`` seconds have passed; return the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        before = machine_busy()
        time.sleep(0.5)
        if (machine_busy() - before) / 0.5 < idle_cores:
            break
    return time.monotonic() - started


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) one running process has used."""
    with open(f"/proc/{pid}/stat") as stream:
        fields = stream.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def measure(
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    log: Path,
    sandbox: Sandbox | None = None,
    settle: float = 10.0,
) -> Run:
    """Run ``command`` to its end; raise CalledProcessError if it fails.

    Dirty pages are written out first, so that no run pays for the last one's, and
    the run waits (up to ``settle`` seconds) for the machine to be nearly idle.
    """
    os.sync()
    wait_for_quiet(settle)
    busy = machine_busy()
    sandbox_cpu = sandbox.cpu() if sandbox else 0.0
    peak = log.with_name(log.name + ".rss")
    timed = [GNU_TIME, "-f", "%M", "-o", str(peak), *command]
    with log.open("w") as output:
        started = time.perf_counter()
        process = subprocess.Popen(
            timed,
            env=dict(env),
            cwd=log.parent,  # not the checkout: PYTHONPATH can choose the code
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, command, text)

    cpu = usage.ru_utime + usage.ru_stime
    sandbox_cpu = (sandbox.cpu() if sandbox else 0.0) - sandbox_cpu
    other = machine_busy() - busy - cpu - sandbox_cpu
    rss = int(peak.read_text().split()[-1])
    return Run(wall, cpu, rss, sandbox_cpu, max(other, 0.0), text)


def compile_package(python: str, env: Mapping[str, str]) -> Path:
    """Write the bytecode of the ``orchestrator`` that ``python`` imports under
    ``env``, as installing it with pip would; return its folder.

    An editable install leaves it to the first run, and with
    PYTHONDONTWRITEBYTECODE set (as on the machine these figures come from) every
    run would compile the package from source again: about 0.2 s of each start-up.
    """
    where = [python, "-c", "import orchestrator; print(orchestrator.__path__[0])"]
    found = subprocess.run(where, env=dict(env), check=True, capture_output=True)
    folder = Path(found.stdout.decode().strip())
    command = [python, "-m", "compileall", "-q", str(folder)]
    subprocess.run(command, env=dict(env), check=True)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Sandbox:
    """``journey-export sandbox`` in its own process on a free loopback port."""

    def __init__(
        self,
        program: Sequence[str],
        settings: Mapping[str, object],
        *,
        env: Mapping[str, str],
        log: Path,
    ) -> None:
        self.port = free_port()
        options = [item for k, v in settings.items() for item in ("--set", f"{k}={v}")]
        command = [*program, "sandbox", "--port", str(self.port), *options]
        self._log = log.open("w")
        self._process = subprocess.Popen(
            command,
            env=dict(env),
            cwd=log.parent,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.auth_url = f"http://127.0.0.1:{self.port}"
        self._wait_ready()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def cpu(self) -> float:
        return process_cpu(self._process.pid)

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._log.close()
                tail = Path(self._log.name).read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the sandbox exited:\n{tail}")
            try:
                stats = f"{self.auth_url}/sandbox/stats"
                with urllib.request.urlopen(stats, timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the sandbox did not start within 30 s")
