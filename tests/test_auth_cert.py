"""auth = "cert": TLS client certificate login against a real OpenBao, with CAs the test makes itself.

`bao_own_ca` (conftest) is a real `bao server -dev` with a second, TLS listener serving a
certificate from a CA made by openssl in the fixture; the plain dev listener is for setup only,
secret-init talks to the https one with `ca_cert` = that CA. Here openssl also makes a *client*
CA with a client certificate it signed (extendedKeyUsage=clientAuth), and an unrelated "rogue"
CA with a client certificate of its own. OpenBao's `cert` method is enabled with one role, `web`,
that trusts the client CA.

What OpenBao does (read in openbao/openbao, internal/builtin/credential/cert/path_login.go and
internal/helper/listenerutil/listener.go, and checked by the first test here):
- A TCP listener with TLS asks for a client certificate (`tls.RequestClientCert`) unless
  `tls_disable_client_certs` is set, and does not verify it in the handshake (only
  `tls_require_and_verify_client_cert` would). So an untrusted certificate reaches the method.
- `POST auth/cert/login {"name": ROLE}` (`name` optional: without it every trusted role is tried)
  verifies the presented chain against the role's `certificate`, with the clientAuth key usage.
- An untrusted certificate answers 400 "invalid certificate or no client certificate supplied";
  no certificate at all answers 400 "no client certificate found". Telling the two apart shows
  that secret-init did present the rogue certificate.

Every private key PEM (the CAs' and the clients') is registered for the session's leak hunt and
checked explicitly against stderr, status.json and the probe app's environment.
"""

import json
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    TlsBao,
    UnixUser,
    assert_no_leak,
    base_env,
    log_events,
    make_client_ca,
    needs_root,
    random_secret,
    register_secret,
    run_cli,
    secret_files,
    write_config,
)

pytestmark = needs_root

ROLE = "web"
TOKEN_TTL = 60
KEY_MODE_WARNING = "vault client_key mode is not 0400 or 0600"
UNTRUSTED = "invalid certificate or no client certificate supplied"
NO_CERT = "no client certificate found"


# -- the client PKI, made with openssl ------------------------------------------------


@dataclass(frozen=True)
class ClientPki:
    """A CA that signs TLS client certificates, and one client certificate (clientAuth) it signed."""

    ca_cert: Path
    cert: Path
    key: Path

    @property
    def key_pem(self) -> str:
        return self.key.read_text().strip()

    @property
    def key_body(self) -> str:
        """The key's base64 body on one line: what a log line that dropped the PEM armour would show."""
        return "".join(self.key_lines())

    def key_lines(self) -> list[str]:
        """The key's base64 lines, each of which carries key bytes: for the explicit checks only."""
        return [line for line in self.key_pem.splitlines() if not line.startswith("-----")]


def make_client_pki(directory: Path, ca_name: str, client_name: str) -> ClientPki:
    """A throwaway client CA (P-256, 1 day) and a client certificate for `client_name` signed by it."""
    ca = make_client_ca(directory, ca_name)
    cert, key = ca.issue(directory, client_name)
    pki = ClientPki(ca.cert, cert, key)
    register_secret(pki.key_body, "client certificate key body")
    return pki


@dataclass
class CertBao:
    tls: TlsBao
    trusted: ClientPki  # the CA of role `web`, and a client certificate it signed
    rogue: ClientPki  # an unrelated CA and its client certificate

    @property
    def client(self) -> Any:
        return self.tls.bao.client

    def all_keys(self) -> list[str]:
        """Every private key PEM the module made: none may ever be printed."""
        keys = [self.trusted.key_pem, self.trusted.key_body, self.rogue.key_pem, self.rogue.key_body]
        keys += self.trusted.key_lines() + self.rogue.key_lines()
        for pki in (self.trusted, self.rogue):
            keys.append((pki.ca_cert.parent / "client-ca.key").read_text().strip())
        keys.append(self.tls.ca.server_key.read_text().strip())
        return keys


@pytest.fixture(scope="module")
def cert_bao(bao_own_ca: TlsBao, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CertBao]:
    """`cert` enabled on the module's TLS OpenBao, with role `web` trusting the client CA (policy app-read)."""
    state = tmp_path_factory.mktemp("client-pki")
    trusted = make_client_pki(state / "trusted", "secret-init test client CA", "web-client")
    rogue = make_client_pki(state / "rogue", "unrelated rogue CA", "web-client")
    client = bao_own_ca.bao.client
    client.sys.enable_auth_method("cert")
    client.write(
        f"auth/cert/certs/{ROLE}",
        certificate=trusted.ca_cert.read_text(),
        token_policies=["app-read"],
        token_ttl=f"{TOKEN_TTL}s",
        token_max_ttl="120s",
    )
    yield CertBao(bao_own_ca, trusted, rogue)


# -- one test's scene -------------------------------------------------------------------


class Scene:
    """A fresh KV value, the client certificate and key copied to the work dir (key 0600), and a config."""

    def __init__(self, cb: CertBao, tmpfs: Path, workdir: Path) -> None:
        self.cb = cb
        self.out = tmpfs / "out"
        self.workdir = workdir
        self.path = f"app/cert-{secrets.token_hex(6)}"
        self.value = random_secret("cert")
        cb.client.secrets.kv.v2.create_or_update_secret(path=self.path, secret={"api_key": self.value})
        self.cert, self.key = self.use(cb.trusted)

    def use(self, pki: ClientPki) -> tuple[Path, Path]:
        """Copy `pki`'s client certificate and key where the config points (the key 0600)."""
        cert, key = self.workdir / "client.pem", self.workdir / "client.key"
        shutil.copyfile(pki.cert, cert)
        shutil.copyfile(pki.key, key)
        cert.chmod(0o644)
        key.chmod(0o600)
        self.cert, self.key = cert, key
        return cert, key

    def config(self, files: bool = True, user: str = "65534:65534", extra: str = "", env: str = "") -> Path:
        cert_lines = f'client_cert = "{self.cert}"\nclient_key = "{self.key}"\n' if files else ""
        env_line = f'env = "{env}"\n' if env else ""
        return write_config(
            self.workdir,
            f"""
[output]
dir = "{self.out}"
user = "{user}"

[vault]
addr = "{self.cb.tls.tls_addr}"
ca_cert = "{self.cb.tls.ca.ca_cert}"
auth = "cert"
role = "{ROLE}"
{cert_lines}startup_timeout = "5s"
{extra}

[[secret]]
name = "api_key"
source = "vault:secret/data/{self.path}#api_key"
{env_line}""",
        )

    def audit_since(self, before: int) -> list[dict[str, Any]]:
        return self.cb.tls.bao.audit_entries()[before:]

    def status_text(self) -> str:
        status = self.out / ".secret-init" / "status.json"
        return status.read_text() if status.exists() else ""


@pytest.fixture
def scene(cert_bao: CertBao, tmpfs: Path, workdir: Path) -> Scene:
    return Scene(cert_bao, tmpfs, workdir)


def logins(entries: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in entries if e.get("type") == kind and e["request"].get("path") == "auth/cert/login"]


def events(stderr: str, name: str) -> list[dict[str, Any]]:
    return [e for e in log_events(stderr) if e["event"] == name]


def errors(stderr: str) -> list[dict[str, Any]]:
    return [e for e in log_events(stderr) if e.get("level") in ("error", "critical")]


# -- the server and the fixture, without secret-init ------------------------------------------


def test_the_tls_listener_asks_for_client_certificates_and_role_web_trusts_only_its_ca(cert_bao: CertBao) -> None:
    """OpenBao itself, through `requests`: the trusted certificate logs in as `web` with app-read; the
    rogue one and none at all are refused with the two different reasons the secret-init tests rely on."""
    import requests

    url = f"{cert_bao.tls.tls_addr}/v1/auth/cert/login"
    verify = str(cert_bao.tls.ca.ca_cert)

    def login(pki: ClientPki | None) -> requests.Response:
        cert = (str(pki.cert), str(pki.key)) if pki else None
        return requests.post(url, json={"name": ROLE}, cert=cert, verify=verify, timeout=10)

    good = login(cert_bao.trusted)
    assert good.status_code == 200, good.text
    auth = good.json()["auth"]
    register_secret(auth["client_token"], "cert login token")
    try:
        assert "app-read" in auth["token_policies"]
        assert auth["metadata"]["cert_name"] == ROLE
        assert auth["lease_duration"] == TOKEN_TTL
    finally:
        cert_bao.client.auth.token.revoke(auth["client_token"])
    rogue = login(cert_bao.rogue)
    assert (rogue.status_code, rogue.json()["errors"]) == (400, [UNTRUSTED])
    bare = login(None)
    assert (bare.status_code, bare.json()["errors"]) == (400, [NO_CERT])


# -- secret-init over the TLS listener ----------------------------------------------------------


def test_login_with_a_client_certificate_renders_a_kv_value(scene: Scene) -> None:
    """auth = "cert", role = "web": one login at auth/cert/login as role web over https, the value
    rendered, a "vault login" event with auth="cert", the login's token revoked after the render."""
    before = len(scene.cb.tls.bao.audit_entries())
    accessors = scene.cb.tls.bao.token_accessors()
    result = run_cli("render", "--config", str(scene.config()), env=base_env())
    assert result.returncode == 0, result.stderr
    assert (scene.out / "api_key").read_text() == scene.value
    assert secret_files(scene.out) == ["api_key"]

    login = events(result.stderr, "vault login")
    assert len(login) == 1, result.stderr
    assert login[0]["auth"] == "cert"
    assert login[0]["mount"] == "cert"
    assert login[0]["addr"] == scene.cb.tls.tls_addr
    assert float(login[0]["token_ttl"]) == TOKEN_TTL
    assert login[0]["renewable"] is True
    assert not events(result.stderr, KEY_MODE_WARNING), "a 0600 key draws no warning"

    entries = scene.audit_since(before)
    answers = logins(entries, "response")
    assert len(logins(entries, "request")) == 1 and len(answers) == 1, "one login"
    auth = answers[0]["response"]["auth"]
    assert "app-read" in auth["token_policies"]
    assert auth["metadata"]["cert_name"] == ROLE, "logged in as the configured role"
    assert answers[0]["request"]["data"].keys() == {"name"}, "the login body names the role"
    reads = [e for e in entries if e.get("type") == "request" and e["request"]["path"] == f"secret/data/{scene.path}"]
    assert len(reads) == 1
    assert reads[0]["auth"]["token_policies"] == auth["token_policies"], "read with the cert login's token"
    assert scene.cb.tls.bao.token_accessors() == accessors, "the cert login's token is revoked after the render"

    assert_no_leak(result.stdout + result.stderr + scene.status_text(), *scene.cb.all_keys(), scene.value)


@pytest.mark.hostile("app-user")
@pytest.mark.parametrize("prefix", ["VAULT", "BAO"])
def test_client_certificate_from_the_environment_is_used_and_scrubbed_from_the_app(
    scene: Scene, app_user: UnixUser, probe: list[str], prefix: str
) -> None:
    """No client_cert/client_key keys: $VAULT_CLIENT_CERT/$VAULT_CLIENT_KEY (or BAO_) are the defaults.
    `run` logs in with them, execs the probe app, and the app sees neither variable nor any key."""
    cfg = scene.config(files=False, user=app_user.name, env="API_KEY_FILE")
    assert "client_cert" not in cfg.read_text() and "client_key" not in cfg.read_text()
    env = base_env(**{f"{prefix}_CLIENT_CERT": str(scene.cert), f"{prefix}_CLIENT_KEY": str(scene.key)})
    result = run_cli("run", "--config", str(cfg), "--", *probe, str(scene.out), env=env)
    assert result.returncode == 0, result.stderr
    login = events(result.stderr, "vault login")
    assert [(e["auth"], e["mount"]) for e in login] == [("cert", "cert")], result.stderr

    report = json.loads(result.stdout)
    assert report["resuid"] == [app_user.uid] * 3
    app_env: dict[str, str] = report["env"]
    assert f"{prefix}_CLIENT_CERT" not in app_env and f"{prefix}_CLIENT_KEY" not in app_env
    assert not [k for k in app_env if k.startswith(("VAULT_", "BAO_"))], sorted(app_env)
    assert str(scene.key) not in json.dumps(app_env), "not even the key's path reaches the app"
    assert app_env["API_KEY_FILE"] == f"{scene.out}/api_key"
    assert report["files"]["API_KEY_FILE"]["bytes"] == len(scene.value)
    assert (scene.out / "api_key").read_text() == scene.value

    assert_no_leak(json.dumps(app_env), *scene.cb.all_keys(), scene.value)
    assert_no_leak(result.stderr + scene.status_text(), *scene.cb.all_keys(), scene.value)


@pytest.mark.parametrize("prefix", ["VAULT", "BAO"])  # hvac reads $VAULT_CLIENT_* itself: the config must win
@pytest.mark.parametrize("configured", ["trusted", "rogue"])
def test_the_configured_client_certificate_wins_over_the_environment(
    scene: Scene, workdir: Path, prefix: str, configured: str
) -> None:
    """client_cert/client_key in the config and the other pair in $VAULT_CLIENT_*/$BAO_CLIENT_*: the
    environment is only the default, so the configured pair is the one presented. Trusted in the config
    and rogue in the environment logs in; rogue in the config and trusted in the environment is refused."""
    cb = scene.cb
    other_pki = cb.rogue if configured == "trusted" else cb.trusted
    scene.use(cb.trusted if configured == "trusted" else cb.rogue)
    other = workdir / "env"
    other.mkdir()
    env_cert, env_key = other / "client.pem", other / "client.key"
    shutil.copyfile(other_pki.cert, env_cert)
    shutil.copyfile(other_pki.key, env_key)
    env_key.chmod(0o600)
    env = base_env(**{f"{prefix}_CLIENT_CERT": str(env_cert), f"{prefix}_CLIENT_KEY": str(env_key)})
    result = run_cli("render", "--config", str(scene.config()), env=env)
    if configured == "trusted":
        assert result.returncode == 0, result.stderr
        assert (scene.out / "api_key").read_text() == scene.value
    else:
        assert result.returncode == 77, result.stderr
        assert UNTRUSTED in errors(result.stderr)[0]["event"], result.stderr
        assert not scene.out.exists() or secret_files(scene.out) == []
    assert_no_leak(result.stdout + result.stderr, *cb.all_keys(), scene.value)


@pytest.mark.hostile("vault-answers")
def test_a_certificate_from_another_ca_is_refused_with_77_and_the_servers_reason(scene: Scene) -> None:
    """The rogue CA's client certificate is presented and refused: exit 77, one error line carrying
    OpenBao's reason, one login attempt (not retried), nothing written, no key printed."""
    scene.use(scene.cb.rogue)
    before = len(scene.cb.tls.bao.audit_entries())
    result = run_cli("render", "--config", str(scene.config()), env=base_env())
    assert result.returncode == 77, result.stderr

    failures = errors(result.stderr)
    assert len(failures) == 1, result.stderr
    message = failures[0]["event"]
    assert "\n" not in message
    assert UNTRUSTED in message, message
    assert NO_CERT not in message, "the certificate was presented: the server saw one and did not trust it"
    assert "auth/cert" in message and scene.cb.tls.tls_addr in message, message
    assert not events(result.stderr, "vault login")

    entries = scene.audit_since(before)
    assert len(logins(entries, "request")) == 1, "a refused login is not sent again"
    assert not [e for e in entries if e.get("type") == "request" and e["request"]["path"].startswith("secret/")]
    assert not scene.out.exists() or secret_files(scene.out) == []

    assert_no_leak(result.stdout + result.stderr + scene.status_text(), *scene.cb.all_keys(), scene.value)


@pytest.mark.parametrize(
    ("mode", "warned"),
    [(0o644, True), (0o640, True), (0o600, False), (0o400, False)],
    ids=["0644-warned", "0640-warned", "0600-quiet", "0400-quiet"],
)
def test_a_client_key_readable_by_others_is_warned_about_and_the_start_goes_on(
    scene: Scene, mode: int, warned: bool
) -> None:
    """A key file whose mode is not 0400 or 0600: one warning naming the path and mode, then a normal
    start; 0600 and 0400 draw no warning."""
    scene.key.chmod(mode)
    result = run_cli("render", "--config", str(scene.config()), env=base_env())
    assert result.returncode == 0, result.stderr
    assert (scene.out / "api_key").read_text() == scene.value
    assert [e["auth"] for e in events(result.stderr, "vault login")] == ["cert"]

    warnings = events(result.stderr, KEY_MODE_WARNING)
    if warned:
        assert len(warnings) == 1, result.stderr
        assert warnings[0]["level"] == "warning"
        assert warnings[0]["path"] == str(scene.key)
        assert warnings[0]["mode"] in (f"{mode:04o}", f"0o{mode:o}", mode), warnings[0]
    else:
        assert warnings == [], result.stderr
    assert_no_leak(result.stdout + result.stderr + scene.status_text(), *scene.cb.all_keys(), scene.value)


@pytest.mark.hostile("filesystem")
@pytest.mark.parametrize("missing", ["client_key", "client_cert"])
def test_a_missing_client_key_or_certificate_file_is_66(scene: Scene, missing: str) -> None:
    """A credential file that is not there: exit 66, one line naming the file, no login, nothing written."""
    gone = scene.key if missing == "client_key" else scene.cert
    gone.unlink()
    before = len(scene.cb.tls.bao.audit_entries())
    result = run_cli("render", "--config", str(scene.config()), env=base_env())
    assert result.returncode == 66, result.stderr
    failures = errors(result.stderr)
    assert len(failures) == 1, result.stderr
    assert str(gone) in failures[0]["event"], failures[0]
    assert not logins(scene.audit_since(before), "request"), "no login without the key pair"
    assert not scene.out.exists() or secret_files(scene.out) == []
    assert_no_leak(result.stdout + result.stderr, *scene.cb.all_keys())


@pytest.mark.hostile("config")
@pytest.mark.parametrize(
    ("extra", "drop_files", "key"),
    [
        ("", True, "client_cert"),  # cert without a certificate anywhere (no keys, no env)
        ('jwt_file = "/nonexistent/jwt"', False, "jwt_file"),  # a key of another method
    ],
    ids=["no-client-cert", "jwt_file-with-cert"],
)
def test_bad_cert_configs_are_78_naming_the_key(scene: Scene, extra: str, drop_files: bool, key: str) -> None:
    """auth = "cert" needs a certificate and refuses keys of other methods: 78, one line naming the key."""
    result = run_cli("render", "--config", str(scene.config(files=not drop_files, extra=extra)), env=base_env())
    assert result.returncode == 78, result.stderr
    failures = errors(result.stderr)
    assert len(failures) == 1, result.stderr
    assert key in failures[0]["event"], failures[0]
    assert not scene.out.exists() or secret_files(scene.out) == []
