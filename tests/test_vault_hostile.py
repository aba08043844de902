"""A lying Vault: redirects elsewhere, drips, malformed and huge answers.

Every server here except the `bao` fixture is a FAKE HTTP(S) server on 127.0.0.1, labelled as such:
a real OpenBao never redirects a client to another host, drips its answers, sends malformed JSON or
a 200 MiB body on demand, and these are exactly the faults under test. What a real server serves is
checked against the real one (test_real_openbao_answers_pass_validation).
"""

import contextlib
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from secret_init.config import VaultConfig
from secret_init.errors import DataError, SecretInitError, VaultUnavailableError
from secret_init.vault import VaultClient
from tests.conftest import (
    REPO,
    Bao,
    OwnCA,
    QuietHandler,
    assert_no_leak,
    base_env,
    log_events,
    make_test_ca,
    needs_root,
    random_secret,
    record_output,
    register_secret,
    run_cli,
    secret_files,
    write_config,
)
from tests.figures import record_figure

pytestmark = needs_root
hostile = pytest.mark.hostile("vault-answers")

STARTUP = 3.0  # startup_timeout of the drip tests, in seconds
MARGIN = 3.0  # generous: the machine is noisy, and the interpreter starts first
MIB = 1024 * 1024


class Seen(NamedTuple):
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Respond = Callable[[QuietHandler], None]


class FakeVault:
    """A FAKE Vault on 127.0.0.1 (labelled: see the module docstring): `respond` writes raw HTTP bytes.

    It records every request that reaches it, so a "catcher" proves that nothing did.
    """

    def __init__(self, respond: Respond, ca: OwnCA | None = None) -> None:
        self.seen: list[Seen] = []
        fake = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fake.seen.append(Seen(self.command, self.path, dict(self.headers), body))
                self.close_connection = True
                with contextlib.suppress(OSError):  # the client hung up, as it should on a drip or a huge answer
                    respond(self)

            do_GET = do_POST = do_PUT = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        scheme = "http"
        if ca is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(ca.server_cert, ca.server_key)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.port = self.server.server_address[1]
        self.addr = f"{scheme}://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fakes() -> Iterator[Callable[..., FakeVault]]:
    made: list[FakeVault] = []

    def make(respond: Respond, ca: OwnCA | None = None) -> FakeVault:
        made.append(FakeVault(respond, ca))
        return made[-1]

    yield make
    for fake in made:
        fake.close()


def reply(handler: QuietHandler, status: int, body: bytes = b"", headers: tuple[str, ...] = ()) -> None:
    head = [f"HTTP/1.1 {status} X", *headers, f"Content-Length: {len(body)}", "Connection: close"]
    handler.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)


def json_reply(doc: Any, status: int = 200) -> Respond:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return lambda h: reply(h, status, body, ("Content-Type: application/json",))


def kv2(value: str) -> dict[str, Any]:
    """A KV v2 read as OpenBao answers it."""
    meta = {"version": 1, "created_time": "2026-01-01T00:00:00Z", "deletion_time": "", "destroyed": False}
    return {"data": {"data": {"k": value}, "metadata": meta}, "lease_id": "", "lease_duration": 0, "renewable": False}


def catcher_reply(h: QuietHandler) -> None:
    reply(h, 200, json.dumps(kv2("caught")).encode(), ("Content-Type: application/json",))


class Run(NamedTuple):
    code: int
    stderr: str
    out: Path


def render(
    workdir: Path, out: Path, addr: str, auth: str = "token", vault_extra: str = "", startup: float = STARTUP
) -> Run:
    """`secret-init render` of one secret vault:secret/data/app/x#k from `addr`, as a real process."""
    token = random_secret("tok")
    auth_toml = ""
    if auth == "approle":
        (workdir / "role_id").write_text(random_secret("role"))
        (workdir / "secret_id").write_text(random_secret("sid"))
        auth_toml = f'auth = "approle"\nrole_id_file = "{workdir}/role_id"\nsecret_id_file = "{workdir}/secret_id"\n'
    cfg = write_config(
        workdir,
        f'[output]\ndir = "{out}"\nuser = "65534:65534"\n'
        f'[vault]\naddr = "{addr}"\n{auth_toml}startup_timeout = "{startup:g}s"\n{vault_extra}\n'
        '[[secret]]\nname = "k"\nsource = "vault:secret/data/app/x#k"\n',
    )
    result = run_cli("render", "--config", str(cfg), env=base_env(VAULT_TOKEN=token))
    credentials = [token]
    if auth == "approle":
        credentials += [(workdir / "role_id").read_text(), (workdir / "secret_id").read_text()]
    assert_no_leak(result.stdout + result.stderr, *credentials)
    return Run(result.returncode, result.stderr, out)


def one_error_line(run: Run) -> str:
    """The run's error: one line, no traceback, and nothing written."""
    assert "Traceback" not in run.stderr
    errors = [e for e in log_events(run.stderr) if e["level"] == "error"]
    assert len(errors) == 1, run.stderr
    assert errors[0].get("exit_code") == run.code
    assert not run.out.exists() or secret_files(run.out) == []
    event = str(errors[0]["event"])
    assert "\n" not in event
    return event


# -- 1. redirects carry credentials ------------------------------------------------


@hostile
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_read_is_not_redirected_to_another_port(
    status: int, fakes: Callable[..., FakeVault], tmpfs: Path, workdir: Path
) -> None:
    """The token (X-Vault-Token, which requests keeps across hosts) never reaches the redirect's target."""
    catcher = fakes(catcher_reply)
    redirector = fakes(lambda h: reply(h, status, b"", (f"Location: {catcher.addr}{h.path}",)))
    run = render(workdir, tmpfs / "out", redirector.addr)
    assert run.code == 69, run.stderr
    error = one_error_line(run)
    assert f"refused a redirect to {catcher.addr}" in error
    assert catcher.seen == []
    assert [s.method for s in redirector.seen] == ["GET"]  # refused at once, not retried


@hostile
def test_an_approle_login_is_not_redirected(fakes: Callable[..., FakeVault], tmpfs: Path, workdir: Path) -> None:
    """A 307 keeps the method and body: the role_id and secret_id would follow it."""
    catcher = fakes(catcher_reply)
    redirector = fakes(lambda h: reply(h, 307, b"", (f"Location: {catcher.addr}{h.path}",)))
    run = render(workdir, tmpfs / "out", redirector.addr, auth="approle")
    assert run.code == 69, run.stderr
    assert f"refused a redirect to {catcher.addr}" in one_error_line(run)
    assert catcher.seen == []
    assert [s.path for s in redirector.seen] == ["/v1/auth/approle/login"]


@hostile
def test_https_is_not_redirected_to_plain_http(fakes: Callable[..., FakeVault], tmpfs: Path, workdir: Path) -> None:
    ca = make_test_ca(workdir / "pki")
    catcher = fakes(catcher_reply)
    redirector = fakes(lambda h: reply(h, 307, b"", (f"Location: {catcher.addr}{h.path}",)), ca)
    run = render(workdir, tmpfs / "out", redirector.addr, vault_extra=f'ca_cert = "{ca.ca_cert}"')
    assert run.code == 69, run.stderr
    assert f"refused a redirect to http://127.0.0.1:{catcher.port}" in one_error_line(run)
    assert catcher.seen == []
    assert len(redirector.seen) == 1  # it was reached over TLS: the refusal is the redirect's


@hostile
def test_a_redirect_to_the_same_address_is_followed(
    fakes: Callable[..., FakeVault], tmpfs: Path, workdir: Path
) -> None:
    """A standby sends clients to the active node at the configured address: that still works."""
    value = random_secret("v")

    def respond(h: QuietHandler) -> None:
        if h.path.startswith("/active/"):
            catcher_reply_with(h, value)
        else:
            reply(h, 307, b"", (f"Location: /active{h.path}",))

    fake = fakes(respond)
    run = render(workdir, tmpfs / "out", fake.addr)
    assert run.code == 0, run.stderr
    assert (run.out / "k").read_text() == value
    assert [s.path for s in fake.seen] == ["/v1/secret/data/app/x", "/active/v1/secret/data/app/x"]
    assert all(s.headers.get("X-Vault-Token") for s in fake.seen)


def catcher_reply_with(h: QuietHandler, value: str) -> None:
    reply(h, 200, json.dumps(kv2(value)).encode(), ("Content-Type: application/json",))


@hostile
def test_a_redirect_with_userinfo_is_never_logged(fakes: Callable[..., FakeVault], tmpfs: Path, workdir: Path) -> None:
    password = random_secret("pw")
    catcher = fakes(catcher_reply)
    location = f"http://admin:{password}@127.0.0.1:{catcher.port}/v1/x?token={password}"
    redirector = fakes(lambda h: reply(h, 302, b"", (f"Location: {location}",)))
    run = render(workdir, tmpfs / "out", redirector.addr)
    assert run.code == 69, run.stderr
    assert f"refused a redirect to {catcher.addr}" in one_error_line(run)
    assert_no_leak(run.stderr, password, "admin:")
    assert catcher.seen == []


def raw_reply(head: bytes, body: bytes = b"") -> Respond:
    """Header bytes as given, not UTF-8 or even latin-1 text: what a hostile server may send."""

    def respond(h: QuietHandler) -> None:
        h.wfile.write(b"HTTP/1.1 " + head + b"\r\nConnection: close\r\n\r\n" + body)

    return respond


UNPARSABLE_LOCATIONS = {
    "307 unclosed IPv6 bracket": b"307 X\r\nContent-Length: 0\r\nLocation: http://[::1",
    "302 bad IPv6 netloc": b"302 X\r\nContent-Length: 0\r\nLocation: //[zz",
    "307 not UTF-8": b"307 X\r\nContent-Length: 0\r\nLocation: /v1/\xff\xfe",
}


@hostile
@pytest.mark.parametrize("case", list(UNPARSABLE_LOCATIONS))
def test_an_unparsable_redirect_is_refused(
    case: str, fakes: Callable[..., FakeVault], tmpfs: Path, workdir: Path
) -> None:
    """requests' get_redirect_target and urljoin raised ValueError on these: exit 70 ("internal error")."""
    fake = fakes(raw_reply(UNPARSABLE_LOCATIONS[case]))
    run = render(workdir, tmpfs / "out", fake.addr)
    assert run.code == 69, run.stderr
    assert "refused a redirect to an address that is not http(s)://host[:port]" in one_error_line(run)
    assert len(fake.seen) == 1


@hostile
@pytest.mark.parametrize("declared", [b"\xb2", b"9" * 5000])
def test_a_content_length_int_cannot_read_is_no_internal_error(
    declared: bytes, fakes: Callable[..., FakeVault], tmpfs: Path, workdir: Path
) -> None:
    """'²'.isdigit() is True but int() refuses it (exit 70): it is dropped, as urllib3 drops it, and the
    body is read up to the cap; 5000 ASCII digits (int() refuses over 4300) are over the cap."""
    value = random_secret("v")
    body = json.dumps(kv2(value)).encode()
    fake = fakes(raw_reply(b"200 X\r\nContent-Type: application/json\r\nContent-Length: " + declared, body))
    run = render(workdir, tmpfs / "out", fake.addr)
    if declared.isdigit():
        assert run.code == 65, run.stderr
        assert "the answer is over 9437184 bytes" in one_error_line(run)
    else:
        assert run.code == 0, run.stderr
        assert (run.out / "k").read_text() == value


@hostile
def test_a_configured_addr_with_userinfo_is_never_logged() -> None:
    """Config refuses userinfo in addr; should one get through, no log line or error quotes it."""
    password = random_secret("pw")
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    cfg = VaultConfig(addr=f"http://user:{password}@127.0.0.1:{port}", startup_timeout=0.3, request_timeout=0.3)
    client = VaultClient(cfg, {"VAULT_TOKEN": random_secret("tok")})
    client.login()
    with pytest.raises(VaultUnavailableError) as caught:
        client.read("secret/data/app/x", "test")
    assert f"vault at http://127.0.0.1:{port} unavailable" in str(caught.value)
    assert_no_leak(str(caught.value) + client.addr, password, "user:")


# -- 2. a slow server defeats startup_timeout ------------------------------------------


def drip(prefix: bytes, drip_byte: bytes = b"a", seconds: float = 60) -> Respond:
    """Send `prefix`, then one byte every 0.2 s: each recv gets data well within any read timeout."""

    def respond(h: QuietHandler) -> None:
        h.wfile.write(prefix)
        h.wfile.flush()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            h.wfile.write(drip_byte)
            h.wfile.flush()
            time.sleep(0.2)

    return respond


DRIP_HEADERS = drip(b"HTTP/1.1 200 OK\r\nX-Slow: ")
DRIP_BODY = drip(
    b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{"data": "', b" "
)


@hostile
@pytest.mark.parametrize(("where", "respond"), [("headers", DRIP_HEADERS), ("body", DRIP_BODY)])
@pytest.mark.parametrize("auth", ["token", "approle"])
def test_a_drip_is_cut_at_startup_timeout(
    where: str, respond: Respond, auth: str, fakes: Callable[..., FakeVault], tmpfs: Path, workdir: Path
) -> None:
    """request_timeout (10 s by default) bounds each recv; a byte every 0.2 s held a start indefinitely."""
    fake = fakes(respond)
    started = time.monotonic()
    run = render(workdir, tmpfs / "out", fake.addr, auth=auth)
    elapsed = time.monotonic() - started
    assert run.code == 69, run.stderr
    assert "timed out" in one_error_line(run)
    assert elapsed < STARTUP + MARGIN, f"the start took {elapsed:.1f} s with startup_timeout = {STARTUP} s"


class HandshakeDrip:
    """A FAKE TLS server (labelled): it opens a TLS record of 16 KiB, then sends one byte every 0.2 s.

    The handshake happens inside connect(). Python's ssl bounds a whole handshake by the socket
    timeout, which the transport sets to the request's budget: a drip there ends at the budget too.
    """

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.sendall(b"\x16\x03\x03\x40\x00")  # handshake record header: 16 KiB to follow
            while not self.closed.wait(0.2):
                conn.sendall(b"\x00")

    def close(self) -> None:
        self.closed.set()
        self.listener.close()


@hostile
def test_a_drip_in_the_tls_handshake_is_cut_at_startup_timeout(tmpfs: Path, workdir: Path) -> None:
    ca = make_test_ca(workdir / "pki")
    server = HandshakeDrip()
    try:
        started = time.monotonic()
        run = render(
            workdir, tmpfs / "out", f"https://127.0.0.1:{server.port}", vault_extra=f'ca_cert = "{ca.ca_cert}"'
        )
        elapsed = time.monotonic() - started
    finally:
        server.close()
    assert run.code == 69, run.stderr
    one_error_line(run)
    assert elapsed < STARTUP + MARGIN, f"the start took {elapsed:.1f} s with startup_timeout = {STARTUP} s"


@hostile
def test_one_request_after_startup_takes_at_most_request_timeout(fakes: Callable[..., FakeVault]) -> None:
    """The renewer's requests: a drip is cut at request_timeout, and the client's lock is free again."""
    fake = fakes(DRIP_BODY)
    limit = 1.0
    client = VaultClient(VaultConfig(addr=fake.addr, request_timeout=limit), {"VAULT_TOKEN": random_secret("tok")})
    client.login()
    client.end_startup()
    outcome: list[BaseException] = []

    def renew() -> None:
        try:
            client.renew_token(60)
        except BaseException as e:
            outcome.append(e)

    started = time.monotonic()
    renewer = threading.Thread(target=renew, daemon=True)
    renewer.start()
    time.sleep(0.2)
    assert client._lock.acquire(timeout=limit + MARGIN), "the drip held the client's lock"
    client._lock.release()
    renewer.join(MARGIN)
    assert time.monotonic() - started < limit + MARGIN
    assert len(outcome) == 1 and isinstance(outcome[0], VaultUnavailableError)
    assert "timed out" in str(outcome[0])


# -- 3. malformed answers ------------------------------------------------------------------


def planted() -> str:
    return random_secret("planted")


def lease(**fields: Any) -> dict[str, Any]:
    """A dynamic-secret read with a lease, `fields` overriding the lease's."""
    answer = {"data": {"k": planted()}, "lease_id": "database/creds/x/abc", "lease_duration": 60, "renewable": True}
    return {**answer, **fields}


NAN = b'{"data": {"k": "v"}, "lease_id": "l/1", "lease_duration": NaN, "renewable": true}'
INF = b'{"data": {"k": "v"}, "lease_id": "l/1", "lease_duration": Infinity, "renewable": true}'
READS: dict[str, tuple[Respond, int, str]] = {
    "broken JSON": (
        lambda h: reply(h, 200, b'{"data": {"k": "v"', ("Content-Type: application/json",)),
        65,
        "malformed answer",
    ),
    "204 no body": (lambda h: reply(h, 204), 65, "malformed answer"),
    "JSON list": (json_reply([1, 2]), 65, "malformed answer"),
    "JSON null": (json_reply(None), 65, "malformed answer"),
    "JSON string": (json_reply("x"), 65, "malformed answer"),
    "data is a list": (json_reply({"data": ["x"]}), 65, "malformed answer"),
    "lease_duration string": (json_reply(lease(lease_duration="3600")), 65, "malformed answer"),
    "lease_duration NaN": (json_reply(NAN), 65, "malformed answer"),
    "lease_duration Infinity": (json_reply(INF), 65, "malformed answer"),
    "lease_duration negative": (json_reply(lease(lease_duration=-1)), 65, "malformed answer"),
    "lease_duration bool": (json_reply(lease(lease_duration=True)), 65, "malformed answer"),
    "lease_duration 1e300": (json_reply(lease(lease_duration=1e300)), 65, "malformed answer"),
    "lease_duration huge int": (json_reply(lease(lease_duration=10**400)), 65, "malformed answer"),
    "renewable string": (json_reply(lease(renewable="yes")), 65, "malformed answer"),
    "lease_id number": (json_reply(lease(lease_id=7)), 65, "malformed answer"),
    "warnings not a list": (json_reply({**kv2("v"), "warnings": 5}), 65, "malformed answer"),
    "lease_id 513 characters": (json_reply(lease(lease_id="l/" + "a" * 511)), 65, "lease_id is over 512 characters"),
    "lease_id with ESC": (json_reply(lease(lease_id="l/1\x1b[2J")), 65, "outside printable ASCII"),
    "lease_id with a newline": (json_reply(lease(lease_id="l/1\nforged log line")), 65, "outside printable ASCII"),
    "lease_id with U+202E": (json_reply(lease(lease_id="l/1\u202e")), 65, "outside printable ASCII"),
    "nested 200 deep": (json_reply(b'{"data": {"k": ' + b"[" * 200 + b"]" * 200 + b"}}"), 65, "malformed answer"),
    "nested 100000 deep": (
        json_reply(b'{"data": {"k": ' + b"[" * 100000 + b"]" * 100000 + b"}}"),
        65,
        "malformed answer",
    ),
    "not UTF-8": (json_reply(b'{"data": {"k": "\xff\xfe"}}'), 65, "malformed answer"),
    "302 without Location": (lambda h: reply(h, 302), 65, "malformed answer"),
    "206 partial": (json_reply(kv2("v"), 206), 65, "malformed answer"),
    "400 errors not a list": (json_reply({"errors": 5}, 400), 65, "rejected: HTTP 400"),
    "404 JSON null": (json_reply(None, 404), 66, "no secret at this path (HTTP 404"),
    "403 errors of objects": (json_reply({"errors": [{"a": 1}]}, 403), 77, "denied: HTTP 403"),
    "500 JSON list": (json_reply([1], 500), 69, "unavailable"),
}


@hostile
@pytest.mark.parametrize("case", list(READS))
def test_a_malformed_read_answer_is_a_clear_error(
    case: str, fakes: Callable[..., FakeVault], tmpfs: Path, workdir: Path
) -> None:
    respond, code, text = READS[case]
    run = render(workdir, tmpfs / "out", fakes(respond).addr, vault_extra='request_timeout = "1s"')
    assert run.code == code, run.stderr
    error = one_error_line(run)
    assert text in error
    assert "HTTP 404" not in error or code == 66  # a body of null was reported as a 404


@hostile
def test_warnings_are_logged_few_short_and_printable(
    fakes: Callable[..., FakeVault], tmpfs: Path, workdir: Path
) -> None:
    """A read's warnings went to the log whole: 50 of 10,000 characters each, escapes and newlines in them."""
    value = random_secret("v")
    warnings = [f"w{i}\x1b[2J\u202e\n" + "x" * 10_000 for i in range(50)]
    run = render(workdir, tmpfs / "out", fakes(json_reply({**kv2(value), "warnings": warnings})).addr)
    assert run.code == 0, run.stderr
    assert (run.out / "k").read_text() == value
    logged = [str(e["warning"]) for e in log_events(run.stderr) if e["event"] == "vault warning"]
    assert len(logged) == 10
    assert all(len(w) <= 200 and w.isprintable() for w in logged), logged
    assert logged[0].startswith("w0?[2J??xxx")


@hostile
@pytest.mark.parametrize("status", [400, 403, 404, 500, 504])
def test_an_error_body_is_not_quoted(status: int, fakes: Callable[..., FakeVault], tmpfs: Path, workdir: Path) -> None:
    """Found by the fuzz: the raw body of an error status was quoted, and it may hold anything, a secret too."""
    value = planted()
    html = f"<html>proxy error {value}</html>".encode()
    for body, kind in [(json.dumps(kv2(value)).encode(), "application/json"), (html, "text/html")]:
        fake = fakes(lambda h, body=body, kind=kind: reply(h, status, body, (f"Content-Type: {kind}",)))
        run = render(workdir, tmpfs / "out", fake.addr, startup=1.0)
        assert run.code in (65, 66, 69, 77), run.stderr
        assert f"no Vault errors in a {len(body)}-byte {kind} body" in one_error_line(run)
        assert_no_leak(run.stderr, value)


def approle(auth: Any) -> Respond:
    def respond(h: QuietHandler) -> None:
        if h.path.endswith("/login"):
            json_reply({"auth": auth} if not isinstance(auth, bytes) else auth)(h)
        else:
            catcher_reply(h)

    return respond


LOGINS: dict[str, Respond] = {
    "client_token number": approle({"client_token": 12345, "lease_duration": 60, "renewable": True}),
    "client_token empty": approle({"client_token": "", "lease_duration": 60, "renewable": True}),
    "auth null": approle(None),
    "auth a list": approle(["x"]),
    "lease_duration string": approle({"client_token": "t" * 20, "lease_duration": "60", "renewable": True}),
    "renewable number": approle({"client_token": "t" * 20, "lease_duration": 60, "renewable": 1}),
    "body a list": approle(b"[]"),
    "body broken": approle(b'{"auth": '),
}


@hostile
@pytest.mark.parametrize("case", list(LOGINS))
def test_a_malformed_login_answer_is_a_clear_error(
    case: str, fakes: Callable[..., FakeVault], tmpfs: Path, workdir: Path
) -> None:
    fake = fakes(LOGINS[case])
    run = render(workdir, tmpfs / "out", fake.addr, auth="approle")
    assert run.code == 65, run.stderr
    assert "malformed answer" in one_error_line(run)
    assert [s.path for s in fake.seen] == ["/v1/auth/approle/login"]  # no read with a token that is not one


RENEWALS: dict[str, tuple[str, Any]] = {
    "lease renew: lease_duration string": ("renew_lease", {"lease_duration": "60"}),
    "lease renew: 204": ("renew_lease", None),
    "lease renew: list": ("renew_lease", []),
    "token renew: auth null": ("renew_token", {"auth": None}),
    "token renew: lease_duration NaN": ("renew_token", b'{"auth": {"lease_duration": NaN}}'),
    "lookup-self: data a string": ("token_info", {"data": "x"}),
    "lookup-self: ttl bool": ("token_info", {"data": {"ttl": True, "renewable": True}}),
    "lookup-self: renewable string": ("token_info", {"data": {"ttl": 60, "renewable": "true"}}),
    "lookup-self: creation_ttl inf": ("token_info", b'{"data": {"ttl": 60, "renewable": true, "creation_ttl": 1e999}}'),
    "capabilities: a path's a string": ("capabilities", {"secret/x": "read"}),
    "capabilities: data a list": ("capabilities", {"data": ["read"]}),
    "probe: lease_duration -5": ("probe_lease", {"lease_duration": -5}),
}


@hostile
@pytest.mark.parametrize("case", list(RENEWALS))
def test_a_malformed_renewal_answer_is_a_data_error(case: str, fakes: Callable[..., FakeVault]) -> None:
    """The renewer's and check's requests, in-process: DataError (65), never another exception."""
    method, doc = RENEWALS[case]
    fake = fakes(lambda h: reply(h, 204) if doc is None else json_reply(doc)(h))
    client = VaultClient(VaultConfig(addr=fake.addr, request_timeout=1.0), {"VAULT_TOKEN": random_secret("tok")})
    client.login()
    client.end_startup()
    calls: dict[str, Callable[[], object]] = {
        "renew_lease": lambda: client.renew_lease("l/1", 60),
        "renew_token": lambda: client.renew_token(60),
        "token_info": client.token_info,
        "capabilities": lambda: client.capabilities(["secret/x"]),
        "probe_lease": lambda: client.probe_lease("l/1", 60),
    }
    with pytest.raises(DataError, match="malformed answer") as caught:
        calls[method]()
    assert caught.value.exit_code == 65
    assert "\n" not in str(caught.value)


# -- 4. huge answers ---------------------------------------------------------------------------


def huge_chunked(h: QuietHandler) -> None:
    """200 MiB of one JSON string, chunked, from one 1 MiB block (never built whole)."""
    block = b"a" * MIB
    h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    for chunk in [b'{"data": {"k": "', *[block] * 200, b'"}}']:
        h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    h.wfile.write(b"0\r\n\r\n")


def huge_declared(h: QuietHandler) -> None:
    """Content-Length: 200 MiB, then the body at a trickle: a client that reads it first would hang."""
    h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (200 * MIB))
    drip(b'{"data": {"k": "', seconds=20)(h)


def gzip_bomb(h: QuietHandler) -> None:
    """200 MiB that gzip makes ~200 KiB, sent as Content-Encoding: gzip though identity was asked for."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [packer.compress(b'{"data": {"k": "')]
    block = b"a" * MIB
    parts += [packer.compress(block) for _ in range(200)]
    parts += [packer.compress(b'"}}'), packer.flush()]
    body = b"".join(parts)
    reply(h, 200, body, ("Content-Type: application/json", "Content-Encoding: gzip"))


class Measured(NamedTuple):
    code: int
    stderr: str
    peak_rss_mib: float
    seconds: float


# wait4's ru_maxrss of a child counts the memory of the process it was forked from (Linux keeps
# the high-water mark across fork and exec): a child of a big pytest process would report pytest's
# size. So a small interpreter starts secret-init and reports its peak alone.
MEASURE = r"""
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def render_measured(workdir: Path, out: Path, addr: str) -> Measured:
    """Like render(), but with the secret-init process's own peak RSS."""
    cfg = write_config(
        workdir,
        f'[output]\ndir = "{out}"\nuser = "65534:65534"\n[vault]\naddr = "{addr}"\nstartup_timeout = "{STARTUP:g}s"\n'
        '[[secret]]\nname = "k"\nsource = "vault:secret/data/app/x#k"\n',
    )
    token = random_secret("tok")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, sys.executable, "-m", "secret_init", "render", "--config", str(cfg)],
        env=base_env(VAULT_TOKEN=token), cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    seconds = time.monotonic() - started
    code, max_rss_kib = (int(x) for x in result.stdout.split())
    record_output(result.stderr, "render_measured stderr")
    assert_no_leak(result.stderr, token)
    return Measured(code, result.stderr, max_rss_kib / 1024, seconds)


@hostile
@pytest.mark.parametrize(
    ("case", "respond"), [("chunked", huge_chunked), ("declared", huge_declared), ("gzip", gzip_bomb)]
)
def test_a_huge_answer_is_refused_before_it_is_parsed(
    case: str, respond: Respond, fakes: Callable[..., FakeVault], tmpfs: Path, workdir: Path
) -> None:
    """200 MiB reached 1.2 GB RSS before max_secret_size was checked; the cap is 8 x 1 MiB + 1 MiB."""
    fake = fakes(respond)
    run = render_measured(workdir, tmpfs / "out", fake.addr)
    assert run.code == 65, run.stderr
    assert "the answer is over 9437184 bytes" in one_error_line(Run(run.code, run.stderr, tmpfs / "out"))
    print(f"\nhuge answer ({case}): exit {run.code} in {run.seconds:.1f} s, peak RSS {run.peak_rss_mib:.0f} MiB")
    record_figure("huge answers", case, code=run.code, seconds=round(run.seconds, 2), rss_mib=round(run.peak_rss_mib))
    assert run.peak_rss_mib < 150, f"peak RSS {run.peak_rss_mib:.0f} MiB for a refused 200 MiB answer"
    assert fake.seen[0].headers.get("Accept-Encoding") == "identity"
    if case == "declared":
        assert run.seconds < STARTUP, "a Content-Length over the cap is refused without reading"


# -- a real OpenBao's answers pass every check ---------------------------------------------------------


def test_real_openbao_answers_pass_validation(bao: Bao, workdir: Path) -> None:
    """Login, KV v2 read, token lookup/probe/renewal, capabilities and revoke against the real server."""
    value = random_secret("real")
    bao.client.secrets.kv.v2.create_or_update_secret(path="app/hostile-real", secret={"k": value})
    role_file, secret_file, _ = bao.approle_credentials("app", workdir)
    cfg = VaultConfig(
        addr=bao.addr, auth="approle", role_id_file=str(role_file), secret_id_file=str(secret_file), startup_timeout=5.0
    )
    client = VaultClient(cfg, {})
    client.login()
    secret = client.read("secret/data/app/hostile-real", "test", 1024)
    assert secret.fields == {"k": value}
    info = client.token_info()
    assert 0 < info.ttl <= 60 and info.renewable and 60 <= info.max_remaining <= 120
    assert 0 < client.renew_token(60) <= 60
    caps = client.capabilities(["secret/data/app/hostile-real", "secret/data/forbidden/x"])
    assert caps == {"secret/data/app/hostile-real": ["read"], "secret/data/forbidden/x": ["deny"]}
    client.revoke_own_token()
    assert not client.owns_token
    with pytest.raises(SecretInitError):
        client.read("secret/data/app/hostile-real", "after revoke")
    register_secret(value)
