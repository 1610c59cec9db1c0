"""Text a server sent, made safe to log, report and keep in the manifest.

An error body may echo the request: the client secret, the bearer token, the contact
keys (personal data). Each is replaced in every form a server could write it in
(as sent, JSON-escaped, URL-encoded), before the text is shortened, and control
characters are replaced so that the text cannot forge log lines or drive a terminal.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from urllib.parse import quote, quote_plus

SERVER_TEXT_CHARS = 300
_BEARER = re.compile(r"(?i)\bbearer\s+[^\s\"',;}\]]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def server_text(
    text: str,
    hidden: Mapping[str, Iterable[str]] | None = None,
    *,
    limit: int = SERVER_TEXT_CHARS,
) -> str:
    """``text`` with every value of ``hidden`` replaced by its label (for example
    ``{"<contact key>": keys}``), any bearer token hidden, control characters turned
    into spaces, and at most ``limit`` characters kept."""
    for label, values in (hidden or {}).items():
        for value in values:
            for form in _forms(value):
                text = text.replace(form, label)

    text = _BEARER.sub("Bearer <token>", text)
    text = _CONTROL.sub(" ", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _forms(value: str) -> list[str]:
    """The ways a server may echo ``value``; longest first, and never empty."""
    forms = {
        value,
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        quote(value, safe=""),
        quote_plus(value),
    }
    return sorted((form for form in forms if form), key=len, reverse=True)


__all__ = ["SERVER_TEXT_CHARS", "server_text"]
