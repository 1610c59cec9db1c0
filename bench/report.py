"""Turn bench/run.py's results into docs/benchmarks.md and the throughput plot."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

MB = 1_000_000
CHANGES = Path(__file__).resolve().parent / "changes.md"
TARGET_RATIO = 1.05
TARGET_UNSHAPED = 0.70
TARGET_MERGE = 0.80
TARGET_RSS_MB = 100


def write_report(results: dict[str, Any], doc: Path, plot: Path) -> None:
    doc.parent.mkdir(parents=True, exist_ok=True)
    lines = _head(results)
    targets: list[tuple[str, str, bool]] = []
    if "shaped" in results:
        lines += _shaped(results["shaped"], targets)
        _plot(results["shaped"], plot)
        lines += ["", f"![throughput against concurrency]({plot.name})", ""]
    if "unshaped" in results:
        lines += _unshaped(results["unshaped"], targets)
        lines += _memory(results["unshaped"], results.get("shaped"), targets)
    lines += _targets(targets)
    if CHANGES.exists():
        if results["settings"]["quick"]:
            lines += [
                "",
                "*The notes below were written for the full run"
                " (`docs/benchmarks.md`): their figures are that run's, not this"
                " one's.*",
            ]
        lines += ["", CHANGES.read_text().rstrip(), ""]
    doc.write_text("\n".join(lines).rstrip() + "\n")


def _head(results: dict[str, Any]) -> list[str]:
    machine = results["machine"]
    settings = results["settings"]
    mode = "quick run (`--quick`)" if settings["quick"] else "full run"
    load = ", ".join(f"{value:.2f}" for value in machine["load_at_start"])
    return [
        "# Benchmarks",
        "",
        f"Written by `bench/run.py` on {results.get('finished') or _today()}"
        f" ({mode}, {results['seconds']:.0f} s; median of {settings['runs']} runs"
        f" per figure, {settings.get('merge_runs', settings['runs'])} for the"
        " merge). How to run it and what each step does: `bench/README.md`.",
        "",
        "| machine | |",
        "| --- | --- |",
        f"| cores, memory | {machine['cores']} cores ({machine['cpu']}), "
        f"{machine['memory_gib']} GiB |",
        f"| disk (write 512 MB + fsync) | {machine['disk_write_mb_s']:.0f} MB/s |",
        f"| software | Linux {machine['kernel']}, Python {machine['python']}, "
        f"aiohttp {machine['aiohttp']}, {machine['curl'].split(' (')[0]} |",
        f"| load average at start | {load} |",
        "",
        "MB is 10^6 bytes; throughput is MB of *output* (decoded CSV) per second of"
        " wall time, start of the process to its exit, start-up included. The"
        " package's bytecode is written before anything is timed, as installing it"
        " does.",
        "",
    ]


def _today() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def _median(runs: list[dict[str, Any]], key: str = "wall") -> float:
    return float(statistics.median(run[key] for run in runs))


def _shaped(found: dict[str, Any], targets: list[tuple[str, str, bool]]) -> list[str]:
    sandbox = found["sandbox"]
    lines = [
        "## 1. Against the shell-script baseline, shaped",
        "",
        f"Sandbox shaping: {sandbox['first_byte_seconds']} s to first byte on every"
        f" download, {sandbox['bandwidth_bytes_per_second'] / MB:g} MB/s per"
        " connection (on the bytes sent, so compressed),"
        f" {sandbox['rows_per_hour']:,} rows per hour, SFMC's 8 default columns."
        f" Windows: one hour each, {found.get('windows_per_worker', 12)} per worker,"
        " so that runs last about as long at every concurrency (hours differ in"
        " volume, so MB per window differs between concurrencies); the same windows"
        " for every tool at a concurrency.",
        "",
        "**What is compared.** The baseline asks for no estimate, so the fair"
        " comparison is *ours* = `journey-export run --no-estimate`: the same download"
        " requests, plus one token call (the baseline makes one too) and one freshness"
        " call. *ours + estimates* is the default run, which first asks for one"
        " estimate per window (at the same concurrency) before downloading; it is"
        " shown beside, not used for the target."
        f" **Compression:** both ask for `{found['compression']}`"
        " (journey-export's default; curl `--compressed -H 'Accept-Encoding: gzip'`),"
        " so the same bytes cross the shaped connections and both decode them.",
        "",
        "| concurrency | windows | output MB | baseline s | ours s | ours / baseline"
        " | ours + estimates s | ratio | same bytes | CPU s ours / baseline"
        " | sandbox CPU | other CPU |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: "
        "| ---: |",
    ]
    for concurrency, row in _by_concurrency(found):
        runs = row["runs"]
        base = _median(runs["baseline"])
        ours = _median(runs["ours"])
        with_estimates = _median(runs["ours_estimates"])
        sandbox_share = _median(runs["ours"], "sandbox_cpu") / ours
        other = max(run["other_cpu"] for items in runs.values() for run in items)
        lines.append(
            f"| {concurrency} | {row['windows']} | {row['bytes'] / MB:.1f} | {base:.2f}"
            f" | {ours:.2f} | **{ours / base:.3f}** | {with_estimates:.2f}"
            f" | {with_estimates / base:.3f} | {'yes' if row['same_output'] else 'NO'}"
            f" | {_median(runs['ours'], 'cpu'):.2f}"
            f" / {_median(runs['baseline'], 'cpu'):.2f}"
            f" | {sandbox_share:.0%} | {other:.1f} s |"
        )
        targets.append(
            (
                f"ours / baseline <= {TARGET_RATIO} at concurrency {concurrency}",
                f"{ours / base:.3f} (with estimates {with_estimates / base:.3f})",
                ours / base <= TARGET_RATIO and row["same_output"],
            )
        )
    lines += [
        "",
        "*sandbox CPU*: the sandbox's CPU time over the wall time of our run (one core"
        " is 100 %). *other CPU*: the most CPU any run saw spent by the rest of the"
        " machine (kernel writeback of dirty pages, other users' programs): noise.",
    ]
    return lines


def _by_concurrency(found: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    rows = [(int(key), value) for key, value in found.items() if key.isdigit()]
    return sorted(rows)


def _unshaped(found: dict[str, Any], targets: list[tuple[str, str, bool]]) -> list[str]:
    runs = found["runs"]
    size = found["bytes"]
    raw = _median(runs["curl_raw"])
    ours = _median(runs["ours"])
    base = _median(runs["baseline"])
    sandbox_busy = _median(runs["ours"], "sandbox_cpu") / ours
    raw_busy = _median(runs["curl_raw"], "sandbox_cpu") / raw
    lines = [
        "",
        "## 2. Unshaped throughput against curl alone",
        "",
        f"No shaping; {found['sandbox']['rows_per_hour']:,} rows per hour, all 25"
        f" columns, {found['windows']} windows, `--compression none` for every tool"
        " (on loopback gzip only adds CPU on both ends, and the sandbox keeps only"
        " 128 MB of compressed bodies). The sandbox had rendered every window before"
        f" the first measured run. Concurrency {found['concurrency']} for every tool.",
        "",
        "| what | median s | MB/s | of curl alone | sandbox CPU |",
        "| --- | ---: | ---: | ---: | ---: |",
        "| curl alone, bodies to /dev/null (the sandbox's raw serving rate)"
        f" | {raw:.2f} | {size / raw / MB:.0f} | 100 % | {raw_busy:.0%} |",
        f"| journey-export, end to end | {ours:.2f} | {size / ours / MB:.0f}"
        f" | **{raw / ours:.0%}** | {sandbox_busy:.0%} |",
        f"| the baseline script, end to end | {base:.2f} | {size / base / MB:.0f}"
        f" | {raw / base:.0%}"
        f" | {_median(runs['baseline'], 'sandbox_cpu') / base:.0%} |",
        *_durable_row(runs, size, raw),
        "",
        f"Output {size / MB:,.0f} MB; ours and the baseline wrote the same bytes:"
        f" {'yes' if found['same_output'] else 'NO'}.",
    ]
    durable = runs.get("curl_durable")
    context = f"; curl writing durably: {raw / _median(durable):.0%}" if durable else ""
    targets.append(
        (
            f"unshaped >= {TARGET_UNSHAPED:.0%} of the sandbox's raw rate",
            f"{raw / ours:.0%} ({size / ours / MB:.0f} of {size / raw / MB:.0f} MB/s)"
            + context,
            raw / ours >= TARGET_UNSHAPED,
        )
    )
    targets.append(
        (
            "the sandbox is not the bottleneck",
            f"raw rate {size / raw / MB:.0f} MB/s vs ours {size / ours / MB:.0f};"
            f" sandbox busy {sandbox_busy:.0%} of a core during our runs",
            raw < ours and sandbox_busy < 0.9,
        )
    )
    lines += _merge(found["merge"], targets)
    return lines


def _durable_row(runs: dict[str, Any], size: int, raw: float) -> list[str]:
    """curl writing each body to a file and syncing them: the least any export that
    survives a crash of the machine must do (runs before it was measured lack it)."""
    if "curl_durable" not in runs:
        return []

    durable = _median(runs["curl_durable"])
    busy = _median(runs["curl_durable"], "sandbox_cpu") / durable
    return [
        "| curl, bodies to files synced to disk, nothing glued or checked (what"
        f" writing them durably costs) | {durable:.2f} | {size / durable / MB:.0f}"
        f" | {raw / durable:.0%} | {busy:.0%} |"
    ]


def _merge(found: dict[str, Any], targets: list[tuple[str, str, bool]]) -> list[str]:
    runs = found["runs"]
    size = found["bytes"]
    cat = statistics.median(runs["cat"])
    lines = [
        "",
        "## 3. Merge against cat",
        "",
        f"{found['parts']} part files of the export above, {size / MB:,.0f} MB, in the"
        " page cache. The Assembler runs its real loop: append each part (its"
        " SHA-256 was checked as it was downloaded, so it is copied, not hashed"
        " again), flush each 64 MB batch to disk in another thread while the next"
        " parts are appended (then save the manifest and delete the batch's parts),"
        " flush the rest, publish. *Flushes skipped* is the same loop with"
        " `os.fsync` made a no-op for that run: the copying alone, the work `cat`"
        " does; journey-export never runs that way.",
        "",
        "| what | median s | MB/s | of cat | of cat && sync |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    names = {
        "cat": "`cat parts > out`",
        "cat_sync": "`cat parts > out && sync out`",
        "assembler": "Assembler",
        "assembler_no_flush": "Assembler, flushes skipped",
    }
    synced = statistics.median(runs["cat_sync"])
    for key, name in names.items():
        if key not in runs:
            continue

        seconds = statistics.median(runs[key])
        lines.append(
            f"| {name} | {seconds:.2f} | {size / seconds / MB:.0f}"
            f" | {cat / seconds:.0%} | {synced / seconds:.0%} |"
        )
    assembler = statistics.median(runs["assembler"])
    if "assembler_no_flush" in runs:
        copying = statistics.median(runs["assembler_no_flush"])
        targets.append(
            (
                f"merge >= {TARGET_MERGE:.0%} of cat: the copying (flushes skipped)",
                f"{cat / copying:.0%} of `cat`",
                cat / copying >= TARGET_MERGE,
            )
        )
    targets.append(
        (
            f"merge >= {TARGET_MERGE:.0%} of cat: the real, flushed merge",
            f"{synced / assembler:.0%} of `cat && sync`;"
            f" {cat / assembler:.0%} of plain `cat`, which flushes nothing",
            synced / assembler >= TARGET_MERGE,
        )
    )
    return lines


def _memory(
    found: dict[str, Any],
    shaped: dict[str, Any] | None,
    targets: list[tuple[str, str, bool]],
) -> list[str]:
    big = found["runs"]["ours"]
    small = found["small"]
    peak_big = max(run["peak_rss_kib"] for run in big) * 1024 / MB
    peak_small = small["run"]["peak_rss_kib"] * 1024 / MB
    cpu_big = _median(big, "cpu")
    lines = [
        "",
        "## 4. Memory and CPU",
        "",
        "Peak resident memory of the process (GNU time's %M) and its CPU (user +"
        " system, all threads), `--compression none`, concurrency"
        f" {found['concurrency']}.",
        "",
        "| export | output MB | peak RSS MB | CPU s | CPU s per GB |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| {small['windows']} windows | {small['bytes'] / MB:,.0f} | {peak_small:.1f}"
        f" | {small['run']['cpu']:.2f}"
        f" | {small['run']['cpu'] / (small['bytes'] / 1e9):.2f} |",
        f"| {found['windows']} windows | {found['bytes'] / MB:,.0f} | {peak_big:.1f}"
        f" | {cpu_big:.2f} | {cpu_big / (found['bytes'] / 1e9):.2f} |",
        "",
        "For comparison, the baseline's processes (bash, xargs, curl, tail) used"
        f" {_median(found['runs']['baseline'], 'cpu'):.2f} CPU s for the large export.",
    ]
    peaks = [peak_big, peak_small]
    if shaped:
        by_level = _by_concurrency(shaped)
        for _, row in by_level:
            runs = row["runs"]["ours"] + row["runs"]["ours_estimates"]
            peak = max(run["peak_rss_kib"] for run in runs) * 1024 / MB
            peaks.append(peak)
        top = by_level[-1][0]
        lines.append(
            f"In the shaped runs (gzip) the peak was {peaks[-1]:.1f} MB at concurrency"
            f" {top}, {max(peaks[2:]):.1f} MB at most over all concurrencies."
        )
    targets.append(
        (
            f"peak memory < {TARGET_RSS_MB} MB whatever the size",
            f"{peak_small:.0f} MB at {small['bytes'] / MB:,.0f} MB,"
            f" {peak_big:.0f} MB at {found['bytes'] / MB:,.0f} MB",
            max(peaks) < TARGET_RSS_MB,
        )
    )
    return lines


def _targets(targets: list[tuple[str, str, bool]]) -> list[str]:
    lines = ["", "## Targets", "", "| target | measured | met |", "| --- | --- | --- |"]
    for name, figure, met in targets:
        lines.append(f"| {name} | {figure} | {'yes' if met else '**no**'} |")
    return lines


def _plot(found: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _by_concurrency(found)
    levels = [concurrency for concurrency, _ in rows]
    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=110)
    labels = {
        "baseline": "baseline (curl + xargs + tail)",
        "ours": "journey-export --no-estimate",
        "ours_estimates": "journey-export (estimates on)",
    }
    for key, label in labels.items():
        rates = [row["bytes"] / _median(row["runs"][key]) / MB for _, row in rows]
        axes.plot(levels, rates, marker="o", label=label)
    axes.set_xscale("log", base=2)
    axes.set_xticks(levels, [str(level) for level in levels])
    axes.set_xlabel("concurrency (downloads at once)")
    axes.set_ylabel("MB of output per second")
    sandbox = found["sandbox"]
    axes.set_title(
        f"Shaped sandbox: {sandbox['first_byte_seconds']} s to first byte,"
        f" {sandbox['bandwidth_bytes_per_second'] / MB:g} MB/s per connection",
        fontsize=10,
    )
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
