"""Text a server sent, made safe to log, report and keep in the manifest.

An error body may echo the request: the client secret, the bearer token, the contact
keys (personal data). Each is replaced in every form a server could write it in
(as sent, JSON-escaped, URL-encoded), before the text is shortened, and control
characters are replaced so that the text cannot forge log lines or drive a terminal.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote, quote_plus

SERVER_TEXT_CHARS = 300
# Shorter values are left as they are: replacing every "a" or "42" would garble
# every message (and its labels) and hide next to nothing.
MIN_HIDDEN_CHARS = 3
_BEARER = re.compile(r"(?i)\bbearer\s+[^\s\"',;}\]]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_HEX_ESCAPE = re.compile(r"(?<=\\u)[0-9a-f]{4}")
_PERCENT = re.compile(r"%[0-9A-F]{2}")


def server_text(
    text: str,
    hidden: Mapping[str, Iterable[str]] | None = None,
    *,
    limit: int = SERVER_TEXT_CHARS,
) -> str:
    """``text`` with every value of ``hidden`` replaced by its label (for example
    ``{"<contact key>": keys}``), any bearer token hidden, control characters turned
    into spaces, and at most ``limit`` characters kept."""
    tables = [_table(label, tuple(values)) for label, values in (hidden or {}).items()]
    longest = max((table.longest for table in tables), default=0)
    text = _CONTROL.sub(" ", text[: limit + longest])  # what is kept, and a value
    text = _hide(text, tables)  # cut at the limit whole
    text = _BEARER.sub("Bearer <token>", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True, slots=True)
class _Table:
    """The forms of the values to hide, by length, each to its label."""

    by_length: dict[int, dict[str, str]]
    longest: int


@functools.lru_cache(maxsize=16)
def _table(label: str, values: tuple[str, ...]) -> _Table:
    """Kept: a run cleans many texts with the same contact keys."""
    by_length: dict[int, dict[str, str]] = {}
    for value in values:
        if len(value) >= MIN_HIDDEN_CHARS:
            for form in _forms(value):
                by_length.setdefault(len(form), {})[form] = label

    return _Table(by_length, max(by_length, default=0))


def _hide(text: str, tables: list[_Table]) -> str:
    """Replace, from the left, the longest form found at each place (so a key inside
    a longer one is never half hidden); a label is never looked into again."""
    by_length: dict[int, dict[str, str]] = {}
    for table in tables:
        for length, forms in table.by_length.items():
            by_length.setdefault(length, {}).update(forms)

    lengths = sorted(by_length, reverse=True)
    kept, done, place = [], 0, 0
    while place < len(text):
        for length in lengths:
            label = by_length[length].get(text[place : place + length])
            if label is not None:
                kept += [text[done:place], label]
                place = done = place + length
                break
        else:
            place += 1

    return "".join([*kept, text[done:]])


def _forms(value: str) -> set[str]:
    """The ways a server (or a library quoting its bytes) may echo ``value``."""
    quoted = quote(value, safe="")
    escaped = json.dumps(value)[1:-1]
    return {
        value,
        escaped,
        _HEX_ESCAPE.sub(lambda match: match.group().upper(), escaped),  # \u00EB
        json.dumps(value, ensure_ascii=False)[1:-1],
        quoted,
        _PERCENT.sub(lambda match: match.group().lower(), quoted),  # %c3%ab
        quote_plus(value),
        str(value.encode())[2:-1],  # as Python shows bytes: zo\xc3\xab
    }


__all__ = ["MIN_HIDDEN_CHARS", "SERVER_TEXT_CHARS", "server_text"]
