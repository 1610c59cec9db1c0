"""Seeded chaos: mixed faults at random rates over every sandbox switch.

Each scenario draws the server's behaviour, the request and the fault rates from
its seed, exports over real HTTP on 127.0.0.1, reruns while windows fail after
their retries, and compares the output with the sandbox's ground truth byte for
byte. One fault kind per scenario also fires on every window's first attempt, so
each scenario certainly injects faults and the seeds together cover every kind.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.lowlevel
import pytest
from aiohttp import web

from orchestrator import auth
from orchestrator.config import ExportRequest, HttpSettings, RetrySettings
from orchestrator.credentials import Credentials
from orchestrator.download import BodyDecoder
from orchestrator.export import ExportResult, Hooks, run_export
from orchestrator.manifest import ExportPaths, Manifest
from orchestrator.parts import PartWriter
from orchestrator.sandbox import SandboxServer, SandboxSettings, parse_faults
from orchestrator.sandbox.faults import DOWNLOAD_KINDS
from orchestrator.timeparse import to_millis
from tests.conftest import (
    HOUR,
    credentials_for,
    draw_columns,
    expected_output,
    hour_now,
    run_settings,
)

# Slow first bytes only slow a test down; they fire as a rule below.
RATE_KINDS = tuple(kind for kind in DOWNLOAD_KINDS if kind != "slow_first_byte")
# The kind that also fires on every first attempt, one per seed: all are covered.
RULE_KINDS = (*RATE_KINDS, "slow_first_byte", "token_error")
SEEDS = range(3 * len(RULE_KINDS))
CHAOS_RETRY = RetrySettings(
    max_attempts=3, backoff_initial_seconds=0.01, backoff_max_seconds=0.05
)
CHAOS_HTTP = HttpSettings(read_timeout_seconds=0.4)
STALL_SECONDS = 1.5
MAX_RUNS = 30
# A one-minute window never holds more than about 10 kB: a cap above it can always
# be met by splitting.
CAPS = (12_000, 20_000, 40_000)
STATUS_FILTERS = (("Failed",), ("complete", "Active"), ("Waiting", "Unknown"))


async def no_wait(seconds: float) -> None:
    await anyio.lowlevel.checkpoint()


@dataclass(frozen=True, slots=True)
class Scenario:
    """One seeded export: the server's switches, the request and the range."""

    seed: int
    rule_kind: str
    sandbox: SandboxSettings
    start: dt.datetime
    end: dt.datetime
    span: dt.timedelta
    request: ExportRequest
    options: dict[str, Any] = field(default_factory=dict)


def draw_faults(rng: random.Random, rule_kind: str) -> str:
    kinds = rng.sample(RATE_KINDS, rng.randint(3, 7))
    budget = rng.uniform(0.3, 0.6)
    weights = [rng.random() + 0.1 for _ in kinds]
    rates = [budget * w / sum(weights) for w in weights]
    items = [f"{kind}={rate:.3f}" for kind, rate in zip(kinds, rates, strict=True)]
    if rng.random() < 0.5:
        items.append(f"token_error={rng.uniform(0.05, 0.2):.3f}")

    rule = "token_error@1" if rule_kind == "token_error" else f"{rule_kind}@1"
    items += [
        rule,
        f"stall_seconds={STALL_SECONDS}",
        "first_byte_seconds=1.0",
        f"retry_after={rng.choice([0, 1])}",
        f"seed={rng.randrange(1 << 30)}",
    ]
    return ",".join(items)


def draw_range(rng: random.Random) -> tuple[dt.datetime, dt.datetime, dt.timedelta]:
    span = rng.choice([HOUR, HOUR, HOUR, HOUR / 2, dt.timedelta(minutes=20)])
    hours = rng.randint(3, 5)
    end = hour_now() - (2 + rng.randrange(72)) * HOUR
    start = end - hours * HOUR
    if rng.random() < 0.4:  # short first and last windows, odd milliseconds
        start += dt.timedelta(
            minutes=rng.randint(1, 50), milliseconds=rng.randrange(1000)
        )
        end -= dt.timedelta(
            minutes=rng.randint(1, 50), milliseconds=rng.randrange(1000)
        )

    return start, end, span


def draw_caps(rng: random.Random) -> dict[str, Any]:
    """Download caps that make windows split: ours, the server's, or both."""
    choice = rng.random()
    cap = rng.choice(CAPS)
    if choice < 0.15:  # our safety cap: split on the estimate or mid-download
        return {"cap_bytes": cap}

    if choice < 0.25:  # the server refuses a large body with 400 errorcode 10006
        return {"sandbox": {"cap_bytes": cap, "cap_behaviour": "error"}}

    if choice < 0.35:  # the server cuts a large body; our lower cap splits first
        return {"cap_bytes": cap // 2, "sandbox": {"cap_bytes": cap}}

    return {}


def draw_scenario(seed: int) -> Scenario:
    rng = random.Random(f"chaos:{seed}")
    rule_kind = RULE_KINDS[seed % len(RULE_KINDS)]
    end_inclusive = rng.random() < 0.5
    caps = draw_caps(rng)
    sandbox = SandboxSettings(
        seed=rng.randrange(1000),
        rows_per_hour=rng.randint(50, 300),
        end_inclusive=end_inclusive,
        empty_window=rng.choice(["header", "empty", "204"]),
        newline=rng.choice(["lf", "crlf"]),
        bom=rng.random() < 0.5,
        transfer=rng.choice(["chunked", "length"]),
        honour_accept_encoding=rng.random() < 0.8,
        deflate_raw=rng.random() < 0.3,
        token_lifetime_seconds=rng.choice([1080, 1080, 2]),
        max_concurrent_downloads=rng.choice([None, None, None, 2]),
        first_byte_seconds=rng.choice([0.0, 0.0, 0.02]),
        estimate_shape=rng.choice(["a", "a", "b", "garbage"]),
        freshness_shape=rng.choice(["a", "a", "b", "garbage"]),
        faults=parse_faults(draw_faults(rng, rule_kind)),
        **caps.pop("sandbox", {}),
    )
    start, end, span = draw_range(rng)
    statuses = rng.choice(STATUS_FILTERS) if rng.random() < 0.15 else ()
    request = ExportRequest(
        format=rng.choice(["csv", "tsv"]),
        columns=draw_columns(rng, end_inclusive),
        filters=(("statuses", statuses),) if statuses else (),
    )
    options = {
        **caps,
        "concurrency": rng.randint(2, 8),
        "compression": rng.choice(["gzip", "deflate", "none"]),
        "keep_parts": rng.random() < 0.2,
        "estimate": rng.random() < 0.7,
        # Flushing the output after every window, or every few: the windows merged
        # before a failure must stay merged, those after it be appended again.
        "flush_bytes": rng.choice([64_000_000, 64_000_000, 1, 20_000]),
    }
    return Scenario(seed, rule_kind, sandbox, start, end, span, request, options)


async def export_until_complete(
    sandbox: SandboxServer, scenario: Scenario, output: Path
) -> list[ExportResult]:
    settings = run_settings(
        output,
        scenario.start,
        scenario.end,
        request=scenario.request,
        window=scenario.span,
        retry=CHAOS_RETRY,
        http=CHAOS_HTTP,
        **scenario.options,
    )
    results: list[ExportResult] = []
    while len(results) < MAX_RUNS:
        result = await run_export(
            settings, credentials_for(sandbox), hooks=Hooks(sleep=no_wait)
        )
        results.append(result)
        if result.complete:
            break

    return results


def truth(sandbox: SandboxServer, scenario: Scenario) -> bytes:
    return expected_output(
        sandbox.history,
        scenario.start,
        scenario.end,
        span=scenario.span,
        columns=scenario.request.columns,
        fmt=scenario.request.format,
        newline=sandbox.settings.line_ending,
        filters=scenario.request.body_filters() or None,
    )


def has_rows(sandbox: SandboxServer, scenario: Scenario) -> bool:
    """Whether the range holds a row: an all-empty range cannot tell its newline."""
    filters = scenario.request.body_filters() or None
    start, end = to_millis(scenario.start), to_millis(scenario.end)
    return bool(sandbox.history.expected(start, end, filters=filters))


@pytest.mark.parametrize("seed", SEEDS)
async def test_mixed_faults_end_in_the_exact_ground_truth(
    tmp_path: Path, seed: int
) -> None:
    scenario = draw_scenario(seed)
    output = tmp_path / f"chaos.{scenario.request.format}"
    async with SandboxServer(scenario.sandbox) as sandbox:
        assert has_rows(sandbox, scenario), scenario
        with anyio.fail_after(60):
            results = await export_until_complete(sandbox, scenario, output)

        faults = dict(sandbox.stats.faults)

    described = f"seed {seed}: {scenario}, faults {faults}, runs {len(results)}"
    assert results[-1].complete, described
    assert output.read_bytes() == truth(sandbox, scenario), described
    paths = ExportPaths(output)
    manifest = Manifest.load(paths.manifest)
    assert manifest.complete and not paths.partial.exists()
    assert faults.get(scenario.rule_kind, 0) >= 1, described


# Found by the chaos script's fragmenting proxy (scripts/chaos.py --fragment):
# bytes that arrive in small pieces, as they may on any real network.

BOUNDARY_BODY = (
    b"TransactionTime,ContactKey\n"
    b"2026-12-02T15:00:00.000Z,next-window\n"
    b"2026-12-02T14:59:59.000Z,this-window\n"
)


def test_a_boundary_stamp_split_over_three_pieces_is_seen(tmp_path: Path) -> None:
    writer = PartWriter(
        tmp_path / "w.tmp",
        columns=["TransactionTime", "ContactKey"],
        delimiter=",",
        boundary=b"2026-12-02T15:00:00",
    )
    stamp = BOUNDARY_BODY.index(b"\n") + 1
    for piece in (
        BOUNDARY_BODY[: stamp + 5],
        BOUNDARY_BODY[stamp + 5 : stamp + 9],
        BOUNDARY_BODY[stamp + 9 :],
    ):
        writer.write(piece)

    writer.finish()

    assert writer.boundary_seen


def test_a_deflate_body_whose_first_piece_is_one_byte_is_decoded() -> None:
    data = zlib.compress(BOUNDARY_BODY, 1)
    decoder = BodyDecoder("deflate")
    decoded = decoder.decode(data[:1]) + decoder.decode(data[1:])
    decoder.finish()

    assert decoded == BOUNDARY_BODY


async def token_in_two_pieces(request: web.Request) -> web.StreamResponse:
    answer = json.dumps(
        {
            "access_token": "t" * 40,
            "expires_in": 1080,
            "rest_instance_url": f"http://{request.host}/",
        }
    ).encode()
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(answer)
    await response.prepare(request)
    await response.write(answer[:20])
    await anyio.sleep(0.05)  # the rest comes in a later TCP segment
    await response.write(answer[20:])
    return response


async def test_a_token_answer_arriving_in_two_pieces_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(auth, "TOKEN_ATTEMPTS", 1)
    app = web.Application()
    app.router.add_post("/v2/token", token_in_two_pieces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    credentials = Credentials("id", "secret", f"http://127.0.0.1:{port}")
    try:
        async with aiohttp.ClientSession() as session:
            token = await auth.TokenSource(session, credentials).get()
    finally:
        await runner.cleanup()

    assert token.rest_url == f"http://127.0.0.1:{port}/"
