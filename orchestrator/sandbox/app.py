"""The sandbox's handlers: token, download, estimate, freshness, truth and stats."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from orchestrator import sfmc
from orchestrator.sandbox import wire
from orchestrator.sandbox.cache import Lru
from orchestrator.sandbox.faults import (
    STATUS_KINDS,
    ErrorAnswer,
    FaultInjector,
    fault_answer,
    not_authorized,
    rest_error,
)
from orchestrator.sandbox.history import History, Window, filter_key
from orchestrator.sandbox.query import (
    BAD_FORMAT,
    NO_DIRECT_PIPE,
    TOO_LARGE,
    BadRequest,
    DownloadQuery,
    read_query,
)
from orchestrator.sandbox.settings import NEWLINES, SandboxSettings
from orchestrator.sandbox.stats import NO_ANSWER, SandboxStats, window_key
from orchestrator.sandbox.tokens import TokenStore, check_grant

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

TRUTH_PATH = "sandbox/truth"
STATS_PATH = "sandbox/stats"
SCOPE = "journeys_read list_and_subscribers_read"
CONTENT_TYPES = {"csv": "text/csv", "tsv": "text/tab-separated-values"}
GARBAGE = b"<html><body>Service temporarily unavailable</body></html>"
RESET = web.RequestKey("sandbox.reset", bool)
BODY_CACHE_BYTES = 128 * 2**20
ESTIMATES_KEPT = 100_000
# Faults that need a body to act on: an answer without one (204, refused) has none.
CUTS_AND_STALLS = frozenset({"cut_length", "cut_chunked", "cut_gzip", "stall"})
Sizes = tuple[int, int, int]


class SandboxApp:
    """The sandbox's state (settings, history, tokens, stats) and its handlers.

    `clock` gives seconds for token expiry (monotonic); `now_ms` fixes the history's
    present, None follows the wall clock.
    """

    def __init__(
        self,
        settings: SandboxSettings,
        *,
        now_ms: int | None = None,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.stats = SandboxStats()
        self.base_url = "http://127.0.0.1/"
        self._now_ms = now_ms
        self.history = self._history(settings)
        self.tokens = TokenStore(clock)
        self._injector = FaultInjector(settings.faults)
        self._bodies: Lru[Window] = Lru(BODY_CACHE_BYTES, lambda w: len(w.body))
        self._estimates: Lru[Sizes] = Lru(ESTIMATES_KEPT, lambda _: 1)

    def apply(self, settings: SandboxSettings) -> None:
        """Switch to new settings; a new seed or volume means a new history."""
        old, self.settings = self.settings, settings
        if _volume(old) != _volume(settings):
            self.history = self._history(settings)
            self._bodies.clear()
            self._estimates.clear()

        if old.faults != settings.faults:
            self._injector = FaultInjector(settings.faults)

    def _history(self, settings: SandboxSettings) -> History:
        return History(
            settings.seed,
            settings.rows_per_hour,
            now_ms=self._now_ms,
            cache_bytes=settings.cache_megabytes * 2**20,
        )

    def revoke_tokens(self) -> None:
        """Invalidate every token handed out so far."""
        self.tokens.revoke_all()

    def build(self) -> web.Application:
        """The aiohttp application serving the sandbox."""
        app = web.Application(middlewares=[self._middleware])
        app.on_response_prepare.append(self._count_answer)
        app.router.add_post("/" + sfmc.TOKEN_PATH, self.token)
        app.router.add_post("/" + sfmc.DOWNLOAD_PATH, self.download)
        app.router.add_post("/" + sfmc.ESTIMATE_PATH, self.estimate)
        app.router.add_get("/" + sfmc.FRESHNESS_PATH, self.freshness)
        app.router.add_post("/" + TRUTH_PATH, self.truth)
        app.router.add_get("/" + STATS_PATH, self.stats_view)
        return app

    async def token(self, request: web.Request) -> web.StreamResponse:
        """POST v2/token: the client credentials grant."""
        self.stats.token_requests += 1
        if self._injector.for_token(self.stats.token_requests):
            self.stats.faults["token_error"] += 1
            return _answer(fault_answer("token_error"))

        body = await _json_object(request)
        settings = self.settings
        refusal = check_grant(
            body, client_id=settings.client_id, client_secret=settings.client_secret
        )
        if refusal is not None:
            return web.json_response(refusal.document(), status=refusal.status)

        lifetime = settings.token_lifetime_seconds
        token = self.tokens.issue(lifetime)
        return web.json_response(
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": lifetime,
                "scope": (body or {}).get("scope") or SCOPE,
                "rest_instance_url": settings.rest_url_override or self.base_url,
                "soap_instance_url": self.base_url + "soap/",
            }
        )

    async def download(self, request: web.Request) -> web.StreamResponse:
        """POST the download: the file, streamed, or an error or an injected fault."""
        token = self._token(request)
        if token is None:
            return _answer(not_authorized())

        if request.headers.get("x-direct-pipe", "").strip().lower() != "true":
            text = "The x-direct-pipe header must be present and set to true."
            return _answer(rest_error(400, NO_DIRECT_PIPE, text))

        query = await read_query(request)
        attempt = self.stats.count_attempt(window_key(query.start_ms, query.end_ms))
        limit = self.settings.max_concurrent_downloads
        if limit is not None and self.stats.active_downloads >= limit:
            return _answer(fault_answer("blocked"))

        fault = self._injector.for_download(query.start_ms, attempt)
        self.stats.download_started()
        try:
            return await self._download(request, query, fault, attempt, token)
        finally:
            self.stats.download_finished()

    async def estimate(self, request: web.Request) -> web.StreamResponse:
        """POST the estimate: row count and sizes of what the download would send."""
        refusal = self._call_refusal(request)
        if refusal is not None:
            return refusal

        query = await read_query(request)
        sizes = await self._sizes(query)
        names = {
            "a": ("rowCount", "estimatedSizeBytes", "estimatedCompressedSizeBytes"),
            "b": ("totalRows", "fileSize", "compressedFileSize"),
        }
        return _shaped(self.settings.estimate_shape, names, sizes)

    async def freshness(self, request: web.Request) -> web.StreamResponse:
        """GET freshness: how far history lags behind journey events, in seconds."""
        refusal = self._call_refusal(request)
        if refusal is not None:
            return refusal

        names = {"a": ("lagSeconds",), "b": ("historyLagSeconds",)}
        lag = (self.settings.history_lag_seconds,)
        return _shaped(self.settings.freshness_shape, names, lag)

    async def truth(self, request: web.Request) -> web.StreamResponse:
        """POST sandbox/truth: the bytes an exporter must end with for [start, end).

        The optional query parameter `newline` (lf or crlf) overrides the setting.
        """
        query = await read_query(request)
        newline = request.query.get("newline", self.settings.newline)
        if newline not in NEWLINES:
            raise BadRequest(
                BAD_FORMAT, f"Unknown newline {newline!r}; use lf or crlf."
            )

        window = await self._window(query, truth=True, newline=NEWLINES[newline])
        return web.Response(body=window.body, headers=_file_headers(query.fmt, None))

    async def stats_view(self, request: web.Request) -> web.StreamResponse:
        """GET sandbox/stats: the running counts as JSON."""
        return web.json_response(self.stats.as_dict())

    async def _download(
        self,
        request: web.Request,
        query: DownloadQuery,
        fault: str | None,
        attempt: int,
        token: str,
    ) -> web.StreamResponse:
        """The answer to a download; the fault drawn for this attempt (if any) is
        counted where it is injected, not where an answer without it is sent."""
        if fault is not None and fault not in CUTS_AND_STALLS:
            self._note_fault(fault, query, attempt)  # each happens whatever the body

        if fault in STATUS_KINDS or fault == "token_revoked":
            return self._fault_answer(fault, token)

        if fault == "reset":
            request[RESET] = True
            self.stats.answers[NO_ANSWER] += 1
            wire.reset(request)
            return web.Response()

        await self._first_byte_delay(fault)
        accepted = request.headers.get("Accept-Encoding", "")
        encoding = wire.content_coding(accepted, fault, self.settings)
        window = await self._body(query, encoding)
        if window.row_count == 0 and self.settings.empty_window == "204":
            return web.Response(status=204)

        data = window.body
        cap = self.settings.cap_bytes
        if cap is not None and len(data) > cap:
            if self.settings.cap_behaviour == "error":
                text = "The download exceeds the maximum file size; narrow the request."
                return _answer(rest_error(400, TOO_LARGE, text))

            data = data[:cap]

        if fault is not None and fault in CUTS_AND_STALLS and data:
            self._note_fault(fault, query, attempt)  # no body (204, refused): none

        claimed = (
            "gzip" if self.settings.false_encoding and fault != "cut_gzip" else None
        )
        headers = _file_headers(query.fmt, claimed or _coding(encoding))
        response = web.StreamResponse(headers=headers)
        delivery = wire.plan(data, fault, self.settings)
        return await wire.deliver(request, response, delivery)

    async def _body(self, query: DownloadQuery, encoding: str) -> Window:
        """The body as sent, in `encoding`; kept so a repeated window costs nothing."""
        raw = self.settings.deflate_raw
        key = (self._window_key(query), encoding, raw)
        cached = self._bodies.get(key)
        if cached is None:
            window = self._empty_body(await self._window(query))
            data = await asyncio.to_thread(
                wire.encode, window.body, encoding, raw_deflate=raw
            )
            cached = Window(data, window.row_count)
            self._bodies.put(key, cached)

        return cached

    async def _sizes(self, query: DownloadQuery) -> Sizes:
        """Rows, bytes and estimated gzip bytes of the body; kept like the bodies."""
        key = self._window_key(query)
        sizes = self._estimates.get(key)
        if sizes is None:
            body = self._empty_body(await self._window(query))
            compressed = await asyncio.to_thread(wire.estimate_compressed, body.body)
            sizes = (body.row_count, len(body.body), compressed)
            self._estimates.put(key, sizes)

        return sizes

    def _window_key(self, query: DownloadQuery) -> tuple[object, ...]:
        inclusive = self.settings.end_inclusive
        bounds = self.history.clip(
            query.start_ms, query.end_ms, end_inclusive=inclusive
        )
        choices = (self.settings.newline, self.settings.bom, self.settings.empty_window)
        return (*bounds, query.columns, query.fmt, filter_key(query.filters), *choices)

    async def _window(
        self, query: DownloadQuery, *, truth: bool = False, newline: str | None = None
    ) -> Window:
        return await asyncio.to_thread(
            self.history.window,
            query.start_ms,
            query.end_ms,
            query.columns,
            query.fmt,
            filters=query.filters,
            end_inclusive=self.settings.end_inclusive and not truth,
            newline=newline or self.settings.line_ending,
            bom=self.settings.bom and not truth,
        )

    def _empty_body(self, window: Window) -> Window:
        if window.row_count == 0 and self.settings.empty_window != "header":
            return Window(b"", 0)

        return window

    async def _first_byte_delay(self, fault: str | None) -> None:
        delay = self.settings.first_byte_seconds
        if fault == "slow_first_byte":
            delay += self.settings.faults.first_byte_seconds

        if delay > 0:
            await asyncio.sleep(delay)

    def _token(self, request: web.Request) -> str | None:
        return self.tokens.bearer(request.headers.get("Authorization", ""))

    def _call_refusal(self, request: web.Request) -> web.Response | None:
        token = self._token(request)
        if token is None:
            return _answer(not_authorized())

        fault = self._injector.for_call()
        if fault is None:
            return None

        self.stats.faults[fault] += 1
        logger.info("injecting %s into %s", fault, request.path)
        return self._fault_answer(fault, token)

    def _fault_answer(self, fault: str | None, token: str) -> web.Response:
        if fault == "token_revoked":
            self.tokens.revoke(token)

        retry_after = self.settings.faults.retry_after_seconds
        return _answer(fault_answer(str(fault), retry_after=retry_after))

    def _note_fault(self, fault: str, query: DownloadQuery, attempt: int) -> None:
        self.stats.faults[fault] += 1
        key = window_key(query.start_ms, query.end_ms)
        logger.info("injecting %s into attempt %d of window %s", fault, attempt, key)

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        self.stats.requests[request.path] += 1
        try:
            return await handler(request)
        except BadRequest as error:
            return _answer(rest_error(400, error.errorcode, error.message))

    async def _count_answer(
        self, request: web.Request, response: web.StreamResponse
    ) -> None:
        if not request.get(RESET):
            self.stats.answers[response.status] += 1


def _volume(settings: SandboxSettings) -> tuple[int, int, int]:
    return settings.seed, settings.rows_per_hour, settings.cache_megabytes


def _answer(error: ErrorAnswer) -> web.Response:
    response = web.Response(status=error.status, body=error.body, headers=error.headers)
    response.content_type = error.content_type
    return response


def _shaped(
    shape: str, names: Mapping[str, tuple[str, ...]], values: tuple[int, ...]
) -> web.Response:
    if shape == "garbage":
        return web.Response(body=GARBAGE, content_type="application/json")

    return web.json_response(dict(zip(names[shape], values, strict=True)))


def _file_headers(fmt: str, encoding: str | None) -> dict[str, str]:
    headers = {
        "Content-Type": f"{CONTENT_TYPES[fmt]}; charset=utf-8",
        "Content-Disposition": f'attachment; filename="journeyhistory.{fmt}"',
    }
    if encoding is not None:
        headers["Content-Encoding"] = encoding

    return headers


def _coding(encoding: str) -> str | None:
    return None if encoding == "identity" else encoding


async def _json_object(request: web.Request) -> dict[str, Any] | None:
    try:
        body = json.loads(await request.read())
    except ValueError:
        return None

    return body if isinstance(body, dict) else None
