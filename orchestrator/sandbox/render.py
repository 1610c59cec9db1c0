"""Rendering rows as the download file: CSV or TSV, minimal quoting, UTF-8."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence

from orchestrator import sfmc
from orchestrator.sandbox.drawing import Row

Search = Callable[[str], re.Match[str] | None]

BOM = b"\xef\xbb\xbf"
DELIMITERS = {"csv": ",", "tsv": "\t"}
COLUMN_INDEX = {name: index for index, name in enumerate(sfmc.COLUMNS)}
BREAKS_OR_QUOTES = re.compile('["\r\n]').search


def render(
    rows: Sequence[Row],
    columns: Sequence[str],
    fmt: str,
    *,
    newline: str = "\n",
    bom: bool = False,
    header: bool = True,
) -> bytes:
    """Render rows as the download file: minimal quoting, `"` doubled, UTF-8.

    Raises ValueError for an unknown column or format.
    """
    parts = [BOM] if bom else []
    if header:
        parts.append(render_header(columns, fmt, newline=newline))

    parts.extend(encode_rows(rows, columns, fmt, newline=newline))
    return b"".join(parts)


def render_header(columns: Sequence[str], fmt: str, *, newline: str = "\n") -> bytes:
    """The header line: the requested column names in the requested order."""
    column_indexes(columns)
    delimiter = _delimiter(fmt)
    return (_line(columns, delimiter, _quoting(delimiter)) + newline).encode()


def encode_rows(
    rows: Sequence[Row], columns: Sequence[str], fmt: str, *, newline: str = "\n"
) -> list[bytes]:
    """Each row rendered as one UTF-8 line, in order.

    A field is quoted when it holds the delimiter, a quote, CR or LF; a lone empty
    field is written `""` so that the line is not blank. This is what the csv
    module writes with QUOTE_MINIMAL, at about twice its speed.
    """
    pick = _picker(column_indexes(columns))
    delimiter = _delimiter(fmt)
    special = _quoting(delimiter)
    return [(_line(pick(row), delimiter, special) + newline).encode() for row in rows]


def column_indexes(columns: Sequence[str]) -> list[int]:
    """Positions of the named columns in a row. Raises ValueError for unknown names."""
    unknown = [name for name in columns if name not in COLUMN_INDEX]
    if unknown or not columns:
        raise ValueError(f"unknown column {unknown[0] if unknown else ''!r}")

    return [COLUMN_INDEX[name] for name in columns]


def _line(fields: Sequence[str], delimiter: str, special: Search) -> str:
    line = delimiter.join(fields)
    if line.count(delimiter) != len(fields) - 1 or BREAKS_OR_QUOTES(line):
        return delimiter.join([_quote(f) if special(f) else f for f in fields])

    return line or '""'


def _quoting(delimiter: str) -> Search:
    return re.compile(f'[{re.escape(delimiter)}"\r\n]').search


def _quote(field: str) -> str:
    return '"' + field.replace('"', '""') + '"'


def _delimiter(fmt: str) -> str:
    if fmt not in DELIMITERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of csv, tsv")

    return DELIMITERS[fmt]


def _picker(indexes: list[int]) -> Callable[[Row], Sequence[str]]:
    if len(indexes) == 1:
        only = indexes[0]
        return lambda row: (row[only],)

    return operator.itemgetter(*indexes)
