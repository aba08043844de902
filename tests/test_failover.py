"""Several Vault addresses at the client level: failover, redirects, sys/leader, and the addr list's config.

The real OpenBao is the session's `bao` dev server (and PostgreSQL behind its database engine for the
resident run). Every other server here is a LABELLED STAND-IN (`StandIn`), a plain HTTP server on
127.0.0.1: a real OpenBao cannot be made, on demand, to answer 503 "Vault is sealed", 429, 502, 504 or a
500 about the active node, to answer a 307 to a chosen address, to name a chosen `leader_address` in
sys/leader, or to take a login and never answer it; those answers are exactly what is under test. A
"refused" address is a loopback port bound and closed again: a real connection refusal.

Each test asserts the exit code, the log events ("vault failover" with `failed`/`next`, "vault active
node" with `learned`, "vault login" with `addr`) and what each stand-in received, and searches the
output for every credential and secret value it used (all generated here and registered for the
session's leak hunt).
"""

import collections
import contextlib
import json
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from tests.conftest import (
    Bao,
    Database,
    QuietHandler,
    UnixUser,
    assert_no_leak,
    base_env,
    log_events,
    needs_root,
    random_secret,
    register_secret,
    run_cli,
    write_config,
)
from tests.test_leases import Run

pytestmark = needs_root

LOGIN = "POST /v1/auth/approle/login"
LEADER = "GET /v1/sys/leader"
AUDIT_DEVICE = "file"  # conftest's start_bao declares `audit "file" "file"`


# -- the labelled stand-in ---------------------------------------------------------------


class Seen(NamedTuple):
    method: str
    path: str
    headers: dict[str, str]  # a token, in X-Vault-Token
    body: bytes  # a login's secret_id

    def __repr__(self) -> str:  # an assertion message shows the request, never its credentials
        return f"Seen({self.kind!r})"

    @property
    def kind(self) -> str:
        return f"{self.method} {self.path}"


class Answer(NamedTuple):
    status: int
    body: bytes = b""
    headers: tuple[str, ...] = ()


HANG = None  # an answer that never comes: the stand-in reads the request and waits until it is closed
Respond = Callable[[Seen], Answer | None]


class StandIn:
    """A STAND-IN Vault node (labelled fake, see the module docstring) on 127.0.0.1.

    `respond` picks the answer to each request; every request that reaches it is recorded, so a
    stand-in that must receive nothing proves that nothing reached it.
    """

    def __init__(self, respond: Respond) -> None:
        self.seen: list[Seen] = []
        self._released = threading.Event()
        stand_in = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                seen = Seen(self.command, self.path, dict(self.headers), self.rfile.read(length) if length else b"")
                stand_in.seen.append(seen)
                self.close_connection = True
                answer = respond(seen)
                if answer is HANG:
                    stand_in._released.wait(60)
                    return
                head = [f"HTTP/1.1 {answer.status} X", *answer.headers, f"Content-Length: {len(answer.body)}"]
                with contextlib.suppress(OSError):  # the client may have hung up already
                    self.wfile.write(("\r\n".join([*head, "Connection: close"]) + "\r\n\r\n").encode() + answer.body)

            do_GET = do_POST = do_PUT = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.addr = f"http://127.0.0.1:{self.server.server_address[1]}"

    def kinds(self) -> list[str]:
        return [s.kind for s in self.seen]

    def close(self) -> None:
        self._released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_in() -> Iterator[Callable[[Respond], StandIn]]:
    made: list[StandIn] = []

    def make(respond: Respond) -> StandIn:
        made.append(StandIn(respond))
        return made[-1]

    yield make
    for server in made:
        server.close()


def errors(status: int, *messages: str) -> Answer:
    return Answer(status, json.dumps({"errors": list(messages)}).encode(), ("Content-Type: application/json",))


def leader(addr: str) -> Answer:
    """sys/leader as a standby answers it: HA on, not itself the leader, the leader at `addr`."""
    doc = {"ha_enabled": True, "is_self": False, "leader_address": addr, "leader_cluster_address": "",
           "performance_standby": False}  # fmt: skip
    return Answer(200, json.dumps(doc).encode(), ("Content-Type: application/json",))


def redirect(to: str) -> Respond:
    return lambda seen: Answer(307, b"", (f"Location: {to}{seen.path}",))


def refused_addr() -> str:
    """A loopback port bound and closed again: connecting to it is refused, for real."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# -- running render against a list of addresses --------------------------------------------


class Kv(NamedTuple):
    path: str  # vault:PATH#k
    value: str


@pytest.fixture
def kv(bao: Bao) -> Kv:
    return kv_secret(bao)


def kv_secret(bao: Bao) -> Kv:
    """A fresh KV v2 secret the app-read policy may read."""
    key = secrets.token_hex(6)
    value = random_secret("kv")
    bao.client.secrets.kv.v2.create_or_update_secret(path=f"app/{key}", secret={"k": value})
    return Kv(f"secret/data/app/{key}", value)


class Result(NamedTuple):
    code: int
    stderr: str
    events: list[dict[str, Any]]
    out: Path
    credentials: tuple[str, ...]

    def logged(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]

    def failovers(self) -> list[tuple[str, str]]:
        return [(e["failed"], e["next"]) for e in self.logged("vault failover")]

    def error(self) -> str:
        """The run's one error line."""
        found = [e for e in self.events if e["level"] == "error"]
        assert len(found) == 1, self.stderr
        assert found[0].get("exit_code") == self.code
        message = str(found[0]["event"])
        assert "\n" not in message and "Traceback" not in self.stderr
        return message


def toml_list(addrs: list[str]) -> str:
    return "[" + ", ".join(json.dumps(a) for a in addrs) + "]"


def render(
    bao: Bao,
    kv: Kv,
    workdir: Path,
    out: Path,
    addrs: list[str],
    auth: str = "approle",
    startup: str = "5s",
    request: str = "2s",
    env: dict[str, str] | None = None,
) -> Result:
    """`secret-init render` of vault:<kv>#k from `addrs`, as a real process; credentials searched in its output.
    The value must land in `out` when the run succeeds. `env`: more variables for it (a proxy, say)."""
    if auth == "approle":
        role_file, secret_file, secret_id = bao.approle_credentials("app", workdir)
        auth_toml = f'auth = "approle"\nrole_id_file = "{role_file}"\nsecret_id_file = "{secret_file}"\n'
        credentials: tuple[str, ...] = (role_file.read_text(), secret_id)
        environ = base_env(**(env or {}))
    else:
        token = register_secret(bao.client.auth.token.create(policies=["app-read"], ttl="60s")["auth"]["client_token"])
        auth_toml, credentials = 'auth = "token"\n', (token,)
        environ = base_env(VAULT_TOKEN=token, **(env or {}))
    cfg = write_config(
        workdir,
        f'[output]\ndir = "{out}"\nuser = "65534:65534"\n'
        f'[vault]\naddr = {toml_list(addrs)}\n{auth_toml}startup_timeout = "{startup}"\nrequest_timeout = "{request}"\n'
        f'[[secret]]\nname = "k"\nsource = "vault:{kv.path}#k"\n',
    )
    result = run_cli("render", "--config", str(cfg), env=environ)
    assert_no_leak(result.stdout + result.stderr, kv.value, *credentials)
    assert "Traceback" not in result.stderr
    if result.returncode == 0:
        assert (out / "k").read_text() == kv.value
    return Result(result.returncode, result.stderr, log_events(result.stderr), out, credentials)


def assert_rendered(run: Result, kv: Kv, real: str) -> None:
    assert run.code == 0, run.stderr
    assert (run.out / "k").read_text() == kv.value
    logins = run.logged("vault login")
    assert logins and all(e["addr"] == real for e in logins), run.stderr


def logins_since(bao: Bao, before: int) -> int:
    """AppRole logins the real OpenBao received (its audit log) since entry `before`."""
    entries = bao.audit_entries()[before:]
    return sum(1 for e in entries if e.get("type") == "request" and e["request"].get("path") == "auth/approle/login")


# -- 1. a refused address -----------------------------------------------------------------


@pytest.mark.hostile("faults")
def test_a_refused_first_address_fails_over_to_the_real_one(bao: Bao, kv: Kv, tmpfs: Path, workdir: Path) -> None:
    refused = refused_addr()
    run = render(bao, kv, workdir, tmpfs / "out", [refused, bao.addr])
    assert_rendered(run, kv, bao.addr)
    failovers = run.logged("vault failover")
    assert len(failovers) == 1, run.stderr
    assert failovers[0]["failed"] == refused and failovers[0]["next"] == bao.addr
    assert failovers[0]["level"] == "warning" and "login" in failovers[0]["request"]
    assert "refused" in failovers[0]["error"].lower()
    assert run.logged("vault request failed, retrying") == [], "a dead node costs no retry"


# -- 2. answers that say "this node cannot serve" -----------------------------------------------


CANNOT_SERVE = {
    "503 sealed": errors(503, "Vault is sealed"),
    "429": errors(429, "request rate limit exceeded"),
    "502": Answer(502, b"<html>bad gateway</html>", ("Content-Type: text/html",)),
    "504": Answer(504, b"<html>gateway timeout</html>", ("Content-Type: text/html",)),
    "500 no active node": errors(500, "local node not active but active cluster node not found"),
}


@pytest.mark.hostile("faults")
@pytest.mark.parametrize("case", list(CANNOT_SERVE))
def test_a_node_that_cannot_serve_is_left_at_once(
    case: str, bao: Bao, kv: Kv, stand_in: Callable[[Respond], StandIn], tmpfs: Path, workdir: Path
) -> None:
    answer = CANNOT_SERVE[case]
    node = stand_in(lambda seen: answer)
    run = render(bao, kv, workdir, tmpfs / "out", [node.addr, bao.addr])
    assert_rendered(run, kv, bao.addr)
    # sys/leader (asked first, a hint: its failure is not a failover) and the login, once each: no retry burned.
    assert collections.Counter(node.kinds()) == {LEADER: 1, LOGIN: 1}, node.kinds()
    failovers = run.logged("vault failover")
    assert len(failovers) == 1, run.stderr
    assert failovers[0]["failed"] == node.addr and failovers[0]["next"] == bao.addr
    assert f"HTTP {answer.status}" in failovers[0]["error"]
    assert run.logged("vault request failed, retrying") == []


NOT_A_FAILOVER = {
    "500 internal error": (errors(500, "internal error"), 69),
    "403": (errors(403, "permission denied"), 77),
}


@pytest.mark.hostile("faults")
@pytest.mark.parametrize("case", list(NOT_A_FAILOVER))
def test_other_errors_do_not_fail_over(
    case: str, bao: Bao, kv: Kv, stand_in: Callable[[Respond], StandIn], tmpfs: Path, workdir: Path
) -> None:
    """A 500 about something else, or a refusal, says nothing about the other nodes: exit codes as with one address."""
    answer, code = NOT_A_FAILOVER[case]
    node = stand_in(lambda seen: answer)
    before = len(bao.audit_entries())
    run = render(bao, kv, workdir, tmpfs / "out", [node.addr, bao.addr], startup="2s")
    assert run.code == code, run.stderr
    error = run.error()
    assert f"HTTP {answer.status}" in error and node.addr in error
    assert run.logged("vault failover") == [] and run.logged("vault login") == []
    assert logins_since(bao, before) == 0, "the second address was never tried"
    logins = node.kinds().count(LOGIN)
    if code == 69:
        assert "internal error" in error
        assert logins >= 2, "retried (on the same node) until startup_timeout"
    else:
        assert "denied" in error
        assert logins == 1, "a refusal is final"
    assert not (run.out / "k").exists()


# -- 3. redirects ----------------------------------------------------------------------------


@pytest.mark.hostile("vault-answers")
@pytest.mark.parametrize("leader_status", ["redirected", "503"])
def test_a_redirect_to_a_configured_address_is_followed_and_remembered(
    leader_status: str, bao: Bao, kv: Kv, stand_in: Callable[[Respond], StandIn], tmpfs: Path, workdir: Path
) -> None:
    """A standby that sends clients to the active node with a 307: followed, and the next requests go there.

    `leader_status`: whether the stand-in redirects sys/leader too, or answers it 503 (so that the
    login is the first request redirected). With "redirected" the switch happens inside the client's
    sys/leader question; it must be logged as any other (found failing when this test was written:
    _ask_leader compared the active address only after its own request).
    """
    to_bao = redirect(bao.addr)

    def respond(seen: Seen) -> Answer | None:
        if seen.kind == LEADER and leader_status == "503":
            return errors(503, "Vault is sealed")
        return to_bao(seen)

    node = stand_in(respond)
    run = render(bao, kv, workdir, tmpfs / "out", [node.addr, bao.addr])
    assert_rendered(run, kv, bao.addr)
    # One request redirected (sys/leader, or the login after a 503 to sys/leader); every later one goes straight
    # to the real node: the AppRole login (or the read) and the token's revoke never reach the stand-in again.
    assert node.kinds() == ([LEADER] if leader_status == "redirected" else [LEADER, LOGIN]), node.kinds()
    assert run.logged("vault failover") == []
    active = run.logged("vault active node")
    assert [(e["addr"], e["learned"]) for e in active] == [(bao.addr, "redirect")], run.stderr


@pytest.mark.hostile("vault-answers")
def test_a_redirect_to_an_address_not_configured_is_refused(
    bao: Bao, kv: Kv, stand_in: Callable[[Respond], StandIn], tmpfs: Path, workdir: Path
) -> None:
    """Nothing reaches the target (it records any request), the token least of all: 69, one line saying why."""
    catcher = stand_in(lambda seen: Answer(200, b"{}", ("Content-Type: application/json",)))
    node = stand_in(redirect(catcher.addr))
    run = render(bao, kv, workdir, tmpfs / "out", [node.addr, bao.addr], auth="token")
    assert run.code == 69, run.stderr
    error = run.error()
    assert f"refused a redirect to {catcher.addr}" in error
    assert "redirects are followed only to the configured addresses" in error
    assert catcher.seen == []
    (token,) = run.credentials
    assert any(s.headers.get("X-Vault-Token") == token for s in node.seen), "the token was in play"
    assert node.kinds().count(f"GET /v1/{kv.path}") == 1, "refused at once, not retried"
    assert not (run.out / "k").exists()


# -- 4. sys/leader ---------------------------------------------------------------------------------


@pytest.mark.hostile("vault-answers")
def test_sys_leader_naming_a_configured_address_sends_every_request_there(
    bao: Bao, kv: Kv, stand_in: Callable[[Respond], StandIn], tmpfs: Path, workdir: Path
) -> None:
    node = stand_in(lambda seen: leader(bao.addr) if seen.kind == LEADER else errors(503, "Vault is sealed"))
    run = render(bao, kv, workdir, tmpfs / "out", [node.addr, bao.addr])
    assert_rendered(run, kv, bao.addr)
    assert node.kinds() == [LEADER], "asked first, and only that"
    active = run.logged("vault active node")
    assert [(e["addr"], e["learned"]) for e in active] == [(bao.addr, "sys/leader")], run.stderr
    assert run.logged("vault failover") == []


@pytest.mark.hostile("vault-answers")
def test_sys_leader_naming_an_address_not_configured_is_ignored(
    bao: Bao, kv: Kv, stand_in: Callable[[Respond], StandIn], tmpfs: Path, workdir: Path
) -> None:
    elsewhere = stand_in(lambda seen: Answer(200, b"{}", ("Content-Type: application/json",)))
    node = stand_in(lambda seen: leader(elsewhere.addr) if seen.kind == LEADER else errors(503, "Vault is sealed"))
    run = render(bao, kv, workdir, tmpfs / "out", [node.addr, bao.addr])
    assert_rendered(run, kv, bao.addr)
    assert elsewhere.seen == [], "nothing is sent to an address that is not configured"
    assert collections.Counter(node.kinds()) == {LEADER: 1, LOGIN: 1}, node.kinds()
    failovers = run.logged("vault failover")
    assert [(e["failed"], e["next"]) for e in failovers] == [(node.addr, bao.addr)], run.stderr
    assert all(e["addr"] != elsewhere.addr for e in run.logged("vault active node"))


# -- 5. a request whose answer never comes ----------------------------------------------------


def hang_after_leader(seen: Seen) -> Answer | None:
    """sys/leader 503 at once; every other request taken and never answered."""
    return errors(503, "Vault is sealed") if seen.kind == LEADER else HANG


@pytest.mark.hostile("faults")
def test_a_login_that_timed_out_is_not_sent_to_the_next_address(
    bao: Bao, kv: Kv, stand_in: Callable[[Respond], StandIn], tmpfs: Path, workdir: Path
) -> None:
    """The first node may have served it and spent a single-use secret_id: 69, one login in all."""
    node = stand_in(hang_after_leader)
    before = len(bao.audit_entries())
    run = render(bao, kv, workdir, tmpfs / "out", [node.addr, bao.addr], startup="3s", request="1s")
    assert run.code == 69, run.stderr
    error = run.error()
    assert "timed out" in error and node.addr in error
    assert node.kinds().count(LOGIN) == 1
    _role_id, secret_id = run.credentials
    assert json.loads(node.seen[node.kinds().index(LOGIN)].body)["secret_id"] == secret_id
    assert logins_since(bao, before) == 0, "the login was not resent to the real node"
    assert run.logged("vault failover") == []
    assert not (run.out / "k").exists()


@pytest.mark.hostile("faults")
def test_a_read_that_timed_out_is_sent_to_the_next_address(
    bao: Bao, kv: Kv, stand_in: Callable[[Respond], StandIn], tmpfs: Path, workdir: Path
) -> None:
    node = stand_in(hang_after_leader)
    run = render(bao, kv, workdir, tmpfs / "out", [node.addr, bao.addr], auth="token", request="1s")
    assert run.code == 0, run.stderr
    assert (run.out / "k").read_text() == kv.value
    read = f"GET /v1/{kv.path}"
    assert node.kinds() == [LEADER, read], "one read on the silent node, then none"
    failovers = run.logged("vault failover")
    assert [(e["failed"], e["next"]) for e in failovers] == [(node.addr, bao.addr)], run.stderr
    assert "timed out" in failovers[0]["error"] and kv.path in failovers[0]["request"]


# -- 6. the list in the config ----------------------------------------------------------------------


BAD_LISTS = {
    "nine": ([f"http://127.0.0.1:{8200 + i}" for i in range(9)], "1 to 8"),
    "duplicate": (["http://127.0.0.1:8200", "http://127.0.0.1:8201", "http://127.0.0.1:8200"], "twice"),
    "mixed schemes": (["https://127.0.0.1:8200", "http://127.0.0.1:8201"], "mixes"),
    "empty item": (["http://127.0.0.1:8200", ""], "empty"),
    "empty list": ([], "1 to 8"),
}


@pytest.mark.hostile("config")
@pytest.mark.parametrize("case", list(BAD_LISTS))
def test_a_bad_address_list_is_78(case: str, tmpfs: Path, workdir: Path) -> None:
    addrs, reason = BAD_LISTS[case]
    token = random_secret("tok")
    cfg = write_config(
        workdir,
        f'[output]\ndir = "{tmpfs}/out"\n[vault]\naddr = {toml_list(addrs)}\n'
        '[[secret]]\nname = "k"\nsource = "vault:secret/data/app/x#k"\n',
    )
    result = run_cli("render", "--config", str(cfg), env=base_env(VAULT_TOKEN=token))
    assert result.returncode == 78, result.stderr
    message = config_error(result.stderr)
    assert "addr" in message and reason in message, message
    assert_no_leak(result.stdout + result.stderr, token)


@pytest.mark.hostile("config")
def test_an_address_with_a_password_in_the_list_is_78_and_not_echoed(tmpfs: Path, workdir: Path) -> None:
    password = random_secret("pw")
    addrs = ["http://127.0.0.1:8200", f"http://admin:{password}@127.0.0.1:8201"]
    cfg = write_config(
        workdir,
        f'[output]\ndir = "{tmpfs}/out"\n[vault]\naddr = {toml_list(addrs)}\n'
        '[[secret]]\nname = "k"\nsource = "vault:secret/data/app/x#k"\n',
    )
    result = run_cli("render", "--config", str(cfg), env=base_env(VAULT_TOKEN=random_secret("tok")))
    assert result.returncode == 78, result.stderr
    message = config_error(result.stderr)
    assert "addr" in message and "#2" in message and "password" in message, message
    assert_no_leak(result.stdout + result.stderr, password)
    assert "admin" not in result.stdout + result.stderr


@pytest.mark.hostile("config")
def test_cert_auth_with_a_plain_http_address_in_the_list_is_78(tmpfs: Path, workdir: Path) -> None:
    (workdir / "client.pem").write_text("not read: the config is refused first\n")
    (workdir / "client.key").write_text("not read either\n")
    cfg = write_config(
        workdir,
        f'[output]\ndir = "{tmpfs}/out"\n[vault]\naddr = ["http://127.0.0.1:8200", "http://127.0.0.1:8201"]\n'
        f'auth = "cert"\nclient_cert = "{workdir}/client.pem"\nclient_key = "{workdir}/client.key"\n'
        '[[secret]]\nname = "k"\nsource = "vault:secret/data/app/x#k"\n',
    )
    result = run_cli("render", "--config", str(cfg))
    assert result.returncode == 78, result.stderr
    message = config_error(result.stderr)
    assert "addr" in message and "https://" in message and "cert" in message, message


def config_error(stderr: str) -> str:
    """The one error line of a refused config (exit 78), no traceback."""
    assert "Traceback" not in stderr
    found = [e for e in log_events(stderr) if e["level"] == "error"]
    assert len(found) == 1, stderr
    assert found[0].get("exit_code") == 78
    message = str(found[0]["event"])
    assert "\n" not in message
    return message


# -- 7. a resident secret-init keeps to the node that answered -------------------------------------------


@pytest.mark.hostile("faults")
def test_renewals_go_to_the_address_that_answered(
    database: Database, tmpfs: Path, workdir: Path, app_user: UnixUser
) -> None:
    """A sidecar with [refused, real]: one failover at the start, then every renewal on the real node, none back."""
    bao = database.bao
    creds = database.role("3s", "60s")
    role_file, secret_file, secret_id = bao.approle_credentials("app", workdir)
    refused = refused_addr()
    cfg = write_config(
        workdir,
        f"""
[output]
dir = "{tmpfs}/out"
user = "{app_user.name}"

[vault]
addr = {toml_list([refused, bao.addr])}
auth = "approle"
role_id_file = "{role_file}"
secret_id_file = "{secret_file}"
request_timeout = "1s"

[[secret]]
name = "db.json"
source = "vault:{creds}"
""",
    )
    before = len(bao.audit_entries())
    sidecar = Run(cfg, None)
    try:
        sidecar.until(lambda r: len(r.logged("lease renewed")) >= 3, 30)
    finally:
        code = sidecar.finish()
    assert code == 0, sidecar.stderr[-3000:]
    issued = json.loads((tmpfs / "out" / "db.json").read_text())
    register_secret(issued["password"], "database password")
    assert_no_leak(sidecar.stdout + sidecar.stderr, issued["password"], secret_id, role_file.read_text())
    assert "Traceback" not in sidecar.stderr

    names = [e["event"] for e in sidecar.logs]
    failovers = sidecar.logged("vault failover")
    assert len(failovers) == 1, sidecar.stderr[-3000:]
    assert failovers[0]["failed"] == refused and failovers[0]["next"] == bao.addr
    assert names.index("vault failover") < names.index("vault login") < names.index("lease renewed")
    assert [e["addr"] for e in sidecar.logged("vault login")] == [bao.addr]
    assert sidecar.logged("lease renewal failed, retrying") == []
    (lease_id,) = {e["lease_id"] for e in sidecar.logged("lease tracked")}
    hashed = bao.client.sys.calculate_hash(AUDIT_DEVICE, lease_id)["data"]["hash"]  # the audit log HMACs it
    renewals = [
        e for e in bao.audit_entries()[before:]
        if e.get("type") == "request" and e["request"].get("path") == "sys/leases/renew"
        and (e["request"].get("data") or {}).get("lease_id") == hashed
    ]  # fmt: skip
    assert len(renewals) >= len(sidecar.logged("lease renewed")), "each renewal reached the real node"
    assert database.leases(creds) == [], "the lease is revoked at exit, on the real node"
