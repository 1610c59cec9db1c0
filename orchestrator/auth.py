"""Client-credentials tokens: one token for every worker, refreshed one at a time.

The token and the client secret are never logged, never put in an error message.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import anyio
import tenacity

from orchestrator import sfmc
from orchestrator.credentials import Credentials
from orchestrator.errors import (
    CredentialsError,
    RetryableError,
    TokenUnavailableError,
    UsageError,
)
from orchestrator.redaction import server_text
from orchestrator.session import read_json

logger = logging.getLogger(__name__)

REFRESH_MARGIN_SECONDS = 60.0
TOKEN_ATTEMPTS = 5
SFMC_DOMAIN = "marketingcloudapis.com"


@dataclass(frozen=True, slots=True)
class Token:
    """An access token, the REST base URL it is for, and when to stop using it."""

    value: str
    rest_url: str
    renew_at: float

    def __repr__(self) -> str:
        return f"Token(rest_url={self.rest_url!r}, renew_at={self.renew_at:.0f})"


class TokenSource:
    """Hand out a valid token; ask the auth endpoint for a new one only when needed."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        credentials: Credentials,
        *,
        allowed_domains: tuple[str, ...] = (SFMC_DOMAIN,),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_auth_url(credentials.auth_url, allowed_domains)
        self._session = session
        self._credentials = credentials
        self._allowed_domains = allowed_domains
        self._clock = clock
        self._lock = anyio.Lock()
        self._token: Token | None = None
        self._issued: list[str] = []  # every token value, kept out of error text
        self.requests = 0

    def hidden(self) -> dict[str, list[str]]:
        """What must never appear in text this run keeps: the client secret and
        every token handed out, by the label that replaces them."""
        return {
            "<client secret>": [self._credentials.client_secret],
            "<token>": list(self._issued),
        }

    async def get(self) -> Token:
        """A token that is not about to expire; waits while another task renews it."""
        async with self._lock:
            if self._token is None or self._clock() >= self._token.renew_at:
                self._token = await self._request_token()

            return self._token

    async def invalidate(self, stale: Token) -> None:
        """Forget ``stale`` after the server refused it, unless already renewed."""
        async with self._lock:
            if self._token is stale:
                self._token = None

    async def _request_token(self) -> Token:
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(RetryableError),
            wait=tenacity.wait_random_exponential(multiplier=0.5, max=10),
            stop=tenacity.stop_after_attempt(TOKEN_ATTEMPTS),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._post_token()
        except RetryableError as error:
            raise TokenUnavailableError(
                f"no token after {TOKEN_ATTEMPTS} attempts ({error}); nothing more "
                "can be requested: state is kept, rerun when the endpoint answers"
            ) from None

        raise AssertionError("unreachable: tenacity reraises the last error")

    async def _post_token(self) -> Token:
        self.requests += 1
        url = f"{self._credentials.auth_url}/{sfmc.TOKEN_PATH}"
        try:
            async with self._session.post(
                url, json=self._token_body(), allow_redirects=False
            ) as response:
                answer = await read_json(response)
                status = response.status
        except aiohttp.ClientConnectorCertificateError as error:
            raise untrusted(str(urlsplit(url).hostname), error) from None
        except (aiohttp.ClientError, TimeoutError) as error:
            logger.warning("token request failed (%s); retrying", type(error).__name__)
            said = server_text(str(error), self.hidden())  # may quote the answer
            raise RetryableError(f"token endpoint unreachable: {said}") from None

        return self._token_from_answer(status, answer)

    def _token_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "grant_type": "client_credentials",
            "client_id": self._credentials.client_id,
            "client_secret": self._credentials.client_secret,
        }
        if self._credentials.account_id:
            account = self._credentials.account_id
            body["account_id"] = int(account) if account.isdigit() else account

        return body

    def _token_from_answer(self, status: int, answer: dict[str, Any]) -> Token:
        if status >= 500 or status == 429:
            logger.warning("token endpoint answered %d; retrying", status)
            raise RetryableError(f"token endpoint answered {status}")

        if status == 404:
            raise UsageError(
                f"no token endpoint at {self._credentials.auth_url}/{sfmc.TOKEN_PATH} "
                "(404); SFMC_AUTH_URL is the auth base URL, e.g. "
                f"https://<subdomain>.auth.{SFMC_DOMAIN}"
            )

        if 300 <= status < 400:
            raise UsageError(
                f"the token endpoint at {self._credentials.auth_url} redirected the "
                f"request ({status}), which is not followed (it carries the secret); "
                "give SFMC_AUTH_URL as the auth base URL itself"
            )

        if status != 200:
            reason = answer.get("error_description") or answer.get("error") or status
            shown = server_text(str(reason), self.hidden())
            raise CredentialsError(
                f"credentials rejected by the token endpoint ({status}: {shown}); "
                "check SFMC_CLIENT_ID, SFMC_CLIENT_SECRET and SFMC_ACCOUNT_ID"
            )

        try:
            value = str(answer["access_token"])
            rest_url = str(answer["rest_instance_url"])
            lifetime = float(answer.get("expires_in", 1080))
        except (KeyError, TypeError, ValueError):
            raise RetryableError("token answer lacks access_token or URL") from None

        try:
            check_rest_url(rest_url, self._allowed_domains)
        except UsageError as error:  # it names the URL the server sent
            raise UsageError(
                server_text(str(error), self.hidden(), limit=600)
            ) from None

        self._issued.append(value)
        margin = min(REFRESH_MARGIN_SECONDS, lifetime / 4)
        logger.debug("new token, valid %.0f s", lifetime)
        return Token(
            value, rest_url.rstrip("/") + "/", self._clock() + lifetime - margin
        )


def untrusted(host: str, error: aiohttp.ClientConnectorCertificateError) -> UsageError:
    """The error for a server whose TLS certificate does not verify."""
    reason = getattr(error.certificate_error, "verify_message", None) or "not trusted"
    return UsageError(
        f"the TLS certificate of {host} does not verify ({reason}); "
        "if your network inspects TLS, give its CA with --ca-bundle FILE or "
        "SSL_CERT_FILE"
    )


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` names this machine (localhost or a loopback address)."""
    if host is None:
        return False

    if host == "localhost":
        return True

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_auth_url(url: str, allowed_domains: tuple[str, ...] = (SFMC_DOMAIN,)) -> None:
    """Refuse an auth URL that sends the secret in clear, or off Marketing Cloud."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if _bad_port(url):
        raise UsageError(
            f"SFMC_AUTH_URL {url!r} has no valid port (1 to 65535): fix the URL"
        )

    if parts.scheme in ("http", "https") and is_loopback(host):
        return

    if parts.scheme == "https" and _on_domains(host, allowed_domains):
        return

    raise UsageError(
        f"SFMC_AUTH_URL {url!r} is refused: use https://<subdomain>.auth."
        f"{SFMC_DOMAIN} (plain http only to a loopback address such as the sandbox; "
        "--allow-domain adds a domain)"
    )


def _bad_port(url: str) -> bool:
    try:
        port = urlsplit(url).port
    except ValueError:  # not a number, or out of range
        return True

    return port == 0


def _on_domains(host: str, domains: tuple[str, ...]) -> bool:
    """Whether ``host`` is a well-formed name on one of ``domains``."""
    if not _HOST_NAME.fullmatch(host):
        return False

    return any(host == d or host.endswith("." + d) for d in domains)


# Letters, digits and hyphens, in labels joined by dots (as urlsplit lowercases it).
_HOST_NAME = re.compile(r"[a-z0-9-]+(\.[a-z0-9-]+)*")


def check_rest_url(url: str, allowed_domains: tuple[str, ...]) -> None:
    """Refuse a REST base URL that would carry the token off Marketing Cloud."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if _bad_port(url):
        raise UsageError(
            f"the token endpoint sent rest_instance_url {url!r}, whose port is not "
            "1 to 65535; check SFMC_AUTH_URL and the installed package"
        )

    if parts.scheme in ("http", "https") and is_loopback(host):
        return

    if parts.scheme == "https" and _on_domains(host, allowed_domains):
        return

    raise UsageError(
        f"the token endpoint sent rest_instance_url {url!r}, which is not HTTPS on "
        f"{', '.join(allowed_domains)}; refusing to send the token there "
        "(--allow-domain widens the list)"
    )
