"""Benchmark journey-export against the shell-script baseline, then write the report.

    .venv/bin/python bench/run.py            # the full run, about 15 minutes
    .venv/bin/python bench/run.py --quick    # one run of each, small sizes, ~3 min

Four measurements, each against its own sandbox process on 127.0.0.1 (see
bench/README.md): the shaped comparison at several concurrencies, unshaped
throughput against curl alone, merge against cat, and memory and CPU of a large
export. The figures go to docs/benchmarks.md and docs/throughput.png, the raw
numbers to bench/last-run.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import Run, Sandbox, compile_package, measure
from merge import merge_benchmark
from report import write_report

from orchestrator import sfmc
from orchestrator.manifest import ExportPaths, Manifest

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "bench" / "baseline.sh"
PROGRAM = [sys.executable, "-m", "orchestrator"]
CREDENTIALS = {
    "SFMC_CLIENT_ID": "sandbox-client",
    "SFMC_CLIENT_SECRET": "sandbox-secret",
}
HOUR = dt.timedelta(hours=1)
MB = 1_000_000


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    last = raw_numbers_for(args.doc)
    if args.report_only:
        write_report(json.loads(last.read_text()), args.doc, plot_for(args.doc))
        say(f"wrote {args.doc} from {last}")
        return 0

    work = Path(args.work or tempfile.mkdtemp(prefix="jx-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    settings = {
        key: sorted(value) if isinstance(value, set) else value
        for key, value in vars(args).items()
    }
    settings["doc"] = str(args.doc)
    results: dict[str, Any] = {"settings": settings, "machine": machine()}
    results["machine"]["disk_write_mb_s"] = disk_rate(work)
    say(f"bytecode written for {compile_package(sys.executable, env())}")
    phases: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
        "shaped": shaped,
        "unshaped": unshaped,
    }
    try:
        for name, phase in phases.items():
            if name in args.only:
                say(f"== {name}")
                results[name] = phase(args, work)
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)

    results["seconds"] = round(time.monotonic() - started, 1)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    last.write_text(json.dumps(results, indent=1))
    write_report(results, args.doc, plot_for(args.doc))
    say(f"wrote {args.doc} in {results['seconds']:.0f} s")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="one run each, small sizes")
    add("--runs", type=int, help="runs per measurement, median kept (default 3)")
    add(
        "--merge-runs",
        type=int,
        help="runs of the merge step, median kept (default 7: each takes seconds,"
        " and the disk's flush times vary widely)",
    )
    add("--only", default="shaped,unshaped", help="phases: shaped,unshaped")
    add("--concurrency", default="1,4,16", help="shaped concurrencies")
    add("--windows-per-worker", type=int, help="shaped windows = this x concurrency")
    add("--first-byte", type=float, default=1.0, help="shaped time to first byte, s")
    add("--bandwidth", type=int, default=1_000_000, help="shaped bytes/s/connection")
    add("--rows-per-hour", type=int, default=10_000, help="shaped sandbox volume")
    add("--compression", default="gzip", help="shaped runs: gzip or none")
    add("--unshaped-gb", type=float, help="unshaped export size (default 2)")
    add("--unshaped-rows-per-hour", type=int, default=50_000)
    add("--unshaped-concurrency", type=int, default=4)
    add("--work", help="scratch folder (default: a new one under /tmp)")
    add("--keep-work", action="store_true", help="leave the scratch folder")
    add(
        "--report-only",
        action="store_true",
        help="measure nothing: rewrite the report at --doc from the raw numbers"
        " kept for it (bench/last-run.json for docs/benchmarks.md)",
    )
    add(
        "--doc",
        type=Path,
        help="report path, the plot beside it (default docs/benchmarks.md; with"
        " --quick, a folder under /tmp)",
    )
    args = parser.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    args.merge_runs = args.merge_runs or (1 if args.quick else 7)
    args.windows_per_worker = args.windows_per_worker or (4 if args.quick else 12)
    args.unshaped_gb = args.unshaped_gb or (0.25 if args.quick else 2.0)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.only = set(args.only.split(","))
    if args.doc is None:
        quick = Path(tempfile.gettempdir()) / "jx-bench-quick" / "benchmarks.md"
        args.doc = quick if args.quick else ROOT / "docs" / "benchmarks.md"
    return args


# -- the shaped comparison ------------------------------------------------------


def shaped(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Ours (with and without estimates) and the baseline, per concurrency."""
    settings = {
        "rows_per_hour": args.rows_per_hour,
        "first_byte_seconds": args.first_byte,
        "bandwidth_bytes_per_second": args.bandwidth,
        "cache_megabytes": 1024,
    }
    start = first_hour()
    found: dict[str, Any] = {
        "sandbox": settings,
        "compression": args.compression,
        "windows_per_worker": args.windows_per_worker,
    }
    with Sandbox(PROGRAM, settings, env=env(), log=work / "sandbox-shaped.log") as sb:
        widest = start + max(args.concurrency) * args.windows_per_worker * HOUR
        say("warming the sandbox (the baseline at concurrency 32, not measured)")
        warm = work / "warm.csv"
        baseline_command = baseline(start, widest, warm, 32, args.compression)
        measure(baseline_command, env=env(sb), log=work / "warm.log")
        warm.unlink()
        estimates = [*PROGRAM, "plan", "--estimate", "--concurrency", "16"]
        estimates += ["--start", api_time(start), "--end", api_time(widest)]
        measure(estimates, env=env(sb), log=work / "warm-estimates.log")
        for concurrency in args.concurrency:
            end = start + concurrency * args.windows_per_worker * HOUR
            found[str(concurrency)] = compare(args, work, sb, start, end, concurrency)
    return found


def compare(
    args: argparse.Namespace,
    work: Path,
    sb: Sandbox,
    start: dt.datetime,
    end: dt.datetime,
    concurrency: int,
) -> dict[str, Any]:
    tools: dict[str, Callable[[Path], list[str]]] = {
        "ours": lambda out: ours(start, end, out, concurrency, args.compression),
        "baseline": lambda out: baseline(
            start, end, out, concurrency, args.compression
        ),
        "ours_estimates": lambda out: ours(
            start, end, out, concurrency, args.compression, estimate=True
        ),
    }
    runs: dict[str, list[Run]] = {name: [] for name in tools}
    digests: set[str] = set()
    size = rows = 0
    for number in range(args.runs):
        names = list(tools)
        names = names[number % 3 :] + names[: number % 3]
        for name in names:
            folder = work / f"c{concurrency}-{name}-{number}"
            folder.mkdir()
            output = folder / "out.csv"
            command = tools[name](output)
            run = measure(command, env=env(sb), log=folder / "log", sandbox=sb)
            runs[name].append(run)
            digests.add(digest(output))
            size = output.stat().st_size
            if name == "ours":
                rows = Manifest.load(ExportPaths(output).manifest).totals()[0]
            shutil.rmtree(folder)
            say(
                f"c={concurrency:<3} {name:<15} run {number + 1}: {run.wall:6.2f} s  "
                f"cpu {run.cpu:5.2f} s  sandbox {run.sandbox_cpu:5.2f} s  "
                f"other {run.other_cpu:5.2f} s"
            )
    return {
        "windows": round((end - start) / HOUR),
        "bytes": size,
        "rows": rows,
        "same_output": len(digests) == 1,
        "runs": {
            name: [run.as_dict() for run in items] for name, items in runs.items()
        },
    }


# -- unshaped throughput, memory, merge -------------------------------------------


def unshaped(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Ours against curl alone and the baseline on a warm, unshaped sandbox."""
    target = int(args.unshaped_gb * 1e9)
    settings = {
        "rows_per_hour": args.unshaped_rows_per_hour,
        "cache_megabytes": math.ceil(target * 1.25 / 2**20) + 256,
    }
    columns = ",".join(sfmc.COLUMNS)
    concurrency = args.unshaped_concurrency
    start = first_hour()
    found: dict[str, Any] = {"sandbox": settings, "concurrency": concurrency}
    with Sandbox(PROGRAM, settings, env=env(), log=work / "sandbox-plain.log") as sb:
        say(f"rendering about {args.unshaped_gb} GB in the sandbox (not measured)")
        end, expected = warm_until(sb, start, target, columns)
        found.update(windows=round((end - start) / HOUR), expected_bytes=expected)
        raw = baseline(start, end, None, concurrency, "none", columns=columns)
        measure(raw, env=env(sb), log=work / "raw-warm.log")

        tools: dict[str, Callable[[Path], list[str]]] = {
            "curl_raw": lambda _: raw,
            "ours": lambda out: ours(
                start, end, out, concurrency, "none", columns=columns
            ),
            "baseline": lambda out: baseline(
                start, end, out, concurrency, "none", columns=columns
            ),
            # The least a durable export writes: each body to a file, synced.
            "curl_durable": lambda out: [
                *baseline(start, end, out, concurrency, "none", columns=columns),
                "--write-only",
            ],
        }
        runs: dict[str, list[Run]] = {name: [] for name in tools}
        digests: set[str] = set()
        size = 0
        for number in range(args.runs):
            for name, command in tools.items():
                folder = work / f"plain-{name}-{number}"
                folder.mkdir()
                output = folder / "out.csv"
                run = measure(
                    command(output), env=env(sb), log=folder / "log", sandbox=sb
                )
                runs[name].append(run)
                if output.exists():
                    size = output.stat().st_size
                    digests.add(digest(output))
                shutil.rmtree(folder)
                say(
                    f"unshaped {name:<9} run {number + 1}: {run.wall:6.2f} s  "
                    f"cpu {run.cpu:5.2f} s  rss {run.peak_rss_kib / 1024:6.1f} MiB  "
                    f"sandbox {run.sandbox_cpu:5.2f} s  other {run.other_cpu:5.2f} s"
                )
        found.update(
            bytes=size,
            same_output=len(digests) == 1,
            runs={
                name: [run.as_dict() for run in items] for name, items in runs.items()
            },
        )
        found["small"] = small_export(work, sb, start, end, concurrency, columns)
        found["merge"] = merge_runs(args, work, sb, start, end, concurrency, columns)
    return found


def warm_until(
    sb: Sandbox, start: dt.datetime, target: int, columns: str
) -> tuple[dt.datetime, int]:
    """Ask for estimates hour by hour (rendering each) until ``target`` bytes."""
    token = sandbox_token(sb)
    end, total = start, 0
    while total < target:
        body = json.dumps({"start": api_time(end), "end": api_time(end + HOUR)})
        request = urllib.request.Request(
            f"{sb.auth_url}/{sfmc.ESTIMATE_PATH}?format=csv&columns={columns}",
            data=body.encode(),
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(request) as answer:
            total += json.load(answer)["estimatedSizeBytes"]
        end += HOUR
    return end, total


def small_export(
    work: Path,
    sb: Sandbox,
    start: dt.datetime,
    end: dt.datetime,
    concurrency: int,
    columns: str,
) -> dict[str, Any]:
    """The same export over an eighth of the windows: memory must not follow size."""
    hours = max(1, round((end - start) / HOUR) // 8)
    folder = work / "small"
    folder.mkdir()
    output = folder / "out.csv"
    command = ours(
        start, start + hours * HOUR, output, concurrency, "none", columns=columns
    )
    run = measure(command, env=env(sb), log=folder / "log", sandbox=sb)
    found = {"windows": hours, "bytes": output.stat().st_size, "run": run.as_dict()}
    shutil.rmtree(folder)
    return found


def merge_runs(
    args: argparse.Namespace,
    work: Path,
    sb: Sandbox,
    start: dt.datetime,
    end: dt.datetime,
    concurrency: int,
    columns: str,
) -> dict[str, Any]:
    """Keep the parts of one more export, then time the Assembler against cat."""
    folder = work / "merge"
    folder.mkdir()
    output = folder / "kept.csv"
    command = ours(start, end, output, concurrency, "none", columns=columns)
    measure([*command, "--keep-parts"], env=env(sb), log=folder / "log")
    say("merge: Assembler against cat on the kept parts")
    found = merge_benchmark(ExportPaths(output), folder, runs=args.merge_runs, say=say)
    shutil.rmtree(folder)
    return found


# -- commands -------------------------------------------------------------------


def ours(
    start: dt.datetime,
    end: dt.datetime,
    output: Path,
    concurrency: int,
    compression: str,
    *,
    estimate: bool = False,
    columns: str | None = None,
) -> list[str]:
    command = [
        *PROGRAM,
        "--log-level",
        "WARNING",
        "run",
        *("--start", api_time(start), "--end", api_time(end)),
        *("--output", str(output), "--concurrency", str(concurrency)),
        *("--compression", compression),
    ]
    if not estimate:
        command.append("--no-estimate")
    if columns:
        command += ["--columns", columns]
    return command


def baseline(
    start: dt.datetime,
    end: dt.datetime,
    output: Path | None,
    concurrency: int,
    compression: str,
    *,
    columns: str | None = None,
) -> list[str]:
    command = [
        "bash",
        str(BASELINE),
        *("--start", api_time(start), "--end", api_time(end)),
        *("--concurrency", str(concurrency), "--compression", compression),
    ]
    command += ["--output", str(output)] if output else ["--discard"]
    if columns:
        command += ["--columns", columns]
    return command


# -- helpers --------------------------------------------------------------------


def plot_for(doc: Path) -> Path:
    return doc.with_name("throughput.png")


def raw_numbers_for(doc: Path) -> Path:
    """bench/last-run.json for the report in docs/; beside any other report, so a
    quick run never replaces the full run's numbers."""
    if doc.resolve() == (ROOT / "docs" / "benchmarks.md").resolve():
        return ROOT / "bench" / "last-run.json"

    return doc.with_name("last-run.json")


def env(sb: Sandbox | None = None) -> dict[str, str]:
    found = {**os.environ, **CREDENTIALS}
    if sb is not None:
        found["SFMC_AUTH_URL"] = sb.auth_url
    return found


def first_hour() -> dt.datetime:
    """A start well inside the sandbox's 30 days, on an hour."""
    now = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
    return now - dt.timedelta(days=20)


def api_time(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def sandbox_token(sb: Sandbox) -> str:
    body = json.dumps({"grant_type": "client_credentials", **_grant()}).encode()
    request = urllib.request.Request(
        f"{sb.auth_url}/{sfmc.TOKEN_PATH}",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as answer:
        token: str = json.load(answer)["access_token"]
        return token


def _grant() -> dict[str, str]:
    return {
        "client_id": CREDENTIALS["SFMC_CLIENT_ID"],
        "client_secret": CREDENTIALS["SFMC_CLIENT_SECRET"],
    }


def digest(path: Path) -> str:
    found = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(1 << 20):
            found.update(block)
    return found.hexdigest()


def disk_rate(work: Path) -> float:
    """MB/s of writing 512 MB to the scratch folder's disk and flushing it."""
    path = work / "disk-probe"
    block = os.urandom(1 << 20)
    started = time.perf_counter()
    with path.open("wb") as stream:
        for _ in range(512):
            stream.write(block)
        stream.flush()
        os.fsync(stream.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return round(512 * 2**20 / seconds / MB, 1)


def machine() -> dict[str, Any]:
    def version(command: list[str]) -> str:
        try:
            done = subprocess.run(command, check=False, capture_output=True, text=True)
            text = done.stdout
        except OSError:
            return "missing"
        return text.splitlines()[0] if text else "unknown"

    model = "unknown"
    with open("/proc/cpuinfo") as stream:
        for line in stream:
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    import aiohttp

    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(
            os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
        ),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "curl": version(["curl", "--version"]),
        "load_at_start": os.getloadavg(),
    }


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


if __name__ == "__main__":
    sys.exit(main())
