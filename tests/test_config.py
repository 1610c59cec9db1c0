from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest

from orchestrator.cli import build_parser
from orchestrator.commands import options_of
from orchestrator.config import RunSettings, build_settings, read_contact_keys
from orchestrator.configfile import load_config
from orchestrator.credentials import credentials_from_env, load_credentials
from orchestrator.errors import UsageError
from orchestrator.timeparse import parse_duration, parse_time

NOW = dt.datetime(2026, 11, 20, 12, 34, 56, tzinfo=dt.UTC)


def settings(**options: object) -> RunSettings:
    base: dict[str, object] = {
        "start": "2026-11-03T00:00:00Z",
        "end": "2026-11-04T00:00:00Z",
        "output": "out.csv",
    }
    return build_settings({**base, **options}, {}, now=NOW)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-03T05:00:00Z", dt.datetime(2026, 11, 3, 5, tzinfo=dt.UTC)),
        ("2026-11-03T00:00-05:00", dt.datetime(2026, 11, 3, 5, tzinfo=dt.UTC)),
        ("2026-11-03", dt.datetime(2026, 11, 3, tzinfo=dt.UTC)),
        ("now", NOW),
        ("today", dt.datetime(2026, 11, 20, tzinfo=dt.UTC)),
        ("yesterday", dt.datetime(2026, 11, 19, tzinfo=dt.UTC)),
        ("-24h", NOW - dt.timedelta(hours=24)),
    ],
)
def test_times_are_parsed_to_utc(text: str, expected: dt.datetime) -> None:
    assert parse_time(text, now=NOW) == expected


def test_time_without_offset_is_refused_with_a_fix() -> None:
    with pytest.raises(UsageError, match=r"2026-11-03T05:00:00Z for UTC"):
        parse_time("2026-11-03T05:00:00", now=NOW, name="start")


def test_garbage_time_names_the_forms() -> None:
    with pytest.raises(UsageError, match="ISO 8601"):
        parse_time("tomorrow-ish", now=NOW)


def test_durations() -> None:
    assert parse_duration("90s").total_seconds() == 90
    assert parse_duration("1h").total_seconds() == 3600
    with pytest.raises(UsageError, match="30m"):
        parse_duration("1 hour")


def test_unknown_column_suggests_the_nearest() -> None:
    with pytest.raises(UsageError, match=r"ContactKy.*did you mean ContactKey"):
        settings(columns="TransactionTime,ContactKy")


def test_statuses_match_without_case_and_are_sent_as_documented() -> None:
    built = settings(statuses=["failed", "COMPLETE"])

    assert built.request.filters == (("statuses", ("Failed", "Complete")),)


def test_unknown_status_passes_only_when_allowed() -> None:
    with pytest.raises(UsageError, match="--allow-unknown-values"):
        settings(statuses=["Brandnew"])

    built = settings(statuses=["Brandnew"], allow_unknown_values=True)
    assert built.request.filters == (("statuses", ("Brandnew",)),)


def test_end_before_start_is_refused() -> None:
    with pytest.raises(UsageError, match="not after start"):
        settings(start="2026-11-04", end="2026-11-03")


def test_concurrency_bounds() -> None:
    with pytest.raises(UsageError, match="concurrency 0 is out of range"):
        settings(concurrency=0)


def test_flush_size_defaults_to_64_mb_and_refuses_nonsense() -> None:
    assert settings().flush_bytes == 64_000_000
    assert settings(flush_mb=0.5).flush_bytes == 500_000
    for wrong in (0.0001, 0, -1, float("nan"), float("inf"), 1e9, "64", True):
        with pytest.raises(UsageError, match=r"flush_mb .* from 0\.001 to 100000"):
            settings(flush_mb=wrong)


def test_config_unknown_key_names_file_key_and_allowed(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[export]\nconcurency = 5\n")

    with pytest.raises(UsageError) as caught:
        load_config(path)

    message = str(caught.value)
    assert str(path) in message
    assert "export.concurency" in message
    assert "did you mean concurrency" in message


def test_config_wrong_type_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[export]\nconcurrency = "five"\n')

    with pytest.raises(UsageError, match=r"export\.concurrency must be an integer"):
        load_config(path)


def test_flags_override_config(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[export]\nstart = "2026-11-01"\nend = "2026-11-02"\noutput = "a.csv"\n'
        'concurrency = 3\nformat = "tsv"\n'
    )
    built = build_settings({"concurrency": 7}, load_config(path), now=NOW)

    assert built.concurrency == 7
    assert built.request.format == "tsv"
    assert built.output == Path("a.csv")


@pytest.mark.parametrize(
    ("in_file", "flags"),
    [
        ('last = "6h"', {"start": "2026-11-19"}),
        ('start = "2026-11-19"', {"last": "2h"}),
    ],
)
def test_a_flag_giving_the_start_overrides_either_start_key(
    tmp_path: Path, in_file: str, flags: dict[str, str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[export]\n{in_file}\nend = "2026-11-20"\noutput = "a.csv"\n')
    built = build_settings(flags, load_config(path), now=NOW)

    expected = NOW.replace(day=19, hour=0, minute=0, second=0)
    if "last" in flags:
        expected = NOW.replace(day=19, hour=22, minute=0, second=0)
    assert built.start == expected


@pytest.mark.parametrize(
    ("line", "key", "problem"),
    [
        ("concurrency = 100", "export.concurrency", "concurrency 100 is out of range"),
        ('window = "2d"', "export.window", "window '2d' is out of range"),
        ('format = "xml"', "export.format", "format 'xml' is not allowed"),
        ("statuses = ['Active', 'Nope']", "filters.statuses", "status 'Nope' is not"),
        ("columns = ['Nope']", "export.columns", "column 'Nope' is not"),
    ],
)
def test_a_bad_value_in_the_config_names_its_file_and_key(
    tmp_path: Path, line: str, key: str, problem: str
) -> None:
    section = "filters" if key.startswith("filters") else "export"
    path = tmp_path / "c.toml"
    path.write_text(f"[{section}]\n{line}\n")
    flags = {"start": "2026-11-19", "end": "2026-11-20", "output": "a.csv"}

    with pytest.raises(UsageError) as caught:
        build_settings(flags, load_config(path), now=NOW)

    message = str(caught.value)
    assert problem in message
    assert message.endswith(f"(config {path}: {key})")


def test_the_same_bad_value_from_a_flag_names_no_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[export]\nconcurrency = 100\n")
    flags = {"start": "2026-11-19", "end": "2026-11-20", "output": "a.csv"}

    with pytest.raises(UsageError) as caught:
        build_settings({**flags, "concurrency": 99}, load_config(path), now=NOW)

    assert str(caught.value) == "concurrency 99 is out of range: use 1 to 64"


def test_the_example_config_is_accepted() -> None:
    example = Path(__file__).parent.parent / "config" / "example.toml"
    built = build_settings({}, load_config(example), now=NOW)

    assert built.request.filters == ()
    assert built.end - built.start == dt.timedelta(days=1)


def test_credentials_need_all_three_variables() -> None:
    with pytest.raises(UsageError, match="SFMC_CLIENT_SECRET, SFMC_AUTH_URL not set"):
        credentials_from_env({"SFMC_CLIENT_ID": "x"})


def test_secret_is_not_in_the_repr() -> None:
    found = credentials_from_env(
        {
            "SFMC_CLIENT_ID": "id",
            "SFMC_CLIENT_SECRET": "hunter2-secret",
            "SFMC_AUTH_URL": "https://x.auth.marketingcloudapis.com/",
        }
    )
    assert "hunter2" not in repr(found)
    assert found.auth_url == "https://x.auth.marketingcloudapis.com"


def test_contact_keys_file_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text("\ufeffa@example.com\n\n  b  \n")

    assert read_contact_keys(path) == ("a@example.com", "b")


def test_contact_keys_file_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_bytes(b"ok\n\xff\xfe\n")

    with pytest.raises(UsageError, match="not UTF-8"):
        read_contact_keys(path)


def test_sub_millisecond_times_are_floored_to_the_millisecond() -> None:
    built = settings(start="2026-11-03T05:00:00.1234567+00:00", end="now")

    assert built.start.microsecond == 123000
    assert built.end.microsecond % 1000 == 0


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('[filters]\ncontact_keys_file = ""', "filters.contact_keys_file is empty"),
        ('[export]\nend = " "', "export.end is empty"),
        (
            "[filters]\ndefinition_ids = [[1]]",
            "filters.definition_ids must be a list of",
        ),
        ("[export]\ncolumns = [1, 2]", "export.columns must be a list of strings"),
    ],
)
def test_an_empty_value_or_a_list_of_non_strings_is_refused(
    tmp_path: Path, line: str, problem: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(line + "\n")

    with pytest.raises(UsageError, match=f"config {path}: {problem}"):
        load_config(path)


@pytest.mark.parametrize(
    ("start", "end", "problem"),
    [
        ("2026-11-20", "2026-11-21", "end 2026-11-21T00:00:00Z is in the future"),
        ("2999-01-01", "2999-01-02", "is in the future"),
        (
            "0001-01-01T00:00+05:00",
            "2026-11-20",
            "start '0001-01-01T00:00+05:00' is out",
        ),
        ("2026-11-20", "9999-12-31T20:00-05:00", "end '9999-12-31T20:00-05:00' is out"),
        (None, "0001-01-01T00:30:00Z", "last '1h' before 0001-01-01T00:30:00Z"),
    ],
)
def test_an_end_after_now_or_a_time_out_of_range_is_refused(
    start: str | None, end: str, problem: str
) -> None:
    with pytest.raises(UsageError, match=re.escape(problem)):
        settings(start=start, end=end, last=None if start else "1h")


def test_a_range_cut_into_too_many_windows_is_refused_before_planning() -> None:
    with pytest.raises(UsageError, match=r"into 5,256,000 windows, more than 100,000"):
        settings(start="2016-11-20T12:34:56Z", end="2026-11-18T12:34:56Z", window="1m")

    assert (
        settings(start="2026-10-21", end="2026-11-20", window="1m").window.seconds == 60
    )


def test_an_output_name_too_long_for_its_state_files_is_refused() -> None:
    longest = "b" * (255 - len(".manifest.json.tmp") - len(".csv"))
    assert settings(output=f"{longest}.csv").output.name == f"{longest}.csv"

    with pytest.raises(UsageError, match=r"is too long: .* within 237 bytes"):
        settings(output=f"{longest}b.csv")

    with pytest.raises(UsageError, match="is too long"):
        settings(output="/".join(["d" * 200] * 21) + "/o.csv")


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        ("[retry]\nmax_attempts = 0", "max_attempts 0 is out of range"),
        (
            "[retry]\nmax_attempts = 99999999",
            "at most 100 (config {path}: retry.max_attempts)",
        ),
        ("[retry]\nbackoff_initial_seconds = 1e308", "retry.backoff_initial_seconds"),
        ("[http]\nread_timeout_seconds = 1e308", "at most 86,400"),
        ("[http]\nread_timeout_seconds = 1e-300", "use a number from 0.1, at most"),
        ("[export]\nhistory_lag_fallback_seconds = 1e300", "at most 2,592,000"),
        (
            "[retry]\nbackoff_initial_seconds = 60\nbackoff_max_seconds = 10",
            "is above backoff_max_seconds 10",
        ),
    ],
)
def test_retry_and_timeout_settings_are_bounded_and_named(
    tmp_path: Path, lines: str, problem: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(lines + "\n")
    flags = {"start": "2026-11-19", "end": "2026-11-20", "output": "a.csv"}

    with pytest.raises(UsageError) as caught:
        build_settings(flags, load_config(path), now=NOW)

    assert problem.format(path=path) in str(caught.value)
    assert str(caught.value).endswith(")")  # names the file and key


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"columns": "TransactionTime,,ContactKey"}, "columns: an empty name between"),
        ({"statuses": ["Failed,"]}, "statuses: an empty name between commas"),
        (
            {"columns": "ContactKey,Status,ContactKey"},
            "columns: ContactKey named twice",
        ),
        ({"output": "x.csv/"}, "ends with '/': name a file"),
    ],
)
def test_list_and_output_typos_are_refused_by_name(
    options: dict[str, object], problem: str
) -> None:
    with pytest.raises(UsageError, match=re.escape(problem)):
        settings(**options)


def test_credentials_missing_from_env_and_file_name_both(tmp_path: Path) -> None:
    secrets = tmp_path / "sfmc.env"
    secrets.write_text("SFMC_CLIENT_ID=id\n")
    secrets.chmod(0o600)
    config = {"credentials": {"file": str(secrets)}}

    with pytest.raises(UsageError, match=f"not set.*nor in credentials file {secrets}"):
        load_credentials({}, config)

    with pytest.raises(UsageError, match=r"credentials file .*Is a directory"):
        load_credentials({}, {"credentials": {"file": str(tmp_path)}})


def test_only_an_exports_own_parts_folder_is_refused_as_an_output_folder(
    tmp_path: Path,
) -> None:
    output = tmp_path / "car.parts" / "y.csv"
    assert settings(output=str(output)).output == output

    (tmp_path / "car.manifest.json").write_text("{}")
    with pytest.raises(UsageError, match=r"in an export's \.parts folder"):
        settings(output=str(output))


def test_a_min_window_longer_than_the_window_is_refused() -> None:
    with pytest.raises(UsageError, match=r"min_window '1h' is longer than .* '1m'"):
        settings(window="1m", min_window="1h")

    assert settings(window="1m", min_window="1m").min_window == dt.timedelta(minutes=1)


def test_a_home_folder_in_paths_is_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "keys.txt").write_text("a@example.com\n")

    found = settings(output="~/exports/o.csv", contact_keys_file="~/keys.txt")

    assert found.output == tmp_path / "exports" / "o.csv"
    assert found.request.contact_keys == ("a@example.com",)


def test_repeated_columns_flags_add_up_in_order() -> None:
    flags = ["run", "--start=-3h", "--output", "o.csv"]
    flags += ["--columns", "TransactionTime,Status", "--columns", "ContactKey"]
    options = options_of(build_parser().parse_args(flags))
    settings = build_settings(options, {}, now=dt.datetime.now(dt.UTC))

    assert settings.request.columns == ("TransactionTime", "Status", "ContactKey")
