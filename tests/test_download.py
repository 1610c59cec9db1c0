"""The download client's translation of answers into retryable and permanent errors.

A small server on 127.0.0.1 answers what each test queues; the sandbox covers the
rest over real HTTP.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from orchestrator.auth import TokenSource
from orchestrator.config import ExportRequest, RetrySettings
from orchestrator.credentials import Credentials
from orchestrator.download import BodyDecoder, JourneyHistoryClient, retry_after
from orchestrator.errors import (
    PermanentError,
    RetryableError,
    ThrottledError,
    TooLargeError,
)
from orchestrator.export import run_export
from orchestrator.planner import Window
from tests.conftest import hour_now, run_settings

START = hour_now() - dt.timedelta(hours=3)
WINDOW = Window(START, START + dt.timedelta(hours=1))
REFUSED = {"message": "Not Authorized", "errorcode": 0, "documentation": ""}


class FakeServer:
    """A loopback server whose download answers are queued by the test."""

    def __init__(self) -> None:
        self.answers: list[web.Response] = []
        self.token_requests = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/v2/token":
            self.token_requests += 1
            answer = {"access_token": f"t{self.token_requests}", "expires_in": 1080}
            return web.json_response({**answer, "rest_instance_url": self.url + "/"})
        if request.path.endswith("/freshness"):
            return web.json_response({"lagSeconds": 1200})
        return self.answers.pop(0)

    async def __aenter__(self) -> FakeServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[FakeServer]:
    async with FakeServer() as fake:
        yield fake


@pytest.fixture
async def client(server: FakeServer) -> AsyncIterator[JourneyHistoryClient]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        tokens = TokenSource(session, Credentials("id", "secret", server.url))
        yield JourneyHistoryClient(session, tokens, ExportRequest())


@pytest.mark.parametrize(
    ("status", "body", "headers", "kind", "wait"),
    [
        (
            429,
            {"errorcode": 50100, "retryAfter": 7},
            {"Retry-After": "3"},
            ThrottledError,
            3,
        ),
        (429, {"errorcode": 50100, "retryAfter": 7}, {}, ThrottledError, 7),
        (429, {"errorcode": 50200, "message": "blocked"}, {}, ThrottledError, 0),
        (503, {"errorcode": 50300}, {"Retry-After": "2"}, ThrottledError, 2),
        (500, None, {}, RetryableError, None),
        (502, None, {}, RetryableError, None),
        (504, None, {}, RetryableError, None),
        (400, {"errorcode": 10002, "message": "bad column"}, {}, PermanentError, None),
        (403, {"errorcode": 20001, "message": "no access"}, {}, PermanentError, None),
        (404, {"errorcode": 30003}, {}, PermanentError, None),
        (413, {"message": "too big"}, {}, TooLargeError, None),
        (
            400,
            {"message": "The download exceeds the maximum file size"},
            {},
            TooLargeError,
            None,
        ),
    ],
)
async def test_answers_are_classified(
    server: FakeServer,
    client: JourneyHistoryClient,
    tmp_path: Path,
    status: int,
    body: dict[str, Any] | None,
    headers: dict[str, str],
    kind: type[Exception],
    wait: float | None,
) -> None:
    text = json.dumps(body) if body is not None else "Internal Server Error"
    server.answers.append(web.Response(status=status, text=text, headers=headers))

    with pytest.raises(kind) as caught:
        await client.download(WINDOW, tmp_path / "p.tmp")

    assert type(caught.value) is kind
    assert caught.value.status == status  # type: ignore[attr-defined]
    assert caught.value.window == WINDOW.key  # type: ignore[attr-defined]
    if wait is not None:
        assert caught.value.retry_after == wait  # type: ignore[attr-defined]
    assert not (tmp_path / "p.tmp").exists()


async def test_a_401_renews_the_token_once_then_is_retryable(
    server: FakeServer, client: JourneyHistoryClient, tmp_path: Path
) -> None:
    for _ in range(2):
        server.answers.append(web.json_response(REFUSED, status=401))

    with pytest.raises(RetryableError, match="401"):
        await client.download(WINDOW, tmp_path / "p.tmp")
    assert server.token_requests == 2


async def test_a_401_then_success_needs_one_new_token(
    server: FakeServer, client: JourneyHistoryClient, tmp_path: Path
) -> None:
    server.answers.append(web.json_response(REFUSED, status=401))
    header = ",".join(ExportRequest().columns)
    server.answers.append(web.Response(text=header + "\n"))

    info = await client.download(WINDOW, tmp_path / "p.tmp")

    assert (info.rows, server.token_requests) == (0, 2)


def test_retry_after_reads_header_then_body_and_caps_absurd_values() -> None:
    assert retry_after({"Retry-After": "12"}, {"retryAfter": 5}) == 12
    assert retry_after({}, {"retryAfter": 5}) == 5
    assert retry_after({}, {}) == 0
    assert retry_after({"Retry-After": "999999999"}, {}) == 3600
    assert retry_after({"Retry-After": "-5"}, {}) == 0
    assert retry_after({"Retry-After": "soon"}, {"retryAfter": "x"}) == 0


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "deflate-raw", "identity"])
def test_decoder_undoes_each_encoding(encoding: str) -> None:
    import zlib

    data = b"TransactionTime\n" + b"2026-11-03T05:00:00.000Z\n" * 1000
    if encoding == "gzip":
        packer = zlib.compressobj(wbits=31)
    elif encoding == "deflate":
        packer = zlib.compressobj(wbits=15)
    elif encoding == "deflate-raw":
        packer = zlib.compressobj(wbits=-15)
    body = data if encoding == "identity" else packer.compress(data) + packer.flush()

    decoder = BodyDecoder(encoding.replace("-raw", ""))
    out = b"".join(decoder.decode(body[i : i + 100]) for i in range(0, len(body), 100))
    decoder.finish()

    assert out == data


def test_decoder_reports_a_stream_that_ends_early_or_lies() -> None:
    import gzip

    body = gzip.compress(b"x" * 10000)
    decoder = BodyDecoder("gzip")
    decoder.decode(body[: len(body) // 2])
    with pytest.raises(RetryableError, match="ended early"):
        decoder.finish()

    with pytest.raises(PermanentError, match="claims gzip"):
        BodyDecoder("gzip").decode(b"TransactionTime,ContactKey\n")
    with pytest.raises(PermanentError, match="unsupported encoding"):
        BodyDecoder("br")


async def test_a_server_with_absurd_headers_fails_the_window_cleanly(
    server: FakeServer, tmp_path: Path
) -> None:
    for _ in range(2):
        server.answers.append(
            web.Response(text="x", headers={"X-Absurd": "a" * 100_000})
        )

    result = await run_export(
        run_settings(
            tmp_path / "o.csv",
            WINDOW.start,
            WINDOW.end,
            estimate=False,
            retry=RetrySettings(max_attempts=2, backoff_initial_seconds=0.01),
        ),
        Credentials("id", "secret", server.url),
    )

    assert not result.complete
    (error,) = result.failed.values()
    assert "header" in error.lower()
