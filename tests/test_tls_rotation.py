"""Supervised renewal and rotation over TLS, against a CA the test made itself with openssl.

`bao_own_ca` (conftest) is a real OpenBao dev server with a second, TLS listener whose CA
and server certificate come from `openssl` in the fixture; setup calls use the plain dev
listener, secret-init only the https one, with `ca_cert` = that CA. The database engine in
front of the session's real PostgreSQL issues 4 s / 12 s credentials, so within ~10 s the
lease is renewed, then rotated ahead of its max TTL: new credentials, the app restarted, the
old lease revoked. The probing app logs in with psql every 100 ms and prints only digests
of what it read, so no secret value has a legitimate reason to appear in any output.
"""

import hashlib
import os
import socket
import ssl
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    Database,
    TlsBao,
    UnixUser,
    app_command,
    assert_no_leak,
    needs_root,
    write_config,
)
from tests.test_leases import Run

pytestmark = needs_root

DEFAULT_TTL, MAX_TTL, ROTATE_BEFORE = 4, 12, 4

TLS_APP = r"""
import hashlib, json, os, signal, subprocess, sys, time
port = sys.argv[1]
def digest(text):
    return hashlib.sha256(text.encode()).hexdigest()[:16]
def say(**event):
    event["t"] = time.time()
    event["pid"] = os.getpid()
    os.write(1, (json.dumps(event) + "\n").encode())  # not print: it is not reentrant
def on_term(signum, frame):
    say(event="stop")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
user = open(os.environ["DB_USER_FILE"]).read()
password = open(os.environ["DB_PASSWORD_FILE"]).read()
say(event="start", user=digest(user), password=digest(password))
while True:
    r = subprocess.run(
        ["psql", "-h", "127.0.0.1", "-p", port, "-U", user, "-d", "postgres", "-w", "-tAc", "select 1"],
        env={"PGPASSWORD": password, "PATH": "/usr/bin:/bin", "PGCONNECT_TIMEOUT": "2"},
        capture_output=True, text=True,
    )
    say(event="probe", ok=r.returncode == 0, user=digest(user), error=r.stderr.strip()[-200:].replace(user, "USER"))
    time.sleep(0.1)
"""


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@pytest.fixture
def tls_app(workdir: Path) -> list[str]:
    if not os.path.exists("/usr/bin/psql"):
        pytest.skip("needs psql for the probing app")
    return app_command(workdir, "tls_app", TLS_APP)


def tls_config(workdir: Path, out: Path, tls: TlsBao, creds: str, user: str) -> tuple[Path, str]:
    """Token auth from a file (so the test knows the token to look for), over the https listener only."""
    token = tls.bao.client.auth.token.create(policies=["app-read"], ttl="5m")["auth"]["client_token"]
    token_file = workdir / "vault-token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    cfg = write_config(
        workdir,
        f"""
[output]
dir = "{out}"
user = "{user}"

[vault]
addr = "{tls.tls_addr}"
ca_cert = "{tls.ca.ca_cert}"
auth = "token"
token_file = "{token_file}"
request_timeout = "2s"

[process]
stop_timeout = "2s"
rotate_before = "{ROTATE_BEFORE}s"

[[secret]]
name = "db_user"
source = "vault:{creds}#username"
env = "DB_USER_FILE"

[[secret]]
name = "db_password"
source = "vault:{creds}#password"
env = "DB_PASSWORD_FILE"
""",
    )
    return cfg, token


def vault_time(text: str) -> float:
    """An RFC 3339 time from Vault (nanoseconds, Z) as a Unix time."""
    head, _, fraction = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(fraction or '0')[:6]:0<6}+00:00").timestamp()


def test_the_extra_listener_serves_the_tests_own_ca(bao_own_ca: TlsBao) -> None:
    """The fixture is what it claims: https on its own port, a certificate only the test's CA verifies."""
    assert bao_own_ca.tls_addr.startswith("https://127.0.0.1:")
    assert bao_own_ca.bao.addr.startswith("http://") and bao_own_ca.bao.addr != bao_own_ca.tls_addr
    port = int(bao_own_ca.tls_addr.rsplit(":", 1)[1])
    trusting = ssl.create_default_context(cafile=str(bao_own_ca.ca.ca_cert))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        trusting.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        cert: dict[str, Any] = tls.getpeercert() or {}
    assert ("IP Address", "127.0.0.1") in cert["subjectAltName"]
    assert ("DNS", "localhost") in cert["subjectAltName"]
    assert (("commonName", "secret-init test CA"),) in cert["issuer"]
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")


def test_supervised_renewal_and_rotation_over_tls_with_the_tests_own_ca(
    bao_own_ca: TlsBao, database_own_ca: Database, tmpfs: Path, workdir: Path, app_user: UnixUser, tls_app: list[str]
) -> None:
    """4 s / 12 s credentials over https: renewed, rotated >= ~rotate_before ahead of the max TTL,
    the app restarted on the new credentials, the old lease revoked, and nothing secret printed."""
    db = database_own_ca
    creds = db.role(f"{DEFAULT_TTL}s", f"{MAX_TTL}s")
    out = tmpfs / "out"
    cfg, token = tls_config(workdir, out, bao_own_ca, creds, app_user.name)
    seen: list[str] = [token]  # every secret value the run handled, for the leak check

    run = Run(cfg, tls_app, db.pg.port)
    try:
        run.until(lambda r: len(r.events("start")) >= 1 and bool(r.logged("lease tracked")), 20)
        first_lease = run.logged("lease tracked")[0]["lease_id"]
        assert first_lease.startswith(f"{creds}/")
        max_ttl_end = vault_time(db.bao.client.sys.read_lease(first_lease)["data"]["issue_time"]) + MAX_TTL
        first_user, first_password = (out / "db_user").read_text(), (out / "db_password").read_text()
        seen += [first_user, first_password]
        start = run.events("start")[0]
        assert (start["user"], start["password"]) == (digest(first_user), digest(first_password))

        def rotated_and_revoked(r: Run) -> bool:
            return len(r.events("start")) >= 2 and any(e["lease_id"] == first_lease for e in r.logged("lease revoked"))

        def new_logins(r: Run) -> int:
            return len([p for p in r.events("probe") if p["user"] == r.events("start")[1]["user"]])

        run.until(rotated_and_revoked, MAX_TTL + 8)
        run.until(lambda r: new_logins(r) >= 3, 10)
        second_user, second_password = (out / "db_user").read_text(), (out / "db_password").read_text()
        seen += [second_user, second_password]
        assert first_lease not in db.leases(creds), "the old lease is gone from OpenBao"
        live = db.pg.roles()
        assert first_user not in live, "the old lease's role is dropped"
        assert second_user in live
    finally:
        code = run.finish()
    assert code == 0, run.stderr[-3000:]

    # Over https, with the test's CA: the only address secret-init used.
    loaded = run.logged("vault token loaded")
    assert [e["addr"] for e in loaded] == [bao_own_ca.tls_addr], loaded
    assert loaded[0]["addr"].startswith("https://127.0.0.1:")
    assert bao_own_ca.bao.addr not in run.stderr, "the plain dev listener was never named"
    assert not [e for e in run.logs if "plain http" in e["event"]]

    # Renewed at least once before the rotation.
    events = [e["event"] for e in run.logs]
    renewals = [e for e in run.logged("lease renewed") if e["lease_id"] == first_lease]
    assert renewals, "the first lease was renewed"
    assert events.index("lease renewed") < events.index("lease rotated")

    # Rotated ahead of the max TTL: a new lease, new credentials, a new app on them.
    rotation = run.logged("lease rotated")[0]
    assert rotation["old_lease"] == first_lease
    assert rotation["new_lease"] and rotation["new_lease"] != first_lease
    assert (second_user, second_password) != (first_user, first_password)
    first, second = run.events("start")[:2]
    assert (second["user"], second["password"]) == (digest(second_user), digest(second_password))
    assert second["pid"] != first["pid"] and run.logged("app restarted"), "the app was restarted"
    assert [e for e in run.events("stop") if e["pid"] == first["pid"]], "the first app was stopped by SIGTERM"
    ahead = max_ttl_end - second["t"]
    assert ahead >= ROTATE_BEFORE - 1, f"the new app started only {ahead:.2f}s before the old lease's max TTL"
    probes = run.events("probe")
    assert [p for p in probes if p["user"] == digest(first_user)], "the first credentials were used"
    assert len([p for p in probes if p["user"] == digest(second_user)]) >= 3, "the new credentials were used"
    assert [p for p in probes if not p["ok"]] == [], "no login failed: rotated before the old credentials died"

    # Revoked: the old lease explicitly, the last one at shutdown.
    assert [e for e in run.logged("lease revoked") if e["lease_id"] == first_lease]
    assert db.leases(creds) == [], "no lease remains after shutdown"

    assert_no_leak(run.stdout + run.stderr, *seen)
