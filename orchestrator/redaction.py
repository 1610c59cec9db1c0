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
    text = _BEARER.sub("Bearer <token>", text)
    groups = tuple((label, tuple(values)) for label, values in (hidden or {}).items())
    shown = _index(groups).hide(text, limit)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


@functools.lru_cache(maxsize=16)
def _index(groups: tuple[tuple[str, tuple[str, ...]], ...]) -> _Index:
    """The forms of the values to hide, to their labels; kept, since a run cleans
    many texts with the same contact keys."""
    forms = {
        form: label
        for label, values in groups
        for value in values
        if len(value) >= MIN_HIDDEN_CHARS
        for form in _forms(value)
    }
    lengths: dict[str, set[int]] = {}
    for form in forms:
        lengths.setdefault(form[:MIN_HIDDEN_CHARS], set()).add(len(form))

    ordered = {head: sorted(found, reverse=True) for head, found in lengths.items()}
    return _Index(forms, ordered)


@dataclass(frozen=True, slots=True)
class _Index:
    """The forms to hide, found by their first characters: each place of a text is
    looked up once, and only the lengths of forms that start so are tried."""

    forms: dict[str, str]
    lengths: dict[str, list[int]]  # by the first MIN_HIDDEN_CHARS characters

    def hide(self, text: str, limit: int) -> str:
        """``text`` up to about ``limit`` characters shown, every place covered by a
        form (overlapping ones too) given its label; the rest with control
        characters made spaces. Forms are matched in the whole text, never cut."""
        shown: list[str] = []
        size = done = 0
        run: tuple[int, str] | None = None  # end and label of the forms covering
        for place in range(len(text) + 1):
            if run is not None and place >= run[0]:
                shown.append(run[1])
                size, done, run = size + len(run[1]), run[0], None

            if run is None and size + place - done > limit:
                break

            found = self._longest_at(text, place)
            if found is None:
                continue

            end, label = place + found, self.forms[text[place : place + found]]
            if run is None:
                shown.append(_CONTROL.sub(" ", text[done:place]))
                size, run = size + place - done, (end, label)
            else:
                run = (max(run[0], end), run[1])

        if run is None:
            shown.append(_CONTROL.sub(" ", text[done : done + limit + 1]))

        return "".join(shown)

    def _longest_at(self, text: str, place: int) -> int | None:
        """The length of the longest form at ``place``, if one is there."""
        left = len(text) - place
        for length in self.lengths.get(text[place : place + MIN_HIDDEN_CHARS], ()):
            if length <= left and text[place : place + length] in self.forms:
                return length

        return None


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
