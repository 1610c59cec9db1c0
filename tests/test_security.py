"""Secrets, personal data, transport and hostile input."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web

from orchestrator import auth
from orchestrator.auth import check_auth_url, check_rest_url
from orchestrator.config import ExportRequest, HttpSettings, read_contact_keys
from orchestrator.configfile import load_config
from orchestrator.credentials import Credentials, load_credentials
from orchestrator.download import _parse_estimate
from orchestrator.errors import JourneyExportError, TokenUnavailableError, UsageError
from orchestrator.export import run_export
from orchestrator.manifest import ExportPaths
from orchestrator.redaction import server_text
from orchestrator.reporting import prometheus_text
from orchestrator.sandbox import SandboxServer, SandboxSettings
from tests.conftest import (
    HOUR,
    credentials_for,
    find_range_with_empty_hour,
    hour_now,
    run_settings,
)
from tests.test_cli import env_for, range_args, start_sandbox
from tests.test_faults_e2e import FAST_RETRY

SECRET = "S3cr3t-Do-Not-Leak-7f1e9a0c"


def every_file(root: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}


async def test_no_secret_or_token_in_logs_or_files_at_debug(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    keys = tmp_path / "keys.txt"
    settings = SandboxSettings(rows_per_hour=50, client_secret=SECRET)
    async with SandboxServer(settings) as sandbox:
        start = find_range_with_empty_hour(sandbox.history)
        contact = sandbox.history.expected(
            int(start.timestamp() * 1000), int((start + 4 * HOUR).timestamp() * 1000)
        )[0][4]
        keys.write_text(contact + "\n")
        request = ExportRequest(contact_keys=(contact,))
        output = tmp_path / "out" / "o.csv"
        await run_export(
            run_settings(output, start, start + 4 * HOUR, request=request),
            credentials_for(sandbox),
        )
        await run_export(
            run_settings(output, start, start + 4 * HOUR, request=request),
            credentials_for(sandbox),
        )
        tokens = sandbox.issued_tokens

    assert tokens
    logged = caplog.text + "".join(repr(r.__dict__) for r in caplog.records)
    files = every_file(tmp_path / "out")
    for needle in [SECRET, *tokens]:
        assert needle not in logged
        for path, data in files.items():
            assert needle.encode() not in data, path
    assert contact not in logged
    manifest = ExportPaths(output).manifest.read_bytes()
    assert contact.encode() not in manifest


def test_cli_at_debug_leaks_nothing_and_secrets_stay_out_of_argv(
    tmp_path: Path,
) -> None:
    process, port = start_sandbox(
        f"client_secret={SECRET}", "rows_per_hour=50", "first_byte_seconds=0.3"
    )
    end = hour_now() - 2 * HOUR
    env = {**env_for(port), "SFMC_CLIENT_SECRET": SECRET}
    report = tmp_path / "report.json"
    command = [
        sys.executable,
        "-m",
        "orchestrator",
        "--log-level",
        "DEBUG",
        "run",
        *range_args(4, tmp_path / "o.csv", end),
        "--report",
        str(report),
        "--concurrency",
        "1",
    ]
    try:
        run = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        time.sleep(0.8)
        argv = Path(f"/proc/{run.pid}/cmdline").read_bytes()
        out, err = run.communicate(timeout=60)
    finally:
        process.terminate()
        process.wait(10)

    assert run.returncode == 0, err
    assert SECRET.encode() not in argv
    assert SECRET.encode() not in out + err
    assert b"Bearer" not in err
    for path, data in every_file(tmp_path).items():
        assert SECRET.encode() not in data, path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_shared_config_and_credentials_files_draw_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secrets_file = tmp_path / "sfmc.env"
    secrets_file.write_text(
        f"SFMC_CLIENT_ID=id\nSFMC_CLIENT_SECRET={SECRET}\n"
        "SFMC_AUTH_URL=https://x.auth.marketingcloudapis.com\n"
    )
    config = tmp_path / "c.toml"
    config.write_text(f'[credentials]\nfile = "{secrets_file}"\n')
    os.chmod(secrets_file, 0o644)
    os.chmod(config, 0o664)

    credentials = load_credentials({}, load_config(config), config)

    assert credentials.client_secret == SECRET
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(str(secrets_file) in w and "chmod 600" in w for w in warnings)
    assert any(str(config) in w and "chmod go-w" in w for w in warnings)
    assert all(SECRET not in w for w in warnings)


def test_a_config_file_others_can_only_read_draws_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[export]\nconcurrency = 4\n")  # no secret can live here
    os.chmod(config, 0o644)

    load_credentials(
        {
            "SFMC_CLIENT_ID": "id",
            "SFMC_CLIENT_SECRET": SECRET,
            "SFMC_AUTH_URL": "https://x.auth.marketingcloudapis.com",
        },
        load_config(config),
        config,
    )

    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_environment_wins_over_the_credentials_file(tmp_path: Path) -> None:
    secrets_file = tmp_path / "sfmc.env"
    secrets_file.write_text("SFMC_CLIENT_ID=file\nSFMC_CLIENT_SECRET=file\n")
    os.chmod(secrets_file, 0o600)
    config = {"credentials": {"file": str(secrets_file)}}
    env = {"SFMC_CLIENT_ID": "env", "SFMC_AUTH_URL": "https://a.example.com"}

    credentials = load_credentials(env, config)

    assert (credentials.client_id, credentials.client_secret) == ("env", "file")


@pytest.mark.parametrize(
    ("text", "named", "secret"),
    [
        ("SFMC_CLIENT_ID=x\npassword hunter2\n", "line 2", "hunter2"),
        (
            "SFMC_CLIENT_SECRET=old\nSFMC_CLIENT_SECRET=new-one\n",
            "line 2: SFMC_CLIENT_SECRET is given a",
            "new-one",
        ),
    ],
)
def test_a_bad_credentials_file_names_the_line_and_not_the_secret(
    tmp_path: Path, text: str, named: str, secret: str
) -> None:
    secrets_file = tmp_path / "sfmc.env"
    secrets_file.write_text(text)

    with pytest.raises(UsageError, match=named) as caught:
        load_credentials({}, {"credentials": {"file": str(secrets_file)}})
    assert secret not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://auth.example.com",
        "ftp://127.0.0.1",
        "http://10.0.0.1:8080",
        "https://x.invalid\\.marketingcloudapis.com",  # not a host name at all
        "https://x_y.auth.marketingcloudapis.com",
    ],
)
async def test_credentials_go_only_to_loopback_or_a_well_formed_sfmc_host(
    tmp_path: Path, url: str
) -> None:
    credentials = Credentials("id", SECRET, url)
    start = hour_now() - 5 * HOUR
    with pytest.raises(UsageError, match="SFMC_AUTH_URL") as caught:
        await run_export(
            run_settings(tmp_path / "o.csv", start, start + HOUR), credentials
        )
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    "tampered",
    [
        "https://attacker.example.net/",
        "http://mc123.rest.marketingcloudapis.com/",
        "https://marketingcloudapis.com.attacker.net/",
        "https://a%2fb.rest.marketingcloudapis.com/",
    ],
)
async def test_a_tampered_rest_url_never_gets_the_token(
    tmp_path: Path, tampered: str
) -> None:
    settings = SandboxSettings(rows_per_hour=10, rest_url_override=tampered)
    async with SandboxServer(settings) as sandbox:
        start = find_range_with_empty_hour(sandbox.history)
        with pytest.raises(UsageError, match="refusing to send the token"):
            await run_export(
                run_settings(tmp_path / "o.csv", start, start + HOUR),
                credentials_for(sandbox),
            )
        assert sum(sandbox.stats.downloads.values()) == 0


def test_allowed_domains_widen_the_trusted_rest_hosts() -> None:
    domains = ("marketingcloudapis.com", "example.org")

    check_rest_url("https://mc.rest.example.org/", domains)
    check_rest_url("https://mc1.rest.marketingcloudapis.com/", domains)
    with pytest.raises(UsageError, match="--allow-domain"):
        check_rest_url("https://mc.rest.example.org.evil.net/", domains)


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


def tls_server_context(authority: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    return context


async def test_tls_is_verified_and_a_ca_bundle_is_honoured(
    tmp_path: Path, authority: trustme.CA
) -> None:
    bundle = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(bundle))
    server = SandboxServer(
        SandboxSettings(rows_per_hour=20), ssl_context=tls_server_context(authority)
    )
    async with server as sandbox:
        assert sandbox.auth_url.startswith("https://127.0.0.1:")
        start = find_range_with_empty_hour(sandbox.history)
        end = start + 2 * HOUR

        with pytest.raises(UsageError, match=r"does not verify.*--ca-bundle"):
            await run_export(
                run_settings(tmp_path / "a.csv", start, end), credentials_for(sandbox)
            )

        http = HttpSettings(ca_bundle=str(bundle))
        result = await run_export(
            run_settings(tmp_path / "b.csv", start, end, http=http),
            credentials_for(sandbox),
        )
    assert result.complete


def test_ssl_cert_file_is_honoured(tmp_path: Path, authority: trustme.CA) -> None:
    bundle = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(bundle))
    code = (
        "import ssl, sys; ctx = ssl.create_default_context();"
        "sys.exit(0 if ctx.cert_store_stats()['x509_ca'] >= 1 else 1)"
    )
    env = {**os.environ, "SSL_CERT_FILE": str(bundle)}
    done = subprocess.run([sys.executable, "-c", code], env=env, check=False)
    assert done.returncode == 0


def test_contact_keys_file_with_enormous_or_control_lines_is_refused(
    tmp_path: Path,
) -> None:
    huge = tmp_path / "huge.txt"
    huge.write_text("ok\n" + "k" * 5000 + "\n")
    odd = tmp_path / "odd.txt"
    odd.write_bytes(b"ok\nbad\x00key\n")

    with pytest.raises(UsageError, match="key 2 is longer") as caught:
        read_contact_keys(huge)
    assert "kkkk" not in str(caught.value)
    with pytest.raises(UsageError, match="key 2"):
        read_contact_keys(odd)


def test_config_of_the_wrong_types_is_refused_without_a_traceback(
    tmp_path: Path,
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[export]\ncolumns = 5\n[retry]\nmax_attempts = "x"\n')
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "export.columns must be a list" in done.stderr
    assert "Traceback" not in done.stderr


async def test_an_endless_body_is_bounded_by_the_cap(tmp_path: Path) -> None:
    settings = SandboxSettings(rows_per_hour=400)
    async with SandboxServer(settings) as sandbox:
        start = find_range_with_empty_hour(sandbox.history)
        result = await run_export(
            run_settings(
                tmp_path / "o.csv",
                start,
                start + HOUR,
                cap_bytes=2_000,
                estimate=False,
                compression="none",
                min_window=dt.timedelta(minutes=30),
            ),
            credentials_for(sandbox),
        )
    assert not result.complete
    assert all("cannot be split further" in e for e in result.failed.values())


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:99999",
        "https://x.auth.marketingcloudapis.com:0",
        "http://127.0.0.1:port",
    ],
)
def test_a_url_with_an_impossible_port_is_refused_not_retried(url: str) -> None:
    with pytest.raises(UsageError, match="port"):
        check_auth_url(url)

    with pytest.raises(UsageError, match="port"):
        check_rest_url(url + "/", ("marketingcloudapis.com",))


TOKEN = "TOKxyz-secret-token-5b2c"
KEYS = ("alice@example.com", 'ext"q"1', "zoë@example.com")


class HostileServer:
    """A token endpoint and download call that echo what they were sent, or send
    the request elsewhere (307): the tool must keep the secret, the token and the
    contact keys out of what it writes, and follow no redirect."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.captured: list[bytes] = []  # what reached the redirect's target
        self.url = ""
        self.elsewhere = ""

    async def __aenter__(self) -> HostileServer:
        self._runners: list[web.AppRunner] = []
        self.url = await self._serve(self._routes())
        capture = web.Application()
        capture.router.add_route("*", "/{tail:.*}", self._capture)
        self.elsewhere = await self._serve(capture)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for runner in self._runners:
            await runner.cleanup()

    async def _serve(self, app: web.Application) -> str:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    def _routes(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v2/token", self._token)
        app.router.add_post(
            "/interaction/v1/interactions/journeyhistory/download", self._download
        )
        return app

    async def _capture(self, request: web.Request) -> web.Response:
        self.captured.append(await request.read())
        return web.Response(status=500)

    async def _token(self, request: web.Request) -> web.Response:
        sent = await request.text()
        if self.mode == "token_echo":
            return web.json_response({"error_description": sent}, status=401)

        if self.mode == "token_redirect":
            raise web.HTTPTemporaryRedirect(self.elsewhere + "/v2/token")

        rest_url = self.url + "/"
        if self.mode == "rest_url_echo":  # off the allowed hosts, and the secret in it
            rest_url = f"https://elsewhere.example/{sent}"

        answer = {"access_token": TOKEN, "rest_instance_url": rest_url}
        return web.json_response(answer)

    async def _download(self, request: web.Request) -> web.Response:
        if self.mode == "download_redirect":
            raise web.HTTPTemporaryRedirect(self.elsewhere + "/download")

        echoed = f"{request.headers['Authorization']} {await request.text()}"
        message = f"bad request: {echoed}\n2026-12-05T08:00:00 INFO forged\x1b[31m"
        return web.json_response({"message": message, "errorcode": 10000}, status=400)


@pytest.mark.parametrize(
    "mode",
    [
        "token_echo",
        "token_redirect",
        "rest_url_echo",
        "download_echo",
        "download_redirect",
    ],
)
async def test_what_a_server_echoes_or_redirects_never_leaks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    caplog.set_level(logging.DEBUG)
    output = tmp_path / "o.csv"
    end = hour_now() - 2 * HOUR
    request = ExportRequest(contact_keys=KEYS)
    async with HostileServer(mode) as server:
        credentials = Credentials("client", SECRET, server.url)
        settings = run_settings(
            output, end - HOUR, end, request=request, retry=FAST_RETRY
        )
        try:
            result = await run_export(settings, credentials)
            written = str(result)
        except JourneyExportError as error:
            written = str(error)

    assert server.captured == []  # no redirect was followed
    if mode == "download_echo":  # the echo arrived, and was cleaned
        assert "Bearer <token> {" in written and "<contact key>" in written
    if mode == "token_echo":
        assert "<client secret>" in written
    kept = [written, caplog.text, *(p.read_text() for p in every_file(tmp_path))]
    forms = [SECRET, TOKEN, *KEYS, 'ext\\"q\\"1', "zo\\u00eb", "\x1b", "\n20"]
    assert [form for form in forms for text in kept if form in text] == []


@pytest.mark.parametrize("role", ["config", "credentials", "contact keys"])
def test_a_device_given_as_an_input_file_is_refused_at_once(
    tmp_path: Path, role: str
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[credentials]\nfile = "/dev/zero"\n')  # never ends
    args = {
        "config": ["--config", "/dev/zero"],
        "credentials": ["--config", str(config)],
        "contact keys": ["--contact-keys-file", "/dev/zero"],
    }[role]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "run",
            *range_args(1, tmp_path / "o.csv"),
            *args,
        ],
        capture_output=True,
        text=True,
        env=env_for(1),
        timeout=20,
        check=False,
    )

    assert done.returncode == 2, done.stderr
    assert "not a regular file or a pipe" in done.stderr
    assert done.stderr.count("\n") == 1


def test_a_pipe_is_read_and_a_named_fifo_is_refused(tmp_path: Path) -> None:
    reading, writing = os.pipe()  # what <(command) hands over as /dev/fd/N
    os.write(writing, b"k1\nk2\n")
    os.close(writing)
    try:
        assert read_contact_keys(Path(f"/dev/fd/{reading}")) == ("k1", "k2")
    finally:
        os.close(reading)

    fifo = tmp_path / "keys"
    os.mkfifo(fifo)  # its writer may come late (read as empty) or never (a wait)
    with pytest.raises(UsageError, match="a named FIFO, not a regular file or a pipe"):
        read_contact_keys(fifo)


def test_server_text_hides_each_form_longest_first_and_keeps_labels_whole() -> None:
    keys = {"<contact key>": ["john.smith", "john.smith@example.com", "a", "zoë@x.io"]}
    said = (
        "unknown john.smith@example.com, john.smith, a cat, zo\\u00EB@x.io, "
        "zo%c3%ab%40x.io, zo\\xc3\\xab@x.io\n\x1b[31m"
    )

    shown = server_text(said, keys)

    assert shown == (
        "unknown <contact key>, <contact key>, a cat, <contact key>, <contact key>, "
        "<contact key>  [31m"
    )


def test_a_metrics_label_of_an_undecodable_name_is_still_utf8(tmp_path: Path) -> None:
    name = os.fsdecode(b"out\xff\xc3\xa9.csv")  # as such a name comes from argv
    report = {"output": name, "exit_code": 2, "seconds": 0.1, "failed": []}
    report |= {"rows": 0, "bytes": 0, "windows": 0, "exported": 0, "retries": 0}
    text = prometheus_text({**report, "throttled": 0, "complete": False})

    assert 'output="out\ufffdé.csv"' in text
    text.encode()  # writable as UTF-8


@pytest.mark.parametrize(
    "odd", [1e400, 10**400, -5, float("nan"), "²", "1e400", True, None, [1]]
)
def test_an_estimate_of_odd_numbers_is_not_understood_rather_than_a_crash(
    odd: object,
) -> None:
    assert _parse_estimate({"estimatedSizeBytes": odd}) is None


async def test_a_malformed_token_answer_quoting_the_request_leaks_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def answer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        request = await reader.read(65536)  # the headers and the JSON body
        writer.write(b"HTTP/1.1 2x0 " + request.split(b"\r\n\r\n")[-1] + b"\r\n\r\n")
        await writer.drain()
        writer.close()

    monkeypatch.setattr(auth, "TOKEN_ATTEMPTS", 1)
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, aiohttp.ClientSession() as session:
        credentials = Credentials("client", SECRET, f"http://127.0.0.1:{port}")
        with pytest.raises(TokenUnavailableError) as caught:
            await auth.TokenSource(session, credentials).get()

    assert "token endpoint unreachable" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_a_key_across_the_cut_is_hidden_whole_before_the_text_is_cut() -> None:
    said = "x" * 290 + "alice.wonderland@example.com"

    shown = server_text(said, {"<contact key>": ["alice.wonderland@example.com"]})

    assert len(shown) == 300
    assert "alice" not in shown and shown.startswith("x" * 290 + "<contact")


def test_overlapping_values_are_hidden_together_and_matched_before_any_cut() -> None:
    keys = {"<contact key>": ["12345678", "id1"], "<client secret>": ["s3\tcret"]}
    said = "keys: id12345678; secret s3\tcret; " + "T" * 1000 + " tail-key-0001"
    hidden = {**keys, "<token>": ["T" * 1000], "<key>": ["tail-key-0001"]}

    shown = server_text(said, hidden)

    assert shown == ("keys: <contact key>; secret <client secret>; <token> <key>")


def test_a_named_fifo_already_opened_by_the_shell_is_read(tmp_path: Path) -> None:
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    command = (
        f"(printf '[export]\\nwindow = \"30m\"\\n' > {fifo} &); "
        f"{sys.executable} -m orchestrator plan --config /dev/stdin "
        f"--start 2026-12-01T00:00Z --end 2026-12-01T02:00Z < {fifo}"
    )
    done = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=20, check=False
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "4 windows"


def test_keys_replaced_before_the_cut_never_pull_a_cut_key_into_view() -> None:
    # Each label is shorter than its key: once the keys before it are replaced, a
    # key that the first cut had halved would move into the part shown.
    keys = [f"{number:08x}-4b1d-4c2a-9f3e-{number:012x}" for number in range(20)]
    said = "unknown contact keys: " + ", ".join(keys)

    shown = server_text(said, {"<contact key>": keys})

    assert not any(key[:4] in shown for key in keys)
    assert shown.endswith("…") and len(shown) == 300
