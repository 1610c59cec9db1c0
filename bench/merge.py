"""Merge throughput: the Assembler's real loop against cat, on the same part files.

The Assembler runs as an export runs it: each part appended to the partial output
(its checksum already checked when it was written, as in an export), and whenever
64 MB have piled up, those windows flushed to disk as a batch in another thread while
the next parts are appended (then the manifest saved and their parts deleted); at the
end, the rest flushed and the output published.
``cat parts > out`` has no flush at all; ``cat parts > out && sync out`` writes the
same bytes to disk once, which is what the Assembler's durability costs at least.
A fourth way runs the same Assembler loop with every flush to disk skipped
(``os.fsync`` made a no-op for that run only): it measures the copying alone, the
work ``cat`` does, and is never how journey-export runs.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest import mock

from orchestrator.manifest import DONE, ExportPaths, Manifest
from orchestrator.merger import Assembler, Batch
from orchestrator.parts import FileIdentity


def merge_benchmark(
    kept: ExportPaths, folder: Path, *, runs: int, say: Callable[[str], None]
) -> dict[str, Any]:
    """Time each way ``runs`` times, in turn; the parts stay in the page cache."""
    template = Manifest.load(kept.manifest)
    paths = ExportPaths(folder / "merged.csv")
    kept.parts.rename(paths.parts)
    parts = [paths.part(record.window) for record in template.windows]
    total = sum(part.stat().st_size for part in parts)
    times: dict[str, list[float]] = {
        "assembler": [],
        "assembler_no_flush": [],
        "cat": [],
        "cat_sync": [],
    }
    for number in range(runs):
        os.sync()  # before each: no way pays for the last one's dirty pages
        times["assembler"].append(_assemble(template, paths))
        os.sync()
        with mock.patch.object(os, "fsync", lambda descriptor: None):
            times["assembler_no_flush"].append(_assemble(template, paths))
        os.sync()
        times["cat"].append(_cat(parts, paths.output, sync=False))
        os.sync()
        times["cat_sync"].append(_cat(parts, paths.output, sync=True))
        say(
            f"merge run {number + 1}: "
            + "  ".join(f"{name} {found[-1]:.2f} s" for name, found in times.items())
        )
    return {"bytes": total, "parts": len(parts), "runs": times}


def _assemble(template: Manifest, paths: ExportPaths) -> float:
    records = [
        dataclasses.replace(record, state=DONE, offset=None)
        for record in template.windows
    ]
    manifest = Manifest(paths.manifest, template.request, records)
    delimiter = "\t" if template.request.get("format") == "tsv" else ","
    assembler = Assembler(
        manifest,
        paths,
        header=list(template.request["columns"]),
        delimiter=delimiter,
        keep_parts=True,
    )
    for record in records:
        # An export vouches for each part as its download ends (it has just hashed
        # it); these are such parts, kept by an export, vouched for the same way.
        part = paths.part(record.window)
        assembler.mark_whole(record, FileIdentity.of(part.stat()))

    started = time.perf_counter()
    with ThreadPoolExecutor(1) as flusher:
        in_flight: tuple[Batch, Future[None]] | None = None
        for record in assembler.ready():
            assembler.appended(record, assembler.append(record))
            if assembler.flush_due():
                _settle(assembler, in_flight)
                batch = assembler.take_batch()
                assert batch is not None
                in_flight = batch, flusher.submit(assembler.sync, batch)

        _settle(assembler, in_flight)
        assembler.publish()

    seconds = time.perf_counter() - started
    paths.output.unlink()
    paths.manifest.unlink()
    return seconds


def _settle(assembler: Assembler, in_flight: tuple[Batch, Future[None]] | None) -> None:
    """Wait for the batch being flushed, then record it, as the export's job does."""
    if in_flight is not None:
        batch, flushed = in_flight
        flushed.result()
        assembler.settle(batch)


def _cat(parts: list[Path], output: Path, *, sync: bool) -> float:
    script = 'cat "$@" > "$0"' + (' && sync "$0"' if sync else "")
    started = time.perf_counter()
    subprocess.run(["sh", "-c", script, str(output), *map(str, parts)], check=True)
    seconds = time.perf_counter() - started
    output.unlink()
    return seconds
