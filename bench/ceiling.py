"""How fast journey-export could be here without its per-byte checks: a ceiling.

Runs, interleaved on one warm unshaped sandbox (as section 2 of bench/run.py): curl
alone; curl writing each body to a file, then the same with the files synced to
disk (what writing the bytes durably costs, with nothing glued or checked);
journey-export as shipped; and journey-export with its per-byte checks switched
off for the measurement only: row counting and the boundary search, then also
SHA-256. The switch is a ``sitecustomize`` module this script writes to a
temporary folder put first on PYTHONPATH; the package itself has no such switch,
and the outputs of those runs are not trusted (nothing checked them).

    .venv/bin/python bench/ceiling.py [--gb 2] [--runs 3] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

from measure import Sandbox, compile_package, measure
from run import MB, PROGRAM, baseline, env, first_hour, ours, say, warm_until

from orchestrator import sfmc

# Loaded by every Python process that finds it first on sys.path; reads JX_SKIP.
SWITCH = """
import os
skip = os.environ.get("JX_SKIP", "")
if skip:
    import orchestrator.parts as parts
    if "checks" in skip:
        parts.RowCounter.feed = lambda self, data: None
        parts.PartWriter._watch_boundary = lambda self, data: None
    if "sha256" in skip:
        class NoDigest:
            def update(self, data): pass
            def hexdigest(self): return "0" * 64
        parts.hashlib = type("NoHashlib", (), {"sha256": staticmethod(NoDigest)})
"""

# What each row runs: baseline.sh's flags for curl, or JX_SKIP for journey-export.
CURL_ALONE = "curl alone, bodies to /dev/null"
VARIANTS: dict[str, tuple[str, ...] | str] = {
    CURL_ALONE: ("--discard",),
    "curl, bodies to files (not synced)": ("--write-only", "--no-sync"),
    "curl, bodies to files, synced to disk": ("--write-only",),
    "journey-export": "",
    "without row counting and boundary search": "checks",
    "without those and without SHA-256": "checks,sha256",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="output size (2)")
    parser.add_argument("--runs", type=int, default=3, help="median of N (3)")
    parser.add_argument("--concurrency", type=int, default=4, help="(4)")
    args = parser.parse_args(argv)

    compile_package(PROGRAM[0], env())
    with tempfile.TemporaryDirectory(prefix="jx-ceiling-") as scratch:
        work = Path(scratch)
        (work / "switch").mkdir()
        (work / "switch" / "sitecustomize.py").write_text(SWITCH)
        walls, size = measure_all(args, work)

    print_table(walls, size)
    return 0


def measure_all(
    args: argparse.Namespace, work: Path
) -> tuple[dict[str, list[float]], int]:
    target = int(args.gb * 1e9)
    settings = {
        "rows_per_hour": 50_000,
        "cache_megabytes": math.ceil(target * 1.25 / 2**20) + 256,
    }
    columns = ",".join(sfmc.COLUMNS)
    start = first_hour()
    walls: dict[str, list[float]] = {name: [] for name in VARIANTS}
    size = 0
    with Sandbox(PROGRAM, settings, env=env(), log=work / "sandbox.log") as sb:
        say(f"rendering about {args.gb} GB in the sandbox (not measured)")
        end, size = warm_until(sb, start, target, columns)
        for number in range(args.runs):
            for name, variant in VARIANTS.items():
                folder = work / "run"
                folder.mkdir()
                command, skip = variant_command(args, variant, folder, start, end)
                run = measure(
                    command,
                    env=variant_env(sb, work / "switch", skip),
                    log=folder / "log",
                )
                walls[name].append(run.wall)
                shutil.rmtree(folder)
                say(f"run {number + 1}: {name}: {run.wall:.2f} s")

    return walls, size


def variant_command(
    args: argparse.Namespace,
    variant: tuple[str, ...] | str,
    folder: Path,
    start: dt.datetime,
    end: dt.datetime,
) -> tuple[list[str], str | None]:
    """The command of one row, and what journey-export skips in it (None: curl)."""
    columns = ",".join(sfmc.COLUMNS)
    output = folder / "out.csv"
    if isinstance(variant, str):
        command = ours(start, end, output, args.concurrency, "none", columns=columns)
        return command, variant

    command = baseline(start, end, output, args.concurrency, "none", columns=columns)
    if "--discard" in variant:
        command.remove("--output")
        command.remove(str(output))
    return [*command, *variant], None


def variant_env(sb: Sandbox, switch: Path, skip: str | None) -> dict[str, str]:
    found = env(sb)
    if skip:
        paths = [str(switch), found.get("PYTHONPATH", "")]
        found["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
        found["JX_SKIP"] = skip
    return found


def print_table(walls: dict[str, list[float]], size: int) -> None:
    raw = statistics.median(walls[CURL_ALONE])
    print(f"\noutput {size / MB:,.0f} MB; medians of {len(next(iter(walls.values())))}")
    print("| what | median s | MB/s | of curl alone |")
    print("| --- | ---: | ---: | ---: |")
    for name, values in walls.items():
        wall = statistics.median(values)
        print(f"| {name} | {wall:.2f} | {size / MB / wall:,.0f} | {raw / wall:.0%} |")


if __name__ == "__main__":
    raise SystemExit(main())
