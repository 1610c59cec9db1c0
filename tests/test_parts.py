from __future__ import annotations

import datetime as dt
import hashlib
import stat
from pathlib import Path

import pytest

from orchestrator.errors import PermanentError, TooLargeError
from orchestrator.parts import (
    PartInfo,
    PartWriter,
    RowCounter,
    iter_rows,
    keep_window_rows,
    verify_part,
)

COLUMNS = ["TransactionTime", "ContactKey", "Message"]


def write(path: Path, chunks: list[bytes], **options: object) -> tuple[bytes, int]:
    writer = PartWriter(path, columns=COLUMNS, delimiter=",", **options)  # type: ignore[arg-type]
    for chunk in chunks:
        writer.write(chunk)
    info = writer.finish()
    return path.read_bytes(), info.rows


def test_header_and_bom_are_dropped(tmp_path: Path) -> None:
    body = b"\xef\xbb\xbfTransactionTime,ContactKey,Message\na,b,c\nd,e,f\n"

    data, rows = write(tmp_path / "p", [body])

    assert data == b"a,b,c\nd,e,f\n"
    assert rows == 2


def test_header_split_across_chunks(tmp_path: Path) -> None:
    body = b"TransactionTime,ContactKey,Message\r\na,b,c\r\n"
    chunks = [body[i : i + 3] for i in range(0, len(body), 3)]

    data, rows = write(tmp_path / "p", chunks)

    assert data == b"a,b,c\r\n"
    assert rows == 1


def test_missing_final_newline_is_added_in_the_body_style(tmp_path: Path) -> None:
    data, rows = write(tmp_path / "p", [b"TransactionTime,ContactKey,Message\r\na,b,c"])

    assert data == b"a,b,c\r\n"
    assert rows == 1


def test_a_header_cut_between_cr_and_lf_still_says_crlf(tmp_path: Path) -> None:
    info = write_info(tmp_path / "p", b"TransactionTime,ContactKey,Message\r")

    assert (info.rows, info.bytes, info.newline) == (0, 0, "\r\n")


def test_a_body_cut_between_cr_and_lf_gets_only_its_lf(tmp_path: Path) -> None:
    head = b"TransactionTime,ContactKey,Message\r\n"
    data, rows = write(tmp_path / "p", [head + b"a,b,c\r\nd,e,f\r"])

    assert data == b"a,b,c\r\nd,e,f\r\n"
    assert rows == 2


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"TransactionTime,ContactKey,Message",
        b"TransactionTime,ContactKey,Message\n",
    ],
)
def test_empty_windows_give_an_empty_part(tmp_path: Path, body: bytes) -> None:
    data, rows = write(tmp_path / "p", [body])

    assert (data, rows) == (b"", 0)


def test_quoted_newlines_commas_and_quotes_pass_unchanged(tmp_path: Path) -> None:
    rows_text = b'a,"k,1","say ""hi""\nnext line"\nb,k2,"x\r\ny"\n'

    data, rows = write(tmp_path / "p", [COLUMNS_LINE + rows_text[:9], rows_text[9:]])

    assert data == rows_text
    assert rows == 2


COLUMNS_LINE = b"TransactionTime,ContactKey,Message\n"


def test_wrong_header_is_a_permanent_error(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="not the requested"):
        write(tmp_path / "p", [b"Other,Columns\nx,y\n"])


# Complete framing around a body cut short means the server ended it there (as a
# size limit would): asking again gets the same cut, so the window is split.
def test_body_ending_inside_quotes_is_cut_by_the_server(tmp_path: Path) -> None:
    with pytest.raises(TooLargeError, match="inside a quoted field"):
        write(tmp_path / "p", [COLUMNS_LINE + b'a,b,"unfinished\n'])


@pytest.mark.parametrize(
    "body",
    [b"a,b,c\nd,e", b'a,b,c\nd,"e\nf",g\nh', b"d,e", b'd,"e,\n"'],
)
def test_a_last_row_missing_fields_is_cut_by_the_server(
    tmp_path: Path, body: bytes
) -> None:
    with pytest.raises(TooLargeError, match=r"inside its last row \((1|2) of 3"):
        write(tmp_path / "p", [COLUMNS_LINE + body])


@pytest.mark.parametrize("body", [b"a,b,c\nd,e,f", b'a,b,c\nd,"e\nf",g'])
def test_a_last_row_with_every_field_but_no_newline_is_kept_and_marked(
    tmp_path: Path, body: bytes
) -> None:
    writer = PartWriter(tmp_path / "p", columns=COLUMNS, delimiter=",")
    writer.write(COLUMNS_LINE + body)
    info = writer.finish()

    assert info.rows == 2
    assert info.unended  # the caller warns, naming the window
    assert (tmp_path / "p").read_bytes() == body + b"\n"
    assert not write_info(tmp_path / "q", COLUMNS_LINE + body + b"\n").unended


def write_info(path: Path, body: bytes) -> PartInfo:
    writer = PartWriter(path, columns=COLUMNS, delimiter=",")
    writer.write(body)
    return writer.finish()


def test_part_is_private_and_checksummed(tmp_path: Path) -> None:
    path = tmp_path / "p"
    writer = PartWriter(path, columns=COLUMNS, delimiter=",")
    writer.write(COLUMNS_LINE + b"a,b,c\n")
    info = writer.finish()

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert info.sha256 == hashlib.sha256(b"a,b,c\n").hexdigest()
    assert verify_part(path, size=6, sha256=info.sha256)
    assert not verify_part(path, size=6, sha256="0" * 64)


def test_boundary_is_seen_across_chunks(tmp_path: Path) -> None:
    writer = PartWriter(
        tmp_path / "p", columns=COLUMNS, delimiter=",", boundary=b"2026-11-03T06:00:00"
    )
    writer.write(COLUMNS_LINE + b"2026-11-03T0")
    writer.write(b"6:00:00.000Z,k,m\n")
    writer.finish()

    assert writer.boundary_seen


def test_row_counter_tracks_quotes_between_chunks() -> None:
    counter = RowCounter()
    for chunk in (b'a,"x\n', b'y",b\n', b"c,d\n"):
        counter.feed(chunk)

    assert counter.rows == 2


def test_iter_rows_keeps_quoted_line_breaks(tmp_path: Path) -> None:
    path = tmp_path / "p"
    path.write_bytes(b'1,"a\nb"\n2,c\n')

    assert list(iter_rows(path)) == [b'1,"a\nb"\n', b"2,c\n"]


def test_keep_window_rows_drops_rows_outside_the_window(tmp_path: Path) -> None:
    path = tmp_path / "p"
    path.write_bytes(
        b'2026-11-03T06:00:00.000Z,k1,"m\n1"\n'
        b"2026-11-03T05:59:59.999Z,k2,m2\n"
        b"2026-11-03T05:00:00.000Z,k3,m3\n"
    )
    start = dt.datetime(2026, 11, 3, 5, tzinfo=dt.UTC)

    info = keep_window_rows(
        path,
        start=start,
        end=start + dt.timedelta(hours=1),
        time_index=0,
        delimiter=",",
        newline="\n",
    )

    assert path.read_bytes() == (
        b"2026-11-03T05:59:59.999Z,k2,m2\n2026-11-03T05:00:00.000Z,k3,m3\n"
    )
    assert info.rows == 2
