"""The sandbox server over real loopback HTTP: endpoints, switches, faults, stats."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from orchestrator import sfmc
from orchestrator.sandbox import (
    FaultRule,
    FaultSettings,
    SandboxServer,
    SandboxSettings,
    parse_faults,
    serve,
    settings_from_options,
    window_key,
)
from orchestrator.sandbox.history import BOM, HOUR_MS
from orchestrator.sandbox.wire import mid_row

NOW = 1_708_084_800_000  # 2024-02-16T12:00:00.000Z
HOUR = NOW - 5 * HOUR_MS  # 07:00, an ordinary hour
NEXT = HOUR + HOUR_MS
NOBODY = {"contactKeys": ["nobody@example.com"]}
TOKEN_BODY = {
    "grant_type": "client_credentials",
    "client_id": "sandbox-client",
    "client_secret": "sandbox-secret",
}


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.seconds = 1000.0

    def __call__(self) -> float:
        return self.seconds


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Api:
    """A bare client of one sandbox: no retries, no decompression."""

    def __init__(self, session: aiohttp.ClientSession, sandbox: SandboxServer) -> None:
        self.session = session
        self.sandbox = sandbox
        self.token = ""

    async def post_token(self, body: object = TOKEN_BODY) -> Answer:
        url = f"{self.sandbox.auth_url}/{sfmc.TOKEN_PATH}"
        async with self.session.post(url, json=body) as response:
            return await answer(response)

    async def login(self) -> str:
        self.token = (await self.post_token()).json()["access_token"]
        return self.token

    async def download(
        self,
        start: int = HOUR,
        end: int = NEXT,
        *,
        query: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        path: str = sfmc.DOWNLOAD_PATH,
        client_timeout: aiohttp.ClientTimeout | None = None,
    ) -> Answer:
        token = self.token or await self.login()
        sent = {
            "Authorization": f"Bearer {token}",
            "x-direct-pipe": "true",
            "Accept-Encoding": "identity",
        }
        sent.update(headers or {})
        document = {"start": sfmc.format_time(start), "end": sfmc.format_time(end)}
        document.update(body or {})
        url = self.sandbox.rest_url + path
        async with self.session.post(
            url, params=query or {}, headers=sent, json=document, timeout=client_timeout
        ) as response:
            return await answer(response)

    async def get(self, path: str) -> Answer:
        token = self.token or await self.login()
        headers = {"Authorization": f"Bearer {token}"}
        async with self.session.get(self.sandbox.rest_url + path, headers=headers) as r:
            return await answer(r)


async def answer(response: aiohttp.ClientResponse) -> Answer:
    return Answer(response.status, dict(response.headers), await response.read())


Start = Callable[..., Awaitable[tuple[SandboxServer, Api]]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Start sandboxes from option strings; each gets its own client session."""
    opened: list[tuple[SandboxServer, aiohttp.ClientSession]] = []

    async def starter(
        clock: Callable[[], float] = time.monotonic, **options: object
    ) -> tuple[SandboxServer, Api]:
        sandbox = SandboxServer(settings_from_options(options), now_ms=NOW, clock=clock)
        await sandbox.start()
        session = aiohttp.ClientSession(auto_decompress=False)
        opened.append((sandbox, session))
        return sandbox, Api(session, sandbox)

    yield starter
    for sandbox, session in opened:
        await session.close()
        await sandbox.close()


async def test_token_answers_like_sfmc(start: Start) -> None:
    sandbox, api = await start()
    document = (await api.post_token()).json()

    assert set(document) == {
        "access_token",
        "token_type",
        "expires_in",
        "scope",
        "rest_instance_url",
        "soap_instance_url",
    }
    assert document["token_type"] == "Bearer"
    assert document["expires_in"] == 1080
    assert document["rest_instance_url"] == f"http://127.0.0.1:{sandbox.port}/"
    assert sandbox.auth_url == f"http://127.0.0.1:{sandbox.port}"
    assert sandbox.stats.token_requests == 1


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({**TOKEN_BODY, "grant_type": "password"}, 400, "unsupported_grant_type"),
        ({**TOKEN_BODY, "client_secret": "wrong"}, 401, "invalid_client"),
        ({**TOKEN_BODY, "client_id": "other"}, 401, "invalid_client"),
        (["not", "an", "object"], 400, "invalid_request"),
        ({**TOKEN_BODY, "account_id": "BU-1"}, 400, "invalid_request"),
    ],
)
async def test_token_refuses_bad_requests(
    start: Start, body: object, status: int, error: str
) -> None:
    _, api = await start()
    refused = await api.post_token(body)

    assert refused.status == status
    assert refused.json()["error"] == error
    assert refused.json()["error_description"]


async def test_token_accepts_an_account_id_and_echoes_a_scope(start: Start) -> None:
    _, api = await start()
    body = {**TOKEN_BODY, "account_id": 5100042, "scope": "journeys_read"}
    granted = await api.post_token(body)

    assert granted.status == 200
    assert granted.json()["scope"] == "journeys_read"


async def test_download_serves_the_expected_bytes(start: Start) -> None:
    sandbox, api = await start()
    got = await api.download()
    expected = sandbox.expected_bytes(HOUR, NEXT, sfmc.DEFAULT_COLUMNS, "csv")

    assert got.status == 200
    assert got.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert got.headers["Transfer-Encoding"] == "chunked"
    assert got.body == expected
    assert expected.count(b"\n") == len(sandbox.history.expected(HOUR, NEXT)) + 1
    assert expected.startswith(b"TransactionTime,ContactKey,Status,DefinitionId,")


async def test_download_honours_columns_format_and_filters(start: Start) -> None:
    sandbox, api = await start()
    columns = ["Status", "ContactKey", "Result.Messages"]
    filters = {"statuses": ["failed", "Waiting"], "activityTypes": []}
    got = await api.download(
        query={"columns": ",".join(columns), "format": "tsv"}, body=filters
    )
    expected = sandbox.expected_bytes(HOUR, NEXT, columns, "tsv", filters=filters)

    assert got.headers["Content-Type"] == "text/tab-separated-values; charset=utf-8"
    assert got.body == expected
    assert {line.split(b"\t")[0] for line in expected.splitlines()[1:]} == {
        b"Failed",
        b"Waiting",
    }


async def test_two_sandboxes_with_one_seed_serve_the_same_bytes(start: Start) -> None:
    _, first = await start(seed=11)
    _, second = await start(seed=11)
    _, other = await start(seed=12)
    query = {"columns": ",".join(sfmc.COLUMNS)}

    same = (await first.download(query=query)).body
    assert same == (await second.download(query=query)).body
    assert same != (await other.download(query=query)).body


@pytest.mark.parametrize(
    ("headers", "query", "body", "errorcode", "message"),
    [
        ({"x-direct-pipe": "false"}, {}, {}, 10005, "x-direct-pipe"),
        ({}, {"columns": "Status,Nope"}, {}, 10002, "'Nope'"),
        ({}, {"format": "xml"}, {}, 10003, "'xml'"),
        ({}, {}, {"start": "yesterday"}, 10001, "'yesterday'"),
        ({}, {}, {"end": 17}, 10001, "end date 17"),
        ({}, {}, {"start": sfmc.format_time(NEXT + 1)}, 10001, "later than"),
        ({}, {}, {"end": "9999-12-31T23:00:00-12:00"}, 10001, "not a valid"),
        ({}, {}, {"start": "0001-01-01T00:00:00+01:00"}, 10001, "not a valid"),
        ({}, {}, {"statuses": "Failed"}, 10004, "statuses"),
    ],
)
async def test_download_refuses_bad_requests(
    start: Start,
    headers: dict[str, str],
    query: dict[str, str],
    body: dict[str, Any],
    errorcode: int,
    message: str,
) -> None:
    _, api = await start()
    refused = await api.download(headers=headers, query=query, body=body)

    assert refused.status == 400
    assert refused.json()["errorcode"] == errorcode
    assert message in refused.json()["message"]


async def test_download_refuses_a_body_that_is_not_json(start: Start) -> None:
    sandbox, api = await start()
    token = await api.login()
    headers = {"Authorization": f"Bearer {token}", "x-direct-pipe": "true"}
    url = sandbox.rest_url + sfmc.DOWNLOAD_PATH
    async with api.session.post(url, data=b"start=now", headers=headers) as response:
        refused = await answer(response)

    assert (refused.status, refused.json()["errorcode"]) == (400, 10000)


async def test_download_without_a_valid_token_is_not_authorized(start: Start) -> None:
    _, api = await start()
    api.token = "made-up"
    refused = await api.download()

    assert refused.status == 401
    assert refused.json() == {
        "message": "Not Authorized",
        "errorcode": 0,
        "documentation": "",
    }


async def test_a_token_expires_after_its_lifetime(start: Start) -> None:
    clock = Clock()
    _, api = await start(clock=clock, token_lifetime_seconds=60)
    await api.login()
    clock.seconds += 59.9

    assert (await api.download()).status == 200
    clock.seconds += 0.1
    assert (await api.download()).status == 401
    assert (await api.get(sfmc.FRESHNESS_PATH)).status == 401


async def test_revoking_tokens_refuses_them(start: Start) -> None:
    sandbox, api = await start()
    await api.login()
    sandbox.revoke_tokens()

    assert (await api.download()).status == 401
    await api.login()
    assert (await api.download()).status == 200


async def test_an_inclusive_end_adds_rows_at_the_end_but_not_to_the_truth(
    start: Start,
) -> None:
    sandbox, api = await start(end_inclusive="true")
    history = sandbox.history
    at_end = [
        row
        for row in history.hour(NEXT)
        if row[sfmc.COLUMNS.index("TransactionTime")] == sfmc.format_time(NEXT)
    ]
    got = await api.download(query={"columns": "TransactionTime"})
    truth = await api.download(
        query={"columns": "TransactionTime"}, path="sandbox/truth"
    )
    exclusive = sandbox.expected_bytes(HOUR, NEXT, ["TransactionTime"], "csv")

    assert len(at_end) in (1, 2)
    assert got.body == b"TransactionTime\n" + len(at_end) * (
        sfmc.format_time(NEXT) + "\n"
    ).encode() + exclusive.removeprefix(b"TransactionTime\n")
    assert truth.body == exclusive


@pytest.mark.parametrize(
    ("mode", "status", "body"),
    [("header", 200, b"Status,Id\n"), ("empty", 200, b""), ("204", 204, b"")],
)
async def test_an_empty_window_answers_per_switch(
    start: Start, mode: str, status: int, body: bytes
) -> None:
    _, api = await start(empty_window=mode)
    got = await api.download(query={"columns": "Status,Id"}, body=NOBODY)

    assert (got.status, got.body) == (status, body)


@pytest.mark.parametrize("fault", ["cut_length", "cut_gzip", "stall"])
async def test_a_fault_is_counted_only_where_it_is_injected(
    start: Start, fault: str
) -> None:
    # An empty window answered with 204 has no body to cut or stall: the fault
    # drawn for it is not injected, and the stats must not say it was.
    faults = f"{fault}@*,stall_seconds=1"
    sandbox, api = await start(empty_window="204", faults=faults)
    skipped = await api.download(body=NOBODY)
    assert skipped.status == 204
    assert sandbox.stats.faults[fault] == 0

    timeout = aiohttp.ClientTimeout(sock_read=0.3)
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        await api.download(client_timeout=timeout)
    assert sandbox.stats.faults[fault] == 1


async def test_crlf_and_bom_change_the_file_but_not_the_truth(start: Start) -> None:
    sandbox, api = await start(newline="crlf", bom="yes")
    got = await api.download()
    truth = await api.download(path="sandbox/truth")
    lines = truth.body.split(b"\r\n")

    assert got.body == BOM + truth.body
    assert truth.body == sandbox.expected_bytes(HOUR, NEXT, sfmc.DEFAULT_COLUMNS, "csv")
    assert lines[-1] == b""
    assert len(lines) == len(sandbox.history.expected(HOUR, NEXT)) + 2
    assert b"\n" not in b"".join(lines)


@pytest.mark.parametrize(
    ("accept", "options", "coding", "decode"),
    [
        ("gzip", {}, "gzip", gzip.decompress),
        ("deflate", {}, "deflate", zlib.decompress),
        ("deflate, gzip;q=0.5", {}, "gzip", gzip.decompress),
        ("gzip;q=0, deflate", {}, "deflate", zlib.decompress),
        (
            "deflate",
            {"deflate_raw": True},
            "deflate",
            lambda b: zlib.decompress(b, -15),
        ),
        ("gzip", {"honour_accept_encoding": False}, None, bytes),
        ("identity", {"false_encoding": True}, "gzip", bytes),
        ("gzip, deflate", {"false_encoding": True}, "gzip", bytes),
    ],
)
async def test_content_coding_follows_the_switches(
    start: Start,
    accept: str,
    options: dict[str, object],
    coding: str | None,
    decode: Callable[[bytes], bytes],
) -> None:
    sandbox, api = await start(**options)
    got = await api.download(headers={"Accept-Encoding": accept})

    assert got.headers.get("Content-Encoding") == coding
    assert decode(got.body) == sandbox.expected_bytes(
        HOUR, NEXT, sfmc.DEFAULT_COLUMNS, "csv"
    )


async def test_length_transfer_sends_a_content_length(start: Start) -> None:
    _, api = await start(transfer="length")
    got = await api.download(headers={"Accept-Encoding": "gzip"})

    assert "Transfer-Encoding" not in got.headers
    assert int(got.headers["Content-Length"]) == len(got.body)
    assert gzip.decompress(got.body).startswith(b"TransactionTime,")


@pytest.mark.parametrize(
    ("kind", "status", "errorcode", "retry_after"),
    [
        ("throttle", 429, 50100, "2"),
        ("blocked", 429, 50200, None),
        ("unavailable", 503, 50300, "2"),
        ("token_revoked", 401, 0, None),
    ],
)
async def test_status_faults_answer_sfmc_errors(
    start: Start, kind: str, status: int, errorcode: int, retry_after: str | None
) -> None:
    sandbox, api = await start(faults=f"{kind}@1,retry_after=2")
    refused = await api.download()

    assert refused.status == status
    assert refused.headers.get("Retry-After") == retry_after
    assert refused.json()["errorcode"] == errorcode
    assert refused.json()["documentation"] == ""
    if kind == "throttle":
        assert refused.json()["retryAfter"] == 2

    if kind == "token_revoked":
        assert (await api.download()).status == 401
        await api.login()

    assert (await api.download()).status == 200
    assert sandbox.stats.faults == {kind: 1}
    assert sandbox.stats.downloads == {window_key(HOUR, NEXT): 2}


@pytest.mark.parametrize(
    ("kind", "status", "text"),
    [
        ("error500", 500, b"Internal Server Error"),
        ("error502", 502, b"502 Bad Gateway"),
        ("error504", 504, b"504 Gateway Time-out"),
    ],
)
async def test_server_errors_answer_plain_pages(
    start: Start, kind: str, status: int, text: bytes
) -> None:
    _, api = await start(faults=f"{kind}@1")
    refused = await api.download()

    assert refused.status == status
    assert text in refused.body


async def test_a_rule_fires_on_the_first_attempt_of_every_window(start: Start) -> None:
    sandbox, api = await start(faults="throttle@1")
    statuses = [
        (await api.download(start, end)).status
        for start, end in [
            (HOUR, NEXT),
            (HOUR, NEXT),
            (NEXT, NEXT + HOUR_MS),
            (HOUR, NEXT),
        ]
    ]

    assert statuses == [429, 200, 429, 200]
    assert sandbox.stats.downloads == {
        window_key(HOUR, NEXT): 3,
        window_key(NEXT, NEXT + HOUR_MS): 1,
    }


async def test_a_rule_can_name_one_window_and_attempt(start: Start) -> None:
    _, api = await start(faults=f"error502@2@{sfmc.format_time(NEXT)}")
    later = [(await api.download(NEXT, NEXT + HOUR_MS)).status for _ in range(3)]
    other = [(await api.download()).status for _ in range(3)]

    assert later == [200, 502, 200]
    assert other == [200, 200, 200]


async def test_fault_rates_are_seeded_and_repeatable(start: Start) -> None:
    runs = []
    for _ in range(2):
        _, api = await start(faults="error500=0.5,seed=3")
        runs.append([(await api.download()).status for _ in range(12)])

    assert runs[0] == runs[1]
    assert set(runs[0]) == {200, 500}


async def test_rates_also_hit_estimate_and_freshness(start: Start) -> None:
    sandbox, api = await start(faults="throttle=1.0")

    assert (await api.download(path=sfmc.ESTIMATE_PATH)).status == 429
    assert (await api.get(sfmc.FRESHNESS_PATH)).status == 429
    assert sandbox.stats.faults == {"throttle": 2}


async def test_reset_drops_the_connection_before_any_answer(start: Start) -> None:
    sandbox, api = await start(faults="reset@1")

    with pytest.raises(aiohttp.ClientConnectionError):
        await api.download()

    assert (await api.download()).status == 200
    assert sandbox.stats.answers == {200: 2, 0: 1}


async def read_until_failure(
    api: Api, *, client_timeout: aiohttp.ClientTimeout | None = None, **headers: str
) -> tuple[dict[str, str], bytes, BaseException]:
    """Download, keeping the bytes received before the transfer failed."""
    token = api.token or await api.login()
    sent = {
        "Authorization": f"Bearer {token}",
        "x-direct-pipe": "true",
        "Accept-Encoding": "identity",
        **headers,
    }
    document = {"start": sfmc.format_time(HOUR), "end": sfmc.format_time(NEXT)}
    url = api.sandbox.rest_url + sfmc.DOWNLOAD_PATH
    received = bytearray()
    post = api.session.post(url, headers=sent, json=document, timeout=client_timeout)
    async with post as r:
        try:
            async for chunk in r.content.iter_any():
                received.extend(chunk)
        except (aiohttp.ClientPayloadError, TimeoutError) as error:
            return dict(r.headers), bytes(received), error

    raise AssertionError("the download completed")


@pytest.mark.parametrize(
    ("kind", "framing"),
    [("cut_length", "Content-Length"), ("cut_chunked", "Transfer-Encoding")],
)
async def test_cuts_close_the_connection_mid_row(
    start: Start, kind: str, framing: str
) -> None:
    sandbox, api = await start(faults=f"{kind}@1")
    expected = sandbox.expected_bytes(HOUR, NEXT, sfmc.DEFAULT_COLUMNS, "csv")
    headers, received, error = await read_until_failure(api)

    assert isinstance(error, aiohttp.ClientPayloadError)
    assert framing in headers
    assert headers.get("Content-Length") in (None, str(len(expected)))
    assert received == expected[: mid_row(expected)]
    assert not received.endswith(b"\n")
    assert (await api.download()).body == expected


async def test_cut_gzip_sends_a_complete_response_holding_a_truncated_stream(
    start: Start,
) -> None:
    sandbox, api = await start(faults="cut_gzip@1", transfer="length")
    expected = sandbox.expected_bytes(HOUR, NEXT, sfmc.DEFAULT_COLUMNS, "csv")
    got = await api.download()
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    partial = inflater.decompress(got.body)

    assert got.status == 200
    assert got.headers["Content-Encoding"] == "gzip"
    assert int(got.headers["Content-Length"]) == len(got.body)
    assert not inflater.eof
    assert 0 < len(partial) < len(expected)
    assert expected.startswith(partial)


async def test_stall_sends_part_then_nothing(start: Start) -> None:
    sandbox, api = await start(faults="stall@1,stall_seconds=30")
    expected = sandbox.expected_bytes(HOUR, NEXT, sfmc.DEFAULT_COLUMNS, "csv")
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(sock_read=0.3)
    _, received, error = await read_until_failure(api, client_timeout=timeout)

    assert isinstance(error, TimeoutError)
    assert received == expected[: mid_row(expected)]
    assert time.monotonic() - started < 2.0


async def test_a_short_stall_ends_by_closing_the_connection(start: Start) -> None:
    _, api = await start(faults="stall@1,stall_seconds=0.2")
    _, received, error = await read_until_failure(api)

    assert isinstance(error, aiohttp.ClientPayloadError)
    assert received


async def test_slow_first_byte_delays_the_headers(start: Start) -> None:
    sandbox, api = await start(faults="slow_first_byte@1,first_byte_seconds=0.3")
    started = time.monotonic()
    got = await api.download()

    assert time.monotonic() - started >= 0.3
    assert got.body == sandbox.expected_bytes(HOUR, NEXT, sfmc.DEFAULT_COLUMNS, "csv")


async def test_token_error_fails_a_token_request(start: Start) -> None:
    sandbox, api = await start(faults="token_error@1")
    first = await api.post_token()

    assert (first.status, first.body) == (500, b"Internal Server Error")
    assert (await api.post_token()).status == 200
    assert sandbox.stats.token_requests == 2


@pytest.mark.parametrize("transfer", ["length", "chunked"])
async def test_a_cap_cuts_the_body_with_complete_framing(
    start: Start, transfer: str
) -> None:
    sandbox, api = await start(cap_bytes=1000, transfer=transfer)
    got = await api.download()

    assert got.status == 200
    assert (
        got.body
        == sandbox.expected_bytes(HOUR, NEXT, sfmc.DEFAULT_COLUMNS, "csv")[:1000]
    )


async def test_a_cap_can_refuse_the_download(start: Start) -> None:
    _, api = await start(cap_bytes=1000, cap_behaviour="error")
    refused = await api.download()
    small = await api.download(query={"columns": "Status"}, body=NOBODY)

    assert (refused.status, refused.json()["errorcode"]) == (400, 10006)
    assert small.status == 200


async def test_downloads_past_the_concurrency_cap_are_blocked(start: Start) -> None:
    sandbox, api = await start(max_concurrent_downloads=1, first_byte_seconds=0.3)
    await api.login()
    first = asyncio.create_task(api.download())
    await asyncio.sleep(0.1)

    assert sandbox.stats.active_downloads == 1
    refused = await api.download(NEXT, NEXT + HOUR_MS)

    assert (refused.status, refused.json()["errorcode"]) == (429, 50200)
    assert "Retry-After" not in refused.headers
    assert (await first).status == 200
    assert sandbox.stats.peak_concurrent_downloads == 1


async def test_bandwidth_paces_the_body(start: Start) -> None:
    sandbox, api = await start(bandwidth_bytes_per_second=40_000)
    size = len(sandbox.expected_bytes(HOUR, NEXT, sfmc.DEFAULT_COLUMNS, "csv"))
    started = time.monotonic()
    got = await api.download()

    assert len(got.body) == size
    assert time.monotonic() - started >= 0.9 * size / 40_000


@pytest.mark.parametrize(
    ("shape", "names"),
    [
        ("a", ("rowCount", "estimatedSizeBytes", "estimatedCompressedSizeBytes")),
        ("b", ("totalRows", "fileSize", "compressedFileSize")),
    ],
)
async def test_estimate_counts_what_the_download_sends(
    start: Start, shape: str, names: tuple[str, str, str]
) -> None:
    sandbox, api = await start(estimate_shape=shape)
    document = (await api.download(path=sfmc.ESTIMATE_PATH)).json()
    body = sandbox.expected_bytes(HOUR, NEXT, sfmc.DEFAULT_COLUMNS, "csv")
    rows, size, compressed = (document[name] for name in names)

    assert set(document) == set(names)
    assert rows == len(sandbox.history.expected(HOUR, NEXT))
    assert size == len(body)
    assert 0.1 * size < compressed < 0.6 * size
    assert sandbox.stats.downloads == {}


@pytest.mark.parametrize(
    ("shape", "name"), [("a", "lagSeconds"), ("b", "historyLagSeconds")]
)
async def test_freshness_reports_the_lag(start: Start, shape: str, name: str) -> None:
    _, api = await start(freshness_shape=shape, history_lag_seconds=900)

    assert (await api.get(sfmc.FRESHNESS_PATH)).json() == {name: 900}


async def test_garbage_shapes_cannot_be_parsed(start: Start) -> None:
    _, api = await start(estimate_shape="garbage", freshness_shape="garbage")
    estimate = await api.download(path=sfmc.ESTIMATE_PATH)
    freshness = await api.get(sfmc.FRESHNESS_PATH)

    for got in (estimate, freshness):
        assert got.status == 200
        with pytest.raises(ValueError):
            got.json()


async def test_truth_needs_no_token_and_matches_expected_bytes(start: Start) -> None:
    sandbox, api = await start(rows_per_hour=50)
    url = f"{sandbox.auth_url}/sandbox/truth"
    document = {
        "start": sfmc.format_time(HOUR),
        "end": sfmc.format_time(NEXT + HOUR_MS),
    }
    async with api.session.post(url, params={"format": "tsv"}, json=document) as r:
        truth = await answer(r)

    assert truth.status == 200
    expected = sandbox.expected_bytes(HOUR, NEXT + HOUR_MS, sfmc.DEFAULT_COLUMNS, "tsv")
    assert truth.body == expected
    query = {"newline": "crlf", "columns": "Id"}
    async with api.session.post(url, params=query, json=document) as r:
        crlf = await answer(r)

    ids = [
        row[sfmc.COLUMNS.index("Id")]
        for row in sandbox.history.expected(HOUR, NEXT + HOUR_MS)
    ]
    assert crlf.body == "".join(f"{value}\r\n" for value in ["Id", *ids]).encode()


async def test_stats_count_requests_answers_and_windows(start: Start) -> None:
    sandbox, api = await start(faults="error500@1")
    await api.download()
    await api.download()
    await api.download(headers={"x-direct-pipe": ""})
    stats = (await api.get("sandbox/stats")).json()

    assert stats == {
        "requests": {"/v2/token": 1, f"/{sfmc.DOWNLOAD_PATH}": 3, "/sandbox/stats": 1},
        "answers": {"200": 2, "500": 1, "400": 1},
        "token_requests": 1,
        "downloads": {window_key(HOUR, NEXT): 2},
        "faults": {"error500": 1},
        "active_downloads": 0,
        "peak_concurrent_downloads": 1,
    }
    assert sandbox.stats.as_dict()["answers"] == {"200": 3, "500": 1, "400": 1}


async def test_update_changes_settings_while_serving(start: Start) -> None:
    sandbox, api = await start()
    before = (await api.download()).body
    sandbox.update(newline="crlf", faults=parse_faults("blocked@*"))

    assert (await api.download()).status == 429
    sandbox.update(faults=FaultSettings(), seed=99)
    after = (await api.download()).body
    assert after.count(b"\r\n") == after.count(b"\n")
    assert after != before.replace(b"\n", b"\r\n")
    with pytest.raises(ValueError, match="'newline'"):
        sandbox.update(newline="cr")


def test_settings_from_options_converts_strings() -> None:
    settings = settings_from_options(
        {
            "seed": "3",
            "rows-per-hour": "1000",
            "end_inclusive": "yes",
            "empty_window": 204,
            "cap_bytes": "none",
            "max_concurrent_downloads": "4",
            "first_byte_seconds": "0.5",
            "faults": "throttle=0.1, cut_gzip=0.05 stall@1 retry_after=3",
        }
    )

    assert settings == SandboxSettings(
        seed=3,
        rows_per_hour=1000,
        end_inclusive=True,
        empty_window="204",
        cap_bytes=None,
        max_concurrent_downloads=4,
        first_byte_seconds=0.5,
        faults=FaultSettings(
            rates={"throttle": 0.1, "cut_gzip": 0.05},
            rules=(FaultRule("stall", 1),),
            retry_after_seconds=3,
        ),
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"colour": "red"}, "unknown sandbox option 'colour'; known options: seed, "),
        (
            {"transfer": "pigeon"},
            "sandbox option 'transfer': expected one of chunked, ",
        ),
        ({"seed": "seven"}, "sandbox option 'seed': expected an integer, got 'seven'"),
        ({"bom": "maybe"}, "sandbox option 'bom': expected true or false, got 'maybe'"),
        (
            {"rows_per_hour": "-5"},
            "sandbox option 'rows_per_hour': expected a number >= ",
        ),
        ({"cap_bytes": "1.5"}, "sandbox option 'cap_bytes': expected an integer, got"),
        (
            {"faults": "throttle=2"},
            "bad fault 'throttle=2': rate 2.0 is outside 0.0-1.0",
        ),
        ({"faults": ["reset=0.6", "cut_gzip=0.6"]}, "bad faults: download fault rates"),
        ({"faults": "flood=0.1"}, "bad fault 'flood=0.1': unknown fault kind 'flood'"),
        ({"faults": "stall@0"}, "bad fault 'stall@0': attempts count from 1"),
        ({"faults": "stall@x"}, "bad fault 'stall@x': attempt 'x' is not a number"),
        (
            {"faults": "reset=lots"},
            "bad fault 'reset=lots': reset's rate 'lots' is not",
        ),
    ],
)
def test_settings_from_options_names_the_bad_option(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")) as caught:
        settings_from_options(options)

    assert "\n" not in str(caught.value)


def test_fault_rates_of_downloads_may_not_pass_one() -> None:
    with pytest.raises(ValueError, match=r"sum to 1\.2"):
        parse_faults("throttle=0.6,reset=0.6")

    assert parse_faults("throttle=0.6,token_error=0.6").rates["token_error"] == 0.6


def test_fault_rules_parse_windows_and_every_attempt() -> None:
    settings = parse_faults(["cut_gzip@2@2024-02-16T07:00:00Z", "reset@*"])

    assert settings.rules == (FaultRule("cut_gzip", 2, HOUR), FaultRule("reset", None))


async def test_serve_runs_until_cancelled() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    task = asyncio.create_task(serve(SandboxSettings(), port=port, now_ms=NOW))
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            try:
                url = f"http://127.0.0.1:{port}/{sfmc.TOKEN_PATH}"
                async with session.post(url, json=TOKEN_BODY) as response:
                    assert response.status == 200
                    break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.02)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.com"])
async def test_serve_refuses_hosts_that_are_not_loopback(host: str) -> None:
    with pytest.raises(ValueError, match=f"refusing to serve the sandbox on '{host}'"):
        await serve(host=host)


def test_each_fault_item_given_apart_may_hold_several() -> None:
    apart = parse_faults(["throttle=0.1,reset=0.1", "stall@1 stall_seconds=2"])

    assert apart == parse_faults("throttle=0.1,reset=0.1 stall@1 stall_seconds=2")
    assert apart.rates == {"throttle": 0.1, "reset": 0.1}
    assert apart.rules == (FaultRule("stall", 1),)
    assert apart.stall_seconds == 2.0


def test_the_sandbox_command_takes_several_faults_after_one_fault_flag() -> None:
    from orchestrator.cli import build_parser
    from orchestrator.demo import sandbox_options

    flags = ["sandbox", "--fault", "throttle=0.1,reset=0.1", "--fault", "stall@1"]
    options = sandbox_options(build_parser().parse_args(flags))
    faults = settings_from_options(options).faults

    assert faults.rates == {"throttle": 0.1, "reset": 0.1}
    assert faults.rules == (FaultRule("stall", 1),)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"faults": "stall_seconds=-1"},
            "bad fault 'stall_seconds=-1': stall_seconds -1 is not a finite number",
        ),
        (
            {"faults": ["retry_after=-5"]},
            "bad fault 'retry_after=-5': retry_after -5 is not a finite number",
        ),
        (
            {"faults": "first_byte_seconds=-0.5"},
            "bad fault 'first_byte_seconds=-0.5': first_byte_seconds -0.5 is not a",
        ),
        ({"faults": "seed=-1"}, "bad fault 'seed=-1': seed -1 is not a finite"),
        ({"faults": "stall_seconds=nan"}, "bad fault 'stall_seconds=nan': stall_"),
        ({"faults": "first_byte_seconds=inf"}, "bad fault 'first_byte_seconds=inf'"),
        (
            {"faults": "retry_after=1.5"},
            "bad fault 'retry_after=1.5': retry_after 1.5 is not a whole number",
        ),
        ({"faults": "seed=0.5"}, "bad fault 'seed=0.5': seed 0.5 is not a whole"),
        (
            {"first_byte_seconds": "-1"},
            "sandbox option 'first_byte_seconds': expected a number >= 0, got -1",
        ),
        (
            {"first_byte_seconds": "nan"},
            "sandbox option 'first_byte_seconds': expected a finite number, got nan",
        ),
        (
            {"first_byte_seconds": "inf"},
            "sandbox option 'first_byte_seconds': expected a finite number, got inf",
        ),
        (
            {"cap_bytes": "0"},
            "sandbox option 'cap_bytes': expected a number >= 1, got 0",
        ),
        (
            {"max_concurrent_downloads": 0},
            "sandbox option 'max_concurrent_downloads': expected a number >= 1, got 0",
        ),
        (
            {"bandwidth_bytes_per_second": "0"},
            "sandbox option 'bandwidth_bytes_per_second': expected a number >= 1",
        ),
        (
            {"token_lifetime_seconds": "0"},
            "sandbox option 'token_lifetime_seconds': expected a number >= 1",
        ),
        (
            {"history_lag_seconds": "-1"},
            "sandbox option 'history_lag_seconds': expected a number >= 0",
        ),
        ({"cache_megabytes": "-1"}, "sandbox option 'cache_megabytes': expected a"),
        (
            {"rows_per_hour": "99999999999"},
            "sandbox option 'rows_per_hour': expected a number <= 1,000,000",
        ),
        (
            {"token_lifetime_seconds": "100000000"},
            "sandbox option 'token_lifetime_seconds': expected a number <= 86,400",
        ),
        (
            {"cache_megabytes": "999999999"},
            "sandbox option 'cache_megabytes': expected a number <= 16,384",
        ),
        ({"seed": "-1"}, "sandbox option 'seed': expected a number >= 0, got -1"),
    ],
)
def test_settings_from_options_refuses_impossible_numbers(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")) as caught:
        settings_from_options(options)

    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "field",
    ["retry_after_seconds", "stall_seconds", "first_byte_seconds", "seed"],
)
def test_fault_settings_refuse_negative_numbers(field: str) -> None:
    changes: dict[str, Any] = {field: -1}
    with pytest.raises(ValueError, match=f"^{field} -1 is not a finite number >= 0"):
        FaultSettings(**changes)


def test_settings_allow_the_least_sensible_numbers() -> None:
    settings = settings_from_options(
        {
            "seed": "0",
            "rows_per_hour": "0",
            "history_lag_seconds": "0",
            "cache_megabytes": "0",
            "first_byte_seconds": "0",
            "cap_bytes": "1",
            "max_concurrent_downloads": "1",
            "bandwidth_bytes_per_second": "1",
            "token_lifetime_seconds": "1",
            "faults": "retry_after=0,stall_seconds=0,first_byte_seconds=0,seed=0",
        }
    )

    assert settings.cap_bytes == settings.max_concurrent_downloads == 1
    assert settings.faults == FaultSettings(
        retry_after_seconds=0, stall_seconds=0.0, first_byte_seconds=0.0
    )


async def test_updates_while_serving_refuse_impossible_numbers() -> None:
    async with SandboxServer(SandboxSettings(), now_ms=NOW) as sandbox:
        with pytest.raises(ValueError, match="'cap_bytes': expected a number >= 1"):
            sandbox.update(cap_bytes=0)

        with pytest.raises(ValueError, match="'first_byte_seconds': expected a fin"):
            sandbox.update(first_byte_seconds=float("nan"))

        assert sandbox.settings == SandboxSettings()


def test_the_sandbox_command_refuses_a_negative_fault_number() -> None:
    import subprocess
    import sys

    command = [sys.executable, "-m", "orchestrator", "sandbox", "--port", "1"]
    done = subprocess.run(
        [*command, "--fault", "retry_after=-5"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert done.returncode == 2
    assert done.stderr == (
        "journey-export: error: sandbox: bad fault 'retry_after=-5': "
        "retry_after -5 is not a finite number >= 0\n"
    )
    assert done.stdout == ""
