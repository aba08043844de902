"""auth = "jwt" against the session's real OpenBao: its `jwt` auth method, with a key pair made here.

The module enables OpenBao's `jwt` method at a mount of its own (`jwt-test-XXXX`, disabled at the
end; nothing else in the session uses it) with `jwt_validation_pubkeys` = the public half of an RSA
key generated in the test, and JWTs are minted with PyJWT (RS256). The roles bind one audience,
take `sub` as the user claim and give the `app-read` policy. OpenBao's leeways are all turned off
(-1: "can be disabled if set to -1", openbao builtin/credential/jwt/path_role.go), so a JWT is
refused from its `exp` on, not 60 s (clock skew) or 150 s later.

What the server says when it refuses a JWT is asked of the server itself: the test posts the same
JWT to auth/<mount>/login and expects that reason, word for word, in secret-init's one error line.
The audit log (every request field HMACed; `sys/audit-hash` reproduces the HMAC) tells which JWT
each login carried and when.

Every JWT, its signature and the private key are registered for the session's leak hunt, and
checked explicitly against stdout, stderr, status.json and the app's environment.
"""

import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    REPO,
    Bao,
    UnixUser,
    app_command,
    assert_no_leak,
    base_env,
    log_events,
    needs_root,
    random_secret,
    record_output,
    record_process,
    register_secret,
    run_cli,
    secret_files,
    write_config,
)
from tests.test_leases import JsonLines

pytestmark = needs_root

ISSUER = "https://ci.example.test"  # never contacted: the keys are given to OpenBao, not discovered
AUDIENCE = "secret-init-test"
AUDIT_DEVICE = "file"  # conftest's start_bao declares `audit "file" "file"`
NO_LEEWAY = {"expiration_leeway": -1, "not_before_leeway": -1, "clock_skew_leeway": -1}


@dataclass
class JwtAuth:
    """OpenBao's jwt method at `mount`, trusting the public half of `private_key`."""

    bao: Bao
    mount: str
    private_key: Any  # cryptography RSAPrivateKey
    key_pem: str
    stray_key: Any  # an RSA key OpenBao does not trust, for a bad signature
    stray_pem: str
    jwts: list[str]  # every JWT minted in the module, for the explicit leak checks

    def role(self, name: str, **settings: Any) -> str:
        """A role of type jwt bound to AUDIENCE, user_claim sub, policy app-read, no leeway."""
        body = {
            "role_type": "jwt",
            "bound_audiences": [AUDIENCE],
            "user_claim": "sub",
            "token_policies": ["app-read"],
            "token_ttl": "60s",
            "token_max_ttl": "120s",
            **NO_LEEWAY,
            **settings,
        }
        self.bao.client.write(f"auth/{self.mount}/role/{name}", **body)
        return name

    def mint(self, exp_in: float, aud: str = AUDIENCE, key: Any = None, sub: str = "ci-job") -> str:
        """A signed JWT that expires `exp_in` seconds from now (negative: already expired)."""
        import jwt

        now = int(time.time())
        exp = int(now + exp_in)
        issued = min(now - 1, exp - 60)  # an expired JWT was issued a minute before its exp
        claims = {"iss": ISSUER, "sub": sub, "aud": aud, "iat": issued, "nbf": issued, "exp": exp}
        token = jwt.encode(claims, key or self.private_key, algorithm="RS256")
        register_secret(token, "jwt")
        register_secret(token.rpartition(".")[2], "jwt signature")
        self.jwts.append(token)
        return token

    def secrets(self) -> list[str]:
        """Every value no output may hold: each JWT, its signature, the private key and its body."""
        values = [self.key_pem, key_body(self.key_pem), self.stray_pem, key_body(self.stray_pem)]
        for token in self.jwts:
            values += [token, token.rpartition(".")[2]]
        return values

    def login_refusal(self, role: str, token: str) -> str:
        """The reason OpenBao gives for refusing `token` at auth/<mount>/login (asked directly)."""
        import hvac

        client = hvac.Client(url=self.bao.addr, token="")  # "": not ~/.vault-token or $VAULT_TOKEN
        with pytest.raises(hvac.exceptions.VaultError) as refused:
            client.adapter.post(f"/v1/auth/{self.mount}/login", json={"role": role, "jwt": token})
        errors = refused.value.errors or []
        assert len(errors) == 1 and errors[0], f"one reason expected from OpenBao: {refused.value}"
        reason: str = errors[0]
        assert token not in reason and token.rpartition(".")[2] not in reason
        return reason

    def audit_hash(self, value: str) -> str:
        digest: str = self.bao.client.sys.calculate_hash(AUDIT_DEVICE, value)["data"]["hash"]
        return digest

    def logins(self, since: int) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
        """(request, response) audit entries of auth/<mount>/login since entry `since`, in order."""
        entries = self.bao.audit_entries()[since:]
        path = f"auth/{self.mount}/login"
        requests = [e for e in entries if e.get("type") == "request" and e["request"].get("path") == path]
        responses = {
            e["request"]["id"]: e for e in entries if e.get("type") == "response" and e["request"].get("path") == path
        }
        return [(r, responses.get(r["request"]["id"])) for r in requests]


def key_body(pem: str) -> str:
    """A PEM's base64 body on one line: what a log line that dropped the armour would show."""
    return "".join(line for line in pem.splitlines() if not line.startswith("-----"))


def rsa_key() -> tuple[Any, str, str]:
    """A fresh RSA-2048 key: (key, private PEM, public PEM); the private PEM is registered."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public_pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    register_secret(private_pem.strip(), "jwt signing key")
    register_secret(key_body(private_pem), "jwt signing key body")
    return key, private_pem.strip(), public_pem


@pytest.fixture(scope="module")
def jwt_auth(bao: Bao) -> Iterator[JwtAuth]:
    """The jwt method enabled at a mount of this module's own, trusting a key made here."""
    pytest.importorskip("jwt", reason="PyJWT[crypto] is a test dependency")
    mount = f"jwt-test-{secrets.token_hex(3)}"
    key, private_pem, public_pem = rsa_key()
    stray, stray_pem, _ = rsa_key()
    bao.client.sys.enable_auth_method("jwt", path=mount)
    try:
        bao.client.write(f"auth/{mount}/config", jwt_validation_pubkeys=[public_pem], bound_issuer=ISSUER)
        made = JwtAuth(bao, mount, key, private_pem, stray, stray_pem, [])
        made.role("app")
        role = bao.client.read(f"auth/{mount}/role/app")["data"]
        assert {k: role[k] for k in NO_LEEWAY} == NO_LEEWAY, role
        yield made
    finally:
        bao.client.sys.disable_auth_method(mount)


@dataclass
class Case:
    """One test's KV secret, jwt_file and output dir."""

    auth: JwtAuth
    out: Path
    workdir: Path
    jwt_file: Path
    key: str
    value: str

    def config(self, role: str = "app", user: str = "65534:65534", vault_extra: str = "", process: str = "") -> Path:
        return write_config(
            self.workdir,
            f"""
[output]
dir = "{self.out}"
user = "{user}"

[vault]
addr = "{self.auth.bao.addr}"
auth = "jwt"
auth_mount = "{self.auth.mount}"
role = "{role}"
jwt_file = "{self.jwt_file}"
startup_timeout = "5s"
{vault_extra}

{process}

[[secret]]
name = "api_key"
source = "vault:secret/data/app/{self.key}#k"
env = "API_KEY_FILE"
""",
        )

    def write_jwt(self, token: str) -> None:
        """Replace jwt_file's content in one step, as an issuer rotating a projected token does."""
        fresh = self.jwt_file.with_name(f".{self.jwt_file.name}.new")
        fresh.write_text(token)
        fresh.chmod(0o400)
        os.replace(fresh, self.jwt_file)

    def status_json(self) -> str:
        path = self.out / ".secret-init" / "status.json"
        return path.read_text() if path.exists() else ""

    def assert_clean(self, texts: dict[str, str]) -> None:
        for label, text in texts.items():
            assert text is not None, label
            assert_no_leak(text, *self.auth.secrets())


@pytest.fixture
def case(jwt_auth: JwtAuth, tmpfs: Path, workdir: Path) -> Case:
    key = secrets.token_hex(6)
    value = random_secret("api")
    jwt_auth.bao.client.secrets.kv.v2.create_or_update_secret(path=f"app/{key}", secret={"k": value})
    return Case(jwt_auth, tmpfs / "out", workdir, workdir / "jwt", key, value)


def errors(stderr: str) -> list[str]:
    return [e["event"] for e in log_events(stderr) if e.get("level") == "error"]


def one_error(stderr: str) -> str:
    found = errors(stderr)
    assert len(found) == 1, f"one error line expected: {stderr[-3000:]}"
    return found[0]


def audit_time(entry: dict[str, Any]) -> float:
    """An audit entry's RFC 3339 time (nanoseconds cut to microseconds) as a Unix time."""
    text = re.sub(r"(\.\d{6})\d*", r"\1", entry["time"]).replace("Z", "+00:00")
    return datetime.fromisoformat(text).timestamp()


# -- the tests ------------------------------------------------------------------------------


def test_login_read_and_render(case: Case, app_user: UnixUser, probe: list[str]) -> None:
    """A valid JWT logs in at the module's mount; the KV value is rendered; the app sees no JWT.

    The audit log shows the one login carried exactly this JWT, and that it was answered with a token.
    """
    auth = case.auth
    token = auth.mint(exp_in=120)
    case.write_jwt(token)
    before = len(auth.bao.audit_entries())
    result = run_cli("render", "--config", str(case.config()), env=base_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert secret_files(case.out) == ["api_key"]
    assert (case.out / "api_key").read_text() == case.value
    events = log_events(result.stderr)
    logins = [e for e in events if e["event"] == "vault login"]
    assert len(logins) == 1, result.stderr[-3000:]
    assert logins[0]["auth"] == "jwt" and logins[0]["mount"] == auth.mount, logins
    assert logins[0]["token_ttl"] == 60 and logins[0]["renewable"] is True, logins
    audited = auth.logins(before)
    assert len(audited) == 1
    request, response = audited[0]
    assert request["request"]["data"]["jwt"] == auth.audit_hash(token), "the login carried the JWT in jwt_file"
    assert request["request"]["data"]["role"] == auth.audit_hash("app")
    assert (
        response is not None
        and not response.get("error")
        and response["auth"]["policies"]
        == [
            "app-read",
            "default",
        ]
    ), response
    status_after_render = case.status_json()
    case.assert_clean({"stderr": result.stderr, "stdout": result.stdout, "status.json": status_after_render})

    # The same login, then exec of the probe app as the unprivileged user: its environment holds no JWT.
    (case.out / "api_key").unlink()
    ran = run_cli("run", "--config", str(case.config(user=app_user.name)), "--", *probe, str(case.out), env=base_env())
    assert ran.returncode == 0, ran.stderr[-3000:]
    report = json.loads(ran.stdout.splitlines()[-1])
    assert report["resuid"] == [app_user.uid] * 3
    assert report["files"]["API_KEY_FILE"]["readable"] is True
    assert report["files"]["API_KEY_FILE"]["bytes"] == len(case.value)
    assert [e["auth"] for e in log_events(ran.stderr) if e["event"] == "vault login"] == ["jwt"]
    assert not [k for k in report["env"] if k.startswith(("VAULT_", "BAO_"))]
    assert str(case.jwt_file) not in json.dumps(report["env"]), "the app is not told where the JWT is"
    case.assert_clean(
        {
            "run stderr": ran.stderr,
            "run stdout": ran.stdout,
            "app env": json.dumps(report["env"]),
            "status.json": case.status_json(),
        }
    )


SLEEPER = r"""
import hashlib, json, os, signal, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print(json.dumps({"event": "start", "pid": os.getpid(), "env": dict(os.environ),
                  "sha256": hashlib.sha256(open(os.environ["API_KEY_FILE"], "rb").read()).hexdigest()}), flush=True)
while True:
    signal.pause()
"""


def test_relogin_after_the_max_ttl_reads_the_fresh_jwt(case: Case, app_user: UnixUser) -> None:
    """Token TTL 6 s, max TTL 12 s: secret-init logs in again halfway, re-reading jwt_file.

    JWT #1 expires 5 s after it is minted; JWT #2 is written to jwt_file once the first login is
    logged. The re-login comes 6 s after the first login, past JWT #1's exp, which OpenBao (no leeway)
    then refuses: the audit log shows the first login carried JWT #1, every later one JWT #2, each
    after JWT #1's exp, and none was refused. A new KV value is read (refresh every second) with the
    re-login's token and reaches the restarted app. SIGTERM then ends the run, exit 0.
    """
    auth = case.auth
    role = auth.role("short", token_ttl="6s", token_max_ttl="12s")
    first = auth.mint(exp_in=5)
    first_exp = json.loads(_claims(first))["exp"]
    case.write_jwt(first)
    cfg = case.config(
        role=role,
        user=app_user.name,
        vault_extra='refresh_interval = "1s"',
        process='[process]\nsupervise = true\nstop_timeout = "2s"',
    )
    before = len(auth.bao.audit_entries())
    app = app_command(case.workdir, "sleeper", SLEEPER)
    proc = subprocess.Popen(
        [sys.executable, "-m", "secret_init", "run", "--config", str(cfg), "--", *app],
        env=base_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
    )  # fmt: skip
    run = JsonLines(proc)
    try:
        run.until(lambda r: bool(r.lines) and bool(r.logged("vault login")), 20)
        started = run.lines[0]
        record_process(started["pid"], "the supervised app")
        record_process(run.proc.pid, "secret-init")
        second = auth.mint(exp_in=300, sub="ci-job-2")
        case.write_jwt(second)
        run.until(lambda r: len(r.logged("token re-login")) >= 1, 30)
        status = case.status_json()
        assert status, "a supervised run keeps status.json"
        # A new value in KV: the next refresh (every second) reads it with the token JWT #2 logged in for.
        changed = random_secret("api2")
        auth.bao.client.secrets.kv.v2.create_or_update_secret(path=f"app/{case.key}", secret={"k": changed})
        run.until(lambda r: bool(r.logged("secret changed in vault")), 15)
        rendered = (case.out / "api_key").read_text()
        # on_rotate's default restarts the app: the SIGTERM goes to the restarted one, once it is up.
        run.until(lambda r: len(r.events("start")) >= 2, 15)
        restarted = run.events("start")[-1]
        record_process(restarted["pid"], "the restarted app")
    finally:
        code = run.finish()
    assert code == 0, run.stderr[-3000:]
    assert [(e["signal"], e["pid"]) for e in run.logged("signal forwarded")] == [("SIGTERM", restarted["pid"])]
    assert [(e["pid"], e["exit_code"]) for e in run.logged("app exited")][-1:] == [(restarted["pid"], 0)]
    assert [e["exit_code"] for e in run.logged("supervisor exiting")] == [0]

    assert started["sha256"] == hashlib.sha256(case.value.encode()).hexdigest()
    assert restarted["sha256"] == hashlib.sha256(changed.encode()).hexdigest()
    assert [e["new_pid"] for e in run.logged("app restarted")] == [restarted["pid"]]
    assert not [k for k in started["env"] if k.startswith(("VAULT_", "BAO_"))]
    assert [e for e in run.logs if e.get("level") == "error"] == [], run.stderr[-3000:]
    assert run.logged("vault token request failed, retrying") == [], "a re-login was refused"
    assert run.logged("vault read failed") == []
    logins = run.logged("vault login")
    assert len(logins) >= 2, "the first login and the re-login"
    assert all(e["auth"] == "jwt" and e["mount"] == auth.mount for e in logins), logins
    assert len(run.logged("token re-login")) == len(logins) - 1

    audited = auth.logins(before)
    assert len(audited) == len(logins), "one login request per logged login, none refused and retried"
    hashes = [request["request"]["data"]["jwt"] for request, _ in audited]
    assert hashes[0] == auth.audit_hash(first), "the first login used JWT #1"
    assert set(hashes[1:]) == {auth.audit_hash(second)}, "every re-login used JWT #2, read again from jwt_file"
    for _, response in audited:
        assert response is not None and not response.get("error"), response
    assert all(audit_time(request) > first_exp for request, _ in audited[1:]), (
        "each re-login came after JWT #1's exp: JWT #1 could not have been accepted"
    )
    assert "expired" in auth.login_refusal(role, first), "OpenBao refuses JWT #1 now"

    assert rendered == changed
    # The read that answered the new value was made with a token a re-login (with JWT #2) got.
    read_path = f"secret/data/app/{case.key}"
    answered = [
        e for e in auth.bao.audit_entries()[before:]
        if e.get("type") == "response" and e["request"].get("path") == read_path
        and ((e.get("response") or {}).get("data") or {}).get("data", {}).get("k") == auth.audit_hash(changed)
    ]  # fmt: skip
    assert answered, "no audited read answered the new value"
    relogin_accessors = {response["auth"]["accessor"] for _, response in audited[1:] if response is not None}
    assert answered[0]["auth"]["accessor"] in relogin_accessors, "the new value was read with a re-login's token"

    case.assert_clean(
        {
            "stderr": run.stderr,
            "app stdout": run.stdout,
            "status.json": status,
            "app env": json.dumps(started["env"]),
            "restarted app env": json.dumps(restarted["env"]),
        }
    )


def _claims(token: str) -> str:
    import base64

    payload = token.split(".")[1]
    return base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode()


@pytest.mark.hostile("vault-answers")
@pytest.mark.parametrize(
    ("kind", "word"), [("expired", "expired"), ("wrong-audience", "audience"), ("bad-signature", "signature")]
)
def test_a_refused_jwt_is_77_with_the_servers_reason(case: Case, kind: str, word: str) -> None:
    """OpenBao refuses the JWT: exit 77, one error line with OpenBao's own reason, no JWT, nothing written."""
    auth = case.auth
    if kind == "expired":
        token = auth.mint(exp_in=-5)
    elif kind == "wrong-audience":
        token = auth.mint(exp_in=120, aud="someone-else")
    else:
        token = auth.mint(exp_in=120, key=auth.stray_key)
    reason = auth.login_refusal("app", token)
    assert word in reason, reason
    case.write_jwt(token)
    before = len(auth.bao.audit_entries())
    result = run_cli("render", "--config", str(case.config()), env=base_env())
    assert result.returncode == 77, result.stderr[-3000:]
    message = one_error(result.stderr)
    assert reason in message, f"OpenBao's reason {reason!r} is not in {message!r}"
    assert auth.mount in message, message
    assert [e for e in log_events(result.stderr) if e["event"] == "vault login"] == []
    audited = auth.logins(before)
    assert len(audited) == 1, "a refused login is not retried"
    assert audited[0][0]["request"]["data"]["jwt"] == auth.audit_hash(token)
    assert not (case.out / "api_key").exists()
    case.assert_clean({"stderr": result.stderr, "stdout": result.stdout, "status.json": case.status_json()})


@pytest.mark.hostile("filesystem")
def test_a_missing_jwt_file_is_66(case: Case) -> None:
    before = len(case.auth.bao.audit_entries())
    result = run_cli("render", "--config", str(case.config()), env=base_env())
    assert result.returncode == 66, result.stderr[-3000:]
    message = one_error(result.stderr)
    assert "jwt_file" in message and str(case.jwt_file) in message and "does not exist" in message, message
    assert case.auth.logins(before) == [], "no login without a JWT"
    assert not (case.out / "api_key").exists()


@pytest.mark.hostile("filesystem")
def test_an_unreadable_jwt_file_is_77(case: Case) -> None:
    """Root reads any file, so secret-init runs as root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH.

    `setpriv` drops both from the bounding set: uid 0 then gets every capability but those two, and
    a 0000 jwt_file is really unreadable (EACCES), as it is for a non-root user.
    """
    token = case.auth.mint(exp_in=120)
    case.write_jwt(token)
    case.jwt_file.chmod(0o000)
    no_dac = "-dac_override,-dac_read_search"
    command = ["setpriv", f"--bounding-set={no_dac}", f"--inh-caps={no_dac}", sys.executable, "-m", "secret_init"]
    check = subprocess.run(
        [*command[:3], "cat", str(case.jwt_file)], capture_output=True, text=True, timeout=10, check=False
    )
    assert check.returncode != 0 and "Permission denied" in check.stderr, "the capability drop does not bite"
    before = len(case.auth.bao.audit_entries())
    result = subprocess.run(
        [*command, "render", "--config", str(case.config())],
        env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    record_output(result.stdout, "secret-init stdout (no DAC capabilities)")
    record_output(result.stderr, "secret-init stderr (no DAC capabilities)")
    assert result.returncode == 77, result.stderr[-3000:]
    message = one_error(result.stderr)
    assert "jwt_file" in message and str(case.jwt_file) in message and "not readable" in message, message
    assert case.auth.logins(before) == []
    assert not (case.out / "api_key").exists()
    case.assert_clean({"stderr": result.stderr, "stdout": result.stdout})
