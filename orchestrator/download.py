"""Download one window into a part file, translating every transport fault.

This is the one place where aiohttp's and zlib's exceptions become the errors of
``orchestrator.errors``: retryable (throttling, 5xx, network, a body cut short) or
permanent (other 4xx, a body that is not what it claims).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import logging
import math
import re
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from orchestrator import sfmc
from orchestrator.auth import TokenSource, untrusted
from orchestrator.config import ExportRequest
from orchestrator.errors import (
    CutShortError,
    PermanentError,
    RetryableError,
    ThrottledError,
    TooLargeError,
    WindowError,
)
from orchestrator.parts import PartInfo, PartWriter, keep_window_rows
from orchestrator.planner import Window
from orchestrator.redaction import SERVER_TEXT_CHARS, server_text
from orchestrator.session import read_json
from orchestrator.timeparse import to_millis

logger = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024
MAX_ERROR_BODY = 64 * 1024
MAX_RETRY_AFTER = 3600.0
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
# How a refusal for size may read; SFMC's real wording is not documented.
_TOO_LARGE = re.compile(r"too large|file size|exceeds|size limit|\b1 ?GB\b", re.I)


class BodyDecoder:
    """Undo the body's Content-Encoding: gzip, deflate (zlib or raw) or identity."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding.strip().lower() or "identity"
        if self.encoding not in ("identity", "gzip", "x-gzip", "deflate"):
            raise PermanentError(f"the body has an unsupported encoding {encoding!r}")

        self._inflater: Any = None
        self._first = b""

    def decode(self, data: bytes) -> bytes:
        if self.encoding == "identity" or not data:
            return data

        if self._inflater is None:
            self._first += data
            if len(self._first) < 2:
                return b""  # two bytes tell zlib-wrapped deflate from raw

            data, self._first = self._first, b""
            self._inflater = zlib.decompressobj(self._wbits(data))

        try:
            out = self._inflater.decompress(data)
            while self._inflater.eof and self._inflater.unused_data:
                rest = self._inflater.unused_data
                self._inflater = zlib.decompressobj(self._wbits(rest))
                out += self._inflater.decompress(rest)
        except zlib.error as error:
            raise PermanentError(
                f"the body claims {self.encoding} encoding but is not {self.encoding} "
                f"data ({error})"
            ) from None

        return bytes(out)

    def finish(self) -> None:
        """Raise if a compressed body stopped before its compressed stream ended."""
        if self._first:
            raise RetryableError(f"the {self.encoding} stream ended early")

        if self._inflater is not None and not self._inflater.eof:
            raise RetryableError(f"the {self.encoding} stream ended early")

    def _wbits(self, first: bytes) -> int:
        if self.encoding != "deflate":
            return 16 + zlib.MAX_WBITS

        zlib_wrapped = (
            len(first) >= 2
            and first[0] & 0x0F == 8
            and ((first[0] << 8) | first[1]) % 31 == 0
        )
        return zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS


@dataclass(frozen=True, slots=True)
class Estimate:
    """The estimate endpoint's answer; sizes in bytes, None where not given."""

    rows: int | None
    bytes: int | None
    compressed_bytes: int | None

    def size(self, *, compressed: bool) -> int:
        """The size to compare with the safety cap: compressed if asked for."""
        if compressed and self.compressed_bytes is not None:
            return self.compressed_bytes

        return self.bytes if self.bytes is not None else self.compressed_bytes or 0


class JourneyHistoryClient:
    """The download, estimate and freshness calls, authorised by a shared token."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        tokens: TokenSource,
        request: ExportRequest,
        *,
        compression: str = "gzip",
        cap_bytes: int = sfmc.DOWNLOAD_CAP_BYTES,
    ) -> None:
        self._session = session
        self._tokens = tokens
        self._request = request
        self._compression = compression
        self._cap_bytes = cap_bytes
        # Windows whose last body came whole in its framing but not in its
        # compressed stream, with the bytes it held.
        self._cut_streams: dict[Window, int] = {}

    async def download(self, window: Window, path: Path) -> PartInfo:
        """Stream ``window`` into ``path`` (a temporary name); raise a WindowError."""
        with self._translated(window):
            return await self._download(window, path)

        raise AssertionError("unreachable: _translated reraises")

    @contextmanager
    def _translated(self, window: Window | None = None) -> Iterator[None]:
        """Turn aiohttp's exceptions into WindowErrors, their text made safe to keep
        (no contact key, secret or token; no control character)."""
        try:
            yield
        except aiohttp.ClientConnectorCertificateError as error:
            raise untrusted(str(error.host), error) from None
        except (WindowError, aiohttp.ClientError, TimeoutError) as error:
            translated = error if isinstance(error, WindowError) else _translate(error)
            translated.window = translated.window or (window.key if window else None)
            translated.message = self._safe(
                translated.message, limit=4 * SERVER_TEXT_CHARS
            )
            translated.args = (translated.message,)
            if translated is error:
                raise

            raise translated from None

    async def _download(self, window: Window, path: Path) -> PartInfo:
        headers = {"x-direct-pipe": "true", "Accept-Encoding": self._accept_encoding()}
        async with self._call(
            "POST", sfmc.DOWNLOAD_PATH, window=window, headers=headers
        ) as response:
            if response.status == 204:
                return _empty_part(path)

            await _raise_for_status(
                response, self._safe, keys=len(self._request.contact_keys)
            )
            info, boundary_seen = await self._stream(window, response, path)

        if boundary_seen:
            info = self._keep_window_rows(window, path, info)

        if info.unended:
            logger.warning(
                "window %s: the body does not end with a newline, as one cut inside "
                "its last field would not; if the server cuts bodies below "
                "--safety-cap-mb, lower it to the server's limit and redo the window",
                window,
            )

        return info

    async def _stream(
        self, window: Window, response: aiohttp.ClientResponse, path: Path
    ) -> tuple[PartInfo, bool]:
        decoder = BodyDecoder(response.headers.get("Content-Encoding", ""))
        writer = PartWriter(
            path,
            columns=self._request.columns,
            delimiter=self._request.delimiter,
            boundary=self._boundary(window),
        )
        received = 0
        try:
            async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                received += len(chunk)
                if received >= self._cap_bytes:
                    raise TooLargeError(
                        f"the body reached the {self._cap_bytes:,}-byte safety cap "
                        "(--safety-cap-mb)"
                    )

                if writer.take(decoder.decode(chunk)):
                    # Writing and hashing free the GIL: other windows read meanwhile.
                    await anyio.to_thread.run_sync(writer.store)

            self._finish_stream(window, decoder, received)
            info = await anyio.to_thread.run_sync(writer.finish)
            return info, writer.boundary_seen
        except BaseException:
            writer.discard()
            raise

    def _finish_stream(
        self, window: Window, decoder: BodyDecoder, received: int
    ) -> None:
        """Check that a compressed stream ended; the same stream cut at the same size
        twice, its framing whole, was cut by the server (a size limit): split."""
        try:
            decoder.finish()
        except RetryableError:
            if self._cut_streams.get(window) != received:
                self._cut_streams[window] = received
                raise

            raise CutShortError(
                f"the server cut the {decoder.encoding} stream at the same "
                f"{received:,} bytes twice, as a size limit below --safety-cap-mb "
                f"({self._cap_bytes:,} bytes) would (if it is one, lower the cap to "
                "it)"
            ) from None

    def _safe(self, text: str, *, limit: int = SERVER_TEXT_CHARS) -> str:
        """Text from the server without contact keys (personal data), the secret or
        a token in it, nor control characters; at most ``limit`` characters."""
        hidden = {"<contact key>": self._request.contact_keys, **self._tokens.hidden()}
        return server_text(text, hidden, limit=limit)

    def _boundary(self, window: Window) -> bytes | None:
        if sfmc.TIME_COLUMN not in self._request.columns:
            return None

        return _api_time(window.end)[:19].encode()

    def _keep_window_rows(self, window: Window, path: Path, info: PartInfo) -> PartInfo:
        kept = keep_window_rows(
            path,
            start=window.start,
            end=window.end,
            time_index=self._request.columns.index(sfmc.TIME_COLUMN),
            delimiter=self._request.delimiter,
            newline=info.newline,
        )
        dropped = info.rows - kept.rows
        if dropped:
            logger.debug(
                "window %s: dropped %d rows of the next window", window, dropped
            )

        return dataclasses.replace(
            info, rows=kept.rows, bytes=kept.bytes, sha256=kept.sha256, written=None
        )

    async def estimate(self, window: Window) -> Estimate | None:
        """Ask for the window's estimated rows and sizes; None if unreadable."""
        with self._translated(window):
            async with self._call(
                "POST", sfmc.ESTIMATE_PATH, window=window
            ) as response:
                await _raise_for_status(response, self._safe)
                answer = await read_json(response)

        return _parse_estimate(answer)

    async def freshness(self) -> float | None:
        """The history lag in seconds, or None when the answer cannot be read or
        says a lag below 0 or beyond the retention."""
        with self._translated():
            async with self._call("GET", sfmc.FRESHNESS_PATH) as response:
                await _raise_for_status(response, self._safe)
                answer = await read_json(response)

        lag = _first_number(answer, _LAG_KEYS)
        return lag if lag is not None and 0 <= lag <= sfmc.MAX_LAG_SECONDS else None

    def _accept_encoding(self) -> str:
        return "identity" if self._compression == "none" else self._compression

    @asynccontextmanager
    async def _call(
        self,
        method: str,
        path: str,
        *,
        window: Window | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send an authorised request; on 401 renew the token once and send again.

        A second 401 is retryable: another worker's token may have been revoked in
        between. The next attempt starts with a new token.
        """
        for attempt in (1, 2):
            token = await self._tokens.get()
            response = await self._session.request(
                method,
                token.rest_url + path,
                allow_redirects=False,
                params=self._query() if window else None,
                json=self._body(window) if window else None,
                headers={**(headers or {}), "Authorization": f"Bearer {token.value}"},
            )
            try:
                if response.status == 401:
                    logger.info("token refused (401); renewing it")
                    await self._tokens.invalidate(token)
                    if attempt == 1:
                        continue

                    raise RetryableError(
                        "401 Not Authorized twice, with a new token; if every window "
                        "fails so, give the installed package read access to Journeys",
                        status=401,
                    )

                yield response
                return
            finally:
                response.release()

    def _query(self) -> dict[str, str]:
        return {
            "format": self._request.format,
            "columns": ",".join(self._request.columns),
        }

    def _body(self, window: Window) -> dict[str, Any]:
        return {
            "start": _api_time(window.start),
            "end": _api_time(window.end),
            **self._request.body_filters(),
        }


_LAG_KEYS = (
    "lagSeconds",
    "historyLagSeconds",
    "lag",
    "freshnessInSeconds",
    "freshness",
    "seconds",
)
_ROW_KEYS = ("rowCount", "totalRows", "rows", "estimatedRowCount", "count")
_SIZE_KEYS = ("estimatedSizeBytes", "fileSize", "sizeInBytes", "size", "bytes")
_COMPRESSED_KEYS = (
    "estimatedCompressedSizeBytes",
    "compressedFileSize",
    "compressedSizeInBytes",
    "compressedSize",
)


def _parse_estimate(answer: Mapping[str, Any]) -> Estimate | None:
    estimate = Estimate(
        rows=_as_int(_first_number(answer, _ROW_KEYS)),
        bytes=_as_int(_first_number(answer, _SIZE_KEYS)),
        compressed_bytes=_as_int(_first_number(answer, _COMPRESSED_KEYS)),
    )
    if estimate.bytes is None and estimate.compressed_bytes is None:
        return None

    return estimate


def _first_number(answer: Mapping[str, Any], keys: tuple[str, ...]) -> float | None:
    """The first of ``keys`` whose value is a finite number of at least 0 (or one
    written as text in ASCII digits); None if there is none."""
    for key in keys:
        value = answer.get(key)
        if isinstance(value, str):  # ASCII digits only: not "²", not "1e400"
            plain = value.isascii() and value.replace(".", "", 1).isdigit()
            value = value if plain else None

        if isinstance(value, bool) or not isinstance(value, int | float | str):
            continue

        try:
            number = float(value)
        except OverflowError:  # an integer of hundreds of digits
            continue

        if 0 <= number < math.inf:
            return number

    return None


def _as_int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _api_time(moment: dt.datetime) -> str:
    return sfmc.format_time(to_millis(moment))


def _empty_part(path: Path) -> PartInfo:
    writer = PartWriter(path, columns=None, delimiter=",")
    return writer.finish()


async def _raise_for_status(
    response: aiohttp.ClientResponse,
    safe: Callable[[str], str],
    *,
    keys: int = 0,
) -> None:
    """Raise the error an unsuccessful answer stands for, its text made ``safe``. A
    413 to a request that carries ``keys`` contact keys is about the request, not
    the window: splitting the window cannot help."""
    status = response.status
    if 200 <= status < 300:
        return

    if 300 <= status < 400:  # asked again: a balancer's redirect may pass
        raise RetryableError(
            f"{status}: the server redirected the request, which is not followed "
            "(the token and contact keys go only where the token answer said)",
            status=status,
        )

    answer = await read_json(response)
    said = str(answer.get("message") or response.reason or "no message")
    message = safe(said)
    errorcode = answer.get("errorcode")
    code = errorcode if isinstance(errorcode, int) else None
    described = f"{status} {message}" + (f" (errorcode {code})" if code else "")
    if status in (429, 503):
        delay = retry_after(response.headers, answer)
        raise ThrottledError(
            described, retry_after=delay, status=status, errorcode=code
        )

    if status in RETRYABLE_STATUSES:
        raise RetryableError(described, status=status, errorcode=code)

    if status == 413 and keys:
        raise PermanentError(
            f"{described}: the request itself is too large for the server "
            f"({keys:,} contact keys in each); split the contact keys file and "
            "export each part to a file of its own",
            status=status,
            errorcode=code,
        )

    if status == 413 or (status == 400 and _TOO_LARGE.search(said)):
        raise TooLargeError(described, status=status, errorcode=code)

    raise PermanentError(described, status=status, errorcode=code)


def _translate(error: aiohttp.ClientError | TimeoutError) -> WindowError:
    """The WindowError an exception of aiohttp (or a timeout) stands for."""
    if isinstance(error, aiohttp.ClientPayloadError):
        return RetryableError(f"the body was cut short ({error})")

    if isinstance(error, aiohttp.ClientConnectionError | aiohttp.ClientOSError):
        return RetryableError(f"connection failed: {_describe(error)}")

    if isinstance(error, TimeoutError):
        return RetryableError("timed out waiting for the server")

    if isinstance(error, aiohttp.ClientResponseError):  # shortened once cleaned
        return RetryableError(
            f"the answer's header is malformed or too large ({error.message})"
        )

    return RetryableError(f"HTTP error: {_describe(error)}")


def retry_after(headers: Mapping[str, str], answer: Mapping[str, Any]) -> float:
    """Seconds the server asked us to wait (header, then body); 0 if unsaid."""
    for value in (headers.get("Retry-After"), answer.get("retryAfter")):
        seconds = _seconds(value)
        if seconds is not None:
            return min(max(seconds, 0.0), MAX_RETRY_AFTER)

    return 0.0


def _seconds(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)

    if not isinstance(value, str) or not value.strip():
        return None

    try:
        return float(value)
    except ValueError:
        pass

    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None

    return moment.timestamp() - time.time()


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]
