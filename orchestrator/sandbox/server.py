"""Running the sandbox: in-process for tests and benchmarks, or until cancelled."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from aiohttp import web

from orchestrator import sfmc
from orchestrator.sandbox.app import SandboxApp
from orchestrator.sandbox.history import History
from orchestrator.sandbox.settings import SandboxSettings
from orchestrator.sandbox.stats import SandboxStats

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8765
SHUTDOWN_SECONDS = 0.5


class SandboxServer:
    """The sandbox served on a loopback port: `async with SandboxServer() as sandbox`.

    Port 0 picks a free port. `now_ms` fixes the history's present (None follows the
    wall clock); `clock` gives monotonic seconds for token expiry. Raises ValueError
    for a host that is not loopback unless `allow_remote`.
    """

    def __init__(
        self,
        settings: SandboxSettings | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        now_ms: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        allow_remote: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        check_host(host, allow_remote=allow_remote)
        self._ssl_context = ssl_context
        self._app = SandboxApp(
            settings or SandboxSettings(), now_ms=now_ms, clock=clock
        )
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> SandboxServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Bind and start serving."""
        runner = web.AppRunner(
            self._app.build(),
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=SHUTDOWN_SECONDS,
        )
        await runner.setup()
        site = web.TCPSite(
            runner, self._host, self._port, ssl_context=self._ssl_context
        )
        await site.start()
        self._runner = runner
        self._port = runner.addresses[0][1]
        scheme = "https" if self._ssl_context else "http"
        self._app.base_url = f"{scheme}://{_url_host(self._host)}:{self._port}/"
        logger.debug("sandbox listening on %s", self.auth_url)

    async def close(self) -> None:
        """Stop serving; downloads still streaming are dropped."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def port(self) -> int:
        """The bound port."""
        return self._port

    @property
    def auth_url(self) -> str:
        """The auth base URL, without a trailing slash."""
        return self._app.base_url.rstrip("/")

    @property
    def rest_url(self) -> str:
        """The REST base URL, with the trailing slash the token answer gives."""
        return self._app.base_url

    @property
    def settings(self) -> SandboxSettings:
        """The settings in force."""
        return self._app.settings

    @property
    def history(self) -> History:
        """The history served."""
        return self._app.history

    @property
    def stats(self) -> SandboxStats:
        """The running counts."""
        return self._app.stats

    def update(self, **changes: Any) -> None:
        """Change settings (fields of SandboxSettings) while serving.

        Raises TypeError for an unknown field, ValueError for a bad value.
        """
        self._app.apply(dataclasses.replace(self._app.settings, **changes))

    def revoke_tokens(self) -> None:
        """Invalidate every token handed out so far."""
        self._app.revoke_tokens()

    @property
    def issued_tokens(self) -> list[str]:
        """Every token handed out, for tests that look for leaks."""
        return list(self._app.tokens.issued)

    def expected_bytes(
        self,
        start_ms: int,
        end_ms: int,
        columns: Sequence[str] = sfmc.DEFAULT_COLUMNS,
        fmt: str = "csv",
        *,
        filters: Mapping[str, Sequence[str]] | None = None,
        newline: str | None = None,
    ) -> bytes:
        """The bytes an exporter must end with for [start, end): header once, no BOM.

        `newline` defaults to the one the settings give the files.
        """
        newline = newline or self._app.settings.line_ending
        window = self._app.history.window(
            start_ms, end_ms, columns, fmt, filters=filters, newline=newline
        )
        return window.body


async def serve(
    settings: SandboxSettings | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    allow_remote: bool = False,
    now_ms: int | None = None,
    on_ready: Callable[[SandboxServer], None] | None = None,
) -> None:
    """Serve the sandbox until cancelled; ``on_ready`` is called once it listens.

    Raises ValueError for a host that is not loopback unless `allow_remote`.
    """
    server = SandboxServer(
        settings, host=host, port=port, now_ms=now_ms, allow_remote=allow_remote
    )
    async with server:
        if on_ready is not None:
            on_ready(server)

        logger.info(
            "sandbox serving: auth URL %s, client id %s, %d rows per hour, seed %d",
            server.auth_url,
            server.settings.client_id,
            server.settings.rows_per_hour,
            server.settings.seed,
        )
        await asyncio.Event().wait()


def check_host(host: str, *, allow_remote: bool = False) -> None:
    """Refuse a host that is not a loopback address, unless `allow_remote`."""
    if allow_remote or host == "localhost":
        return

    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False

    if not loopback:
        raise ValueError(
            f"refusing to serve the sandbox on {host!r}: use a loopback address such "
            "as 127.0.0.1, or force it explicitly"
        )


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
