"""Putting a download body on the wire: content coding, framing, cuts, stalls, pace."""

from __future__ import annotations

import asyncio
import gzip
import logging
import socket
import struct
import zlib
from dataclasses import dataclass

from aiohttp import web

from orchestrator.sandbox.settings import SandboxSettings

logger = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024
MIN_PACED_CHUNK = 1024
SAMPLE_BYTES = 1 << 20
LEVEL = 1


@dataclass(frozen=True, slots=True)
class Delivery:
    """How one body is sent.

    wire: the bytes the framing announces as the whole body (already encoded).
    cut_at: stop after this many bytes and drop the connection, framing unfinished.
    stall_seconds: before dropping a cut connection, send nothing for this long.
    bandwidth: bytes per second for this connection, None for as fast as possible.
    """

    wire: bytes
    chunked: bool
    cut_at: int | None = None
    stall_seconds: float = 0.0
    bandwidth: int | None = None


def plan(data: bytes, fault: str | None, settings: SandboxSettings) -> Delivery:
    """How to send `data` given the settings and the fault drawn, if any.

    Cuts and stalls happen mid-row (see mid_row); cut_gzip sends half of the
    compressed bytes as a complete response.
    """
    chunked = settings.transfer == "chunked"
    middle = mid_row(data)
    if fault == "cut_length":
        return Delivery(data, chunked=False, cut_at=middle)

    if fault == "cut_chunked":
        return Delivery(data, chunked=True, cut_at=middle)

    if fault == "cut_gzip":
        return Delivery(data[:middle], chunked=chunked)

    if fault == "stall":
        stall = settings.faults.stall_seconds
        return Delivery(data, chunked, cut_at=middle, stall_seconds=stall)

    return Delivery(data, chunked, bandwidth=settings.bandwidth_bytes_per_second)


def content_coding(
    accept_encoding: str, fault: str | None, settings: SandboxSettings
) -> str:
    """The coding the body is really sent in: gzip, deflate or identity.

    cut_gzip forces gzip; false_encoding sends identity (while claiming gzip).
    """
    if fault == "cut_gzip":
        return "gzip"

    if settings.false_encoding or not settings.honour_accept_encoding:
        return "identity"

    return choose_encoding(accept_encoding)


def choose_encoding(accept_encoding: str) -> str:
    """Pick gzip, deflate or identity from an Accept-Encoding value; gzip wins ties."""
    accepted = set()
    for item in accept_encoding.split(","):
        name, _, params = item.partition(";")
        weight = params.strip().removeprefix("q=")
        try:
            refused = bool(params.strip()) and float(weight) <= 0.0
        except ValueError:
            refused = False

        if not refused:
            accepted.add(name.strip().lower())

    if accepted & {"gzip", "x-gzip", "*"}:
        return "gzip"

    return "deflate" if "deflate" in accepted else "identity"


def encode(body: bytes, encoding: str, *, raw_deflate: bool = False) -> bytes:
    """Compress `body` for a Content-Encoding (gzip with mtime 0, so repeatable)."""
    if encoding == "gzip":
        return gzip.compress(body, compresslevel=LEVEL, mtime=0)

    if encoding == "deflate" and raw_deflate:
        compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
        return compressor.compress(body) + compressor.flush()

    if encoding == "deflate":
        return zlib.compress(body, LEVEL)

    return body


def estimate_compressed(body: bytes) -> int:
    """Estimate the gzip size of `body` by compressing at most its first MiB."""
    sample = body[:SAMPLE_BYTES]
    if not sample:
        return 0

    ratio = len(encode(sample, "gzip")) / len(sample)
    return round(len(body) * ratio)


def mid_row(body: bytes) -> int:
    """A cut position near the middle of `body` that is not at the start of a line."""
    position = len(body) // 2
    while 0 < position < len(body) - 1 and body[position - 1] in b"\r\n":
        position += 1

    return position


def reset(request: web.BaseRequest) -> None:
    """Drop the connection at once with a TCP reset, before any answer."""
    transport = request.transport
    if transport is None:
        return

    sock = transport.get_extra_info("socket")
    if sock is not None:
        linger = struct.pack("ii", 1, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)

    transport.abort()


async def deliver(
    request: web.BaseRequest, response: web.StreamResponse, delivery: Delivery
) -> web.StreamResponse:
    """Frame and send `delivery`; a cut one ends by closing the connection."""
    if delivery.chunked:
        response.enable_chunked_encoding()
    else:
        response.content_length = len(delivery.wire)

    await response.prepare(request)
    end = len(delivery.wire) if delivery.cut_at is None else delivery.cut_at
    await _send(response, memoryview(delivery.wire)[:end], delivery.bandwidth)
    if delivery.cut_at is None:
        await response.write_eof()
        return response

    if delivery.stall_seconds:
        logger.debug("stalling a download for %.1f s", delivery.stall_seconds)
        await asyncio.sleep(delivery.stall_seconds)

    if request.transport is not None:
        request.transport.close()

    return response


async def _send(
    response: web.StreamResponse, data: memoryview, bandwidth: int | None
) -> None:
    size = CHUNK_BYTES
    if bandwidth:
        size = min(CHUNK_BYTES, max(MIN_PACED_CHUNK, bandwidth // 8))

    for offset in range(0, len(data), size):
        chunk = data[offset : offset + size]
        await response.write(chunk)
        if bandwidth:
            await asyncio.sleep(len(chunk) / bandwidth)
