"""The HTTP session every call of a run shares: TLS always verified, bodies left
compressed, a read timeout between chunks and no total limit."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from orchestrator.config import RunSettings


def tls_context(
    settings: RunSettings, given: ssl.SSLContext | None = None
) -> ssl.SSLContext | bool:
    """Verify certificates always: with the given bundle, else the system's CAs.

    ``True`` is aiohttp's own verifying context, built once when aiohttp is
    imported (loading the system's CAs again would cost every run start-up time).
    Like Python's default context it honours SSL_CERT_FILE and SSL_CERT_DIR.
    """
    if given is not None:
        return given

    if settings.http.ca_bundle is not None:
        return ssl.create_default_context(cafile=settings.http.ca_bundle)

    return True


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


MAX_JSON_BYTES = 64 * 1024


async def read_json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The JSON object of a small answer, read whole up to 64 KiB; {} if not JSON.

    ``content.read(n)`` returns what has arrived so far, so the body is read until
    it ends or the bound is reached.
    """
    pieces: list[bytes] = []
    size = 0
    while size < MAX_JSON_BYTES:
        piece = await response.content.read(MAX_JSON_BYTES - size)
        if not piece:
            break

        pieces.append(piece)
        size += len(piece)

    try:
        answer = json.loads(b"".join(pieces))
    except ValueError:
        return {}

    return answer if isinstance(answer, dict) else {}
