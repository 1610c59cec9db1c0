from __future__ import annotations

import datetime as dt
import itertools

import pytest

from orchestrator.commands import print_estimates
from orchestrator.download import Estimate
from orchestrator.planner import Window, plan_windows

UTC = dt.UTC


def at(hour: int, minute: int = 0, day: int = 3) -> dt.datetime:
    return dt.datetime(2026, 11, day, hour, minute, tzinfo=UTC)


def test_aligned_range_gives_whole_hours() -> None:
    windows = plan_windows(at(5), at(8), dt.timedelta(hours=1))

    assert windows == [Window(at(5), at(6)), Window(at(6), at(7)), Window(at(7), at(8))]


def test_unaligned_range_has_short_first_and_last_windows() -> None:
    windows = plan_windows(at(5, 20), at(7, 10), dt.timedelta(hours=1))

    assert windows == [
        Window(at(5, 20), at(6)),
        Window(at(6), at(7)),
        Window(at(7), at(7, 10)),
    ]


def test_windows_are_contiguous_and_cover_the_range() -> None:
    start, end = at(0, 7), at(23, 59, day=5)
    windows = plan_windows(start, end, dt.timedelta(minutes=15))

    assert windows[0].start == start
    assert windows[-1].end == end
    assert all(a.end == b.start for a, b in itertools.pairwise(windows))
    assert all(w.span <= dt.timedelta(minutes=15) for w in windows)


def test_range_shorter_than_a_window_is_one_window() -> None:
    assert plan_windows(at(5, 10), at(5, 40), dt.timedelta(hours=1)) == [
        Window(at(5, 10), at(5, 40))
    ]


def test_halves_split_at_the_midpoint() -> None:
    first, second = Window(at(5), at(6)).halves()

    assert (first.start, first.end, second.end) == (at(5), at(5, 30), at(6))


def test_halves_of_an_odd_span_round_to_the_second() -> None:
    window = Window(at(5), at(5) + dt.timedelta(seconds=61))
    first, second = window.halves()

    assert first.end == at(5) + dt.timedelta(seconds=30)
    assert second.start == first.end


def test_key_names_both_ends_in_utc() -> None:
    assert Window(at(5), at(6)).key == "2026-11-03T05:00:00Z/2026-11-03T06:00:00Z"


@pytest.mark.parametrize(("compressed", "noted"), [(True, False), (False, True)])
def test_plan_notes_a_window_over_the_cap_by_the_size_run_splits_it_by(
    capsys: pytest.CaptureFixture[str], compressed: bool, noted: bool
) -> None:
    window = Window(at(5), at(6))
    estimate = Estimate(rows=10_000, bytes=3_737_204, compressed_bytes=400_000)

    print_estimates([(window, estimate)], 1_000_000, compressed=compressed)

    assert ("over the safety cap" in capsys.readouterr().out) == noted
