"""OAuth for the sandbox: checking a client credentials grant, keeping the tokens."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GrantError:
    """Why a token request is refused, in the OAuth error shape."""

    status: int
    error: str
    description: str

    def document(self) -> dict[str, str]:
        """The JSON body: error and error_description."""
        return {"error": self.error, "error_description": self.description}


def check_grant(
    body: Mapping[str, object] | None, *, client_id: str, client_secret: str
) -> GrantError | None:
    """Check a token request body; None when it earns a token."""
    if body is None:
        return GrantError(400, "invalid_request", "The body must be a JSON object.")

    if body.get("grant_type") != "client_credentials":
        text = "Use grant_type client_credentials."
        return GrantError(400, "unsupported_grant_type", text)

    account = body.get("account_id")
    if account is not None and not str(account).isdigit():
        text = "account_id must be the business unit's MID, a number."
        return GrantError(400, "invalid_request", text)

    same_id = secrets.compare_digest(str(body.get("client_id", "")), client_id)
    same_secret = secrets.compare_digest(
        str(body.get("client_secret", "")), client_secret
    )
    if not (same_id and same_secret):
        return GrantError(401, "invalid_client", "Client authentication failed.")

    return None


class TokenStore:
    """Opaque bearer tokens and when they expire, by a monotonic clock in seconds."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._expiries: dict[str, float] = {}
        self.issued: list[str] = []

    def issue(self, lifetime_seconds: float) -> str:
        """A new random token, valid for `lifetime_seconds`."""
        now = self._clock()
        self._expiries = {key: end for key, end in self._expiries.items() if end > now}
        token = secrets.token_urlsafe(32)
        self._expiries[token] = now + lifetime_seconds
        self.issued.append(token)
        return token

    def bearer(self, authorization: str) -> str | None:
        """The token of an `Authorization: Bearer` value if valid and unexpired."""
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or token not in self._expiries:
            return None

        return token if self._clock() < self._expiries[token] else None

    def revoke(self, token: str) -> None:
        """Invalidate one token."""
        self._expiries.pop(token, None)

    def revoke_all(self) -> None:
        """Invalidate every token."""
        self._expiries.clear()
