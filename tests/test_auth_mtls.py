"""Client certificates beyond `auth = "cert"`: mTLS for any method, and a renewed certificate at re-login.

A real OpenBao dev server gets a second, TLS listener (server certificate from a CA made here with
openssl) that requires and verifies client certificates from a separate client CA, also made here.
Setup calls use the plain dev listener; secret-init only the mTLS one.
"""

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import (
    Bao,
    ClientCA,
    OwnCA,
    assert_no_leak,
    configure_bao,
    free_port,
    log_events,
    make_client_ca,
    make_test_ca,
    needs_root,
    random_secret,
    register_secret,
    run_cli,
    start_bao,
    stop_bao,
    wait_ready,
    write_config,
)
from tests.test_leases import Run

pytestmark = needs_root


@dataclass
class MtlsBao:
    bao: Bao  # the plain dev listener, for setup calls
    mtls_addr: str  # requires a client certificate from `clients`
    server_ca: OwnCA
    clients: ClientCA
    certs: Path  # a directory for the tests' client certificates


@pytest.fixture(scope="module")
def mtls_bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MtlsBao]:
    import hvac

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make the CAs")
    state = tmp_path_factory.mktemp("bao-mtls")
    server_ca, clients = make_test_ca(state / "pki"), make_client_ca(state / "clients")
    port = free_port()
    listener = (
        f'listener "tcp" {{\n  address = "127.0.0.1:{port}"\n'
        f'  tls_cert_file = "{server_ca.server_cert}"\n  tls_key_file = "{server_ca.server_key}"\n'
        f'  tls_require_and_verify_client_cert = true\n  tls_client_ca_file = "{clients.cert}"\n}}\n'
    )
    server, addr, token = start_bao(state, extra_config=listener)
    client = hvac.Client(url=addr, token=token)
    try:
        wait_ready(client, server, state / "server.log")
        configure_bao(client)
        client.sys.enable_auth_method("cert")
        certs = state / "certs"
        certs.mkdir(mode=0o700)
        yield MtlsBao(Bao(addr, token, state / "audit.log", client, server.pid), f"https://127.0.0.1:{port}",
                      server_ca, clients, certs)  # fmt: skip
    finally:
        stop_bao(server)


def kv_secret(mtls: MtlsBao, name: str) -> str:
    value = register_secret(random_secret(), "kv value")
    mtls.bao.client.secrets.kv.v2.create_or_update_secret(path=f"app/{name}", secret={"value": value})
    return value


def approle_config(mtls: MtlsBao, workdir: Path, out: Path, client_cert: str) -> Path:
    role_id, secret_id, _ = mtls.bao.approle_credentials("app", workdir)
    return write_config(
        workdir,
        f"""
[output]
dir = "{out}"

[vault]
addr = "{mtls.mtls_addr}"
ca_cert = "{mtls.server_ca.ca_cert}"
auth = "approle"
role_id_file = "{role_id}"
secret_id_file = "{secret_id}"
{client_cert}
startup_timeout = "3s"

[[secret]]
name = "value"
source = "vault:secret/data/app/mtls#value"
""",
    )


def test_approle_logs_in_through_a_listener_that_requires_a_client_certificate(
    mtls_bao: MtlsBao, workdir: Path, tmpfs: Path
) -> None:
    """client_cert/client_key with auth = "approle": the certificate is presented, so the listener serves."""
    value = kv_secret(mtls_bao, "mtls")
    cert, key = mtls_bao.clients.issue(mtls_bao.certs, "approle-app")
    cfg = approle_config(mtls_bao, workdir, tmpfs, f'client_cert = "{cert}"\nclient_key = "{key}"')
    result = run_cli("render", "--config", str(cfg))
    assert result.returncode == 0, result.stderr
    assert (tmpfs / "value").read_text() == value
    logins = [e for e in log_events(result.stderr) if e["event"] == "vault login"]
    assert [e["auth"] for e in logins] == ["approle"]
    assert_no_leak(result.stdout + result.stderr, value, key.read_text().strip())


def test_without_the_client_certificate_the_listener_refuses_and_the_start_says_so(
    mtls_bao: MtlsBao, workdir: Path, tmpfs: Path
) -> None:
    """No certificate: the TLS handshake fails, which no retry mends; exit 69 at once, one line, no file."""
    cfg = approle_config(mtls_bao, workdir, tmpfs, "")
    result = run_cli("render", "--config", str(cfg))
    assert result.returncode == 69, result.stderr
    error = log_events(result.stderr)[-1]
    assert "TLS" in error["event"] and "client certificate" in error["event"], error
    assert not (tmpfs / "value").exists()


def test_a_renewed_client_certificate_is_presented_at_the_next_login(
    mtls_bao: MtlsBao, workdir: Path, tmpfs: Path
) -> None:
    """auth = "cert": the files are swapped for a new certificate while the sidecar runs.

    OpenBao renews a cert token only for the very certificate it logged in with. So the token of the
    first login is renewed with the first certificate, also after the files changed and after the
    re-login replaced it; the re-login itself presents the new certificate (the audit log shows each
    login's common name).
    """
    client = mtls_bao.bao.client
    first_cert, first_key = mtls_bao.clients.issue(mtls_bao.certs, "web-first")
    new_cert, new_key = mtls_bao.clients.issue(mtls_bao.certs, "web-renewed")
    client.write(
        "auth/cert/certs/web", certificate=mtls_bao.clients.cert.read_text(), token_policies="app-read",
        token_ttl="3s", token_max_ttl="12s",
    )  # fmt: skip
    live_cert, live_key = workdir / "client.pem", workdir / "client.key"
    shutil.copy(first_cert, live_cert)
    shutil.copy(first_key, live_key)
    kv_secret(mtls_bao, "renewed")
    cfg = write_config(
        workdir,
        f"""
[output]
dir = "{tmpfs}"

[vault]
addr = "{mtls_bao.mtls_addr}"
ca_cert = "{mtls_bao.server_ca.ca_cert}"
auth = "cert"
role = "web"
client_cert = "{live_cert}"
client_key = "{live_key}"

[[secret]]
name = "value"
source = "vault:secret/data/app/renewed#value"
""",
    )
    logins_before = len(cert_logins(mtls_bao))
    run = Run(cfg, None)
    try:
        run.until(lambda r: r.logged("token tracked"), timeout=20)  # the start is over
        for source, live in ((new_cert, live_cert), (new_key, live_key)):  # by rename, as a cert manager does
            shutil.copy(source, f"{live}.new")
            Path(f"{live}.new").replace(live)
        run.until(lambda r: r.logged("token re-login"), timeout=20)
        time.sleep(4)  # the replaced token is renewed meanwhile, past its 3 s TTL
    finally:
        code = run.finish()
    assert code == 0, run.stderr[-2000:]
    names = cert_logins(mtls_bao)[logins_before:]
    assert names[:2] == ["web-first", "web-renewed"], names
    assert all(e["auth"] == "cert" for e in run.logged("vault login"))
    failures = [e for e in run.logs if e.get("level") in ("warning", "error")]
    assert not failures, failures
    assert_no_leak(run.stdout + run.stderr, first_key.read_text().strip(), new_key.read_text().strip())


def cert_logins(mtls: MtlsBao) -> list[str]:
    """The common name of each successful cert login, in order (auth metadata is not hashed in the audit log)."""
    return [
        e["auth"]["metadata"]["common_name"]
        for e in mtls.bao.audit_entries()
        if e.get("type") == "response"
        and e["request"].get("path") == "auth/cert/login"
        and (e.get("auth") or {}).get("metadata")  # a refused login's entry has no metadata
    ]


def test_a_login_refused_for_its_certificate_is_followed_by_one_with_the_new_certificate(
    mtls_bao: MtlsBao, workdir: Path
) -> None:
    """In one process: a login refused for its certificate, a good one written to the same paths, a login again.

    requests pools connections by the certificate's path, and the refused login's memfd copy is closed, so
    the next copy gets the same fd number and path: without dropping the pool with the copy, the kept-alive
    connection of the refused login would present the old certificate again (found in review).
    """
    from secret_init.config import VaultConfig
    from secret_init.errors import PermissionRefusedError
    from secret_init.vault import VaultClient

    bad_cert, bad_key = mtls_bao.clients.issue(mtls_bao.certs, "reused-bad")
    good_cert, good_key = mtls_bao.clients.issue(mtls_bao.certs, "reused-good")
    mtls_bao.bao.client.write(
        "auth/cert/certs/reused", certificate=mtls_bao.clients.cert.read_text(), token_policies="app-read",
        allowed_common_names="reused-good", token_ttl="60s",
    )  # fmt: skip
    live_cert, live_key = workdir / "reused.pem", workdir / "reused.key"
    shutil.copy(bad_cert, live_cert)
    shutil.copy(bad_key, live_key)
    cfg = VaultConfig(
        addr=mtls_bao.mtls_addr, auth="cert", role="reused", client_cert=str(live_cert), client_key=str(live_key),
        ca_cert=str(mtls_bao.server_ca.ca_cert), startup_timeout=2.0,
    )  # fmt: skip
    client = VaultClient(cfg, {})
    with pytest.raises(PermissionRefusedError):
        client.login()
    shutil.copy(good_cert, live_cert)
    shutil.copy(good_key, live_key)
    client.login()
    assert client.owns_token
    client.revoke_own_token()
    assert cert_logins(mtls_bao)[-1] == "reused-good"
