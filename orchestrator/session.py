"""The HTTP session every call of a run shares: TLS always verified, bodies left
compressed, a read timeout between chunks and no total limit."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp

from orchestrator.config import RunSettings


def tls_context(
    settings: RunSettings, given: ssl.SSLContext | None = None
) -> ssl.SSLContext:
    """Verify certificates always: with the given bundle, else the system's CAs.

    Python's default context honours SSL_CERT_FILE and SSL_CERT_DIR.
    """
    if given is not None:
        return given

    return ssl.create_default_context(cafile=settings.http.ca_bundle)


@asynccontextmanager
async def open_session(
    settings: RunSettings, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP session that leaves bodies compressed and times out on silence."""
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=settings.http.connect_timeout_seconds,
        sock_read=settings.http.read_timeout_seconds,
    )
    connector = aiohttp.TCPConnector(
        limit=settings.concurrency + 2, ssl=tls_context(settings, ssl_context)
    )
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:
        yield session
