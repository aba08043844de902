"""vault: sources against a real OpenBao dev server: KV v1/v2, fields, JSON, templates, errors."""

import json
import secrets
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    Bao,
    UnixUser,
    assert_no_leak,
    base_env,
    free_port,
    log_events,
    needs_root,
    random_secret,
    run_cli,
    secret_files,
    write_config,
)

pytestmark = needs_root


class Setup:
    """Fresh KV v1 and v2 secrets under unique paths, and AppRole credential files."""

    def __init__(self, bao: Bao, tmpfs: Path, workdir: Path) -> None:
        self.bao = bao
        self.out = tmpfs / "out"
        self.workdir = workdir
        self.key = secrets.token_hex(6)
        self.v2: dict[str, Any] = {
            "stripe_key": random_secret("sk"),
            "user": "svc",
            "pass": random_secret("pw"),
            "port": 5432,
        }
        self.v1 = {"password": random_secret("v1")}
        bao.client.secrets.kv.v2.create_or_update_secret(path=f"app/{self.key}", secret=self.v2)
        bao.client.secrets.kv.v1.create_or_update_secret(path=f"app/{self.key}", secret=self.v1, mount_point="kv1")
        self.role_file, self.secret_file, self.secret_id = bao.approle_credentials("app", workdir)
        self.role_id = self.role_file.read_text()

    @property
    def v2_path(self) -> str:
        return f"secret/data/app/{self.key}"

    def values(self) -> list[str]:
        return [self.v2["stripe_key"], self.v2["pass"], self.v1["password"], self.secret_id]

    def config(self, secrets_toml: str, vault_extra: str = "", output_extra: str = 'user = "65534:65534"') -> Path:
        return write_config(
            self.workdir,
            f"""
[output]
dir = "{self.out}"
{output_extra}

[vault]
addr = "{self.bao.addr}"
auth = "approle"
role_id_file = "{self.role_file}"
secret_id_file = "{self.secret_file}"
startup_timeout = "5s"
{vault_extra}

{secrets_toml}
""",
        )


@pytest.fixture
def setup(bao: Bao, tmpfs: Path, workdir: Path) -> Setup:
    return Setup(bao, tmpfs, workdir)


def audit_requests(bao: Bao, path: str, since: int = 0) -> list[dict[str, Any]]:
    return [e for e in bao.audit_entries()[since:] if e.get("type") == "request" and e["request"].get("path") == path]


def test_kv_fields_json_and_templates_with_approle(setup: Setup) -> None:
    """Every render shape from one approle login; one read per path; values never logged."""
    before = len(setup.bao.audit_entries())
    accessors = setup.bao.token_accessors()
    cfg = setup.config(f"""
[[secret]]
name = "stripe_key"
source = "vault:{setup.v2_path}#stripe_key"

[[secret]]
name = "payments.json"
source = "vault:{setup.v2_path}"

[[secret]]
name = "port"
source = "vault:{setup.v2_path}#port"

[[secret]]
name = "db.dsn"
source = "vault:{setup.v2_path}"
template = "postgresql://${{user}}:${{pass}}@db:${{port}}/app"
mode = "0440"

[[secret]]
name = "legacy"
source = "vault:kv1/app/{setup.key}#password"
""")
    result = run_cli("--log-level", "debug", "render", "--config", str(cfg), env=base_env())
    assert result.returncode == 0, result.stderr
    out = setup.out
    assert (out / "stripe_key").read_text() == setup.v2["stripe_key"]
    assert json.loads((out / "payments.json").read_text()) == setup.v2
    assert (out / "port").read_text() == "5432"
    assert (out / "db.dsn").read_text() == f"postgresql://svc:{setup.v2['pass']}@db:5432/app"
    assert (out / "legacy").read_text() == setup.v1["password"]
    assert stat.S_IMODE((out / "db.dsn").stat().st_mode) == 0o440
    assert (out / "stripe_key").stat().st_uid == 65534

    assert len(audit_requests(setup.bao, setup.v2_path, before)) == 1, "one read per path"
    assert setup.bao.token_accessors() == accessors, "the AppRole token must be revoked after use"
    assert_no_leak(result.stdout + result.stderr, *setup.values(), setup.role_id)
    assert "vault login" in [e["event"] for e in log_events(result.stderr)]


def test_token_auth_from_bao_env_and_token_file(setup: Setup) -> None:
    """BAO_ADDR/BAO_TOKEN work without VAULT_*, and token_file too; a supplied token is not revoked."""
    token = setup.bao.client.auth.token.create(policies=["app-read"], ttl="5m")["auth"]["client_token"]
    secrets_toml = f'[[secret]]\nname = "k"\nsource = "vault:{setup.v2_path}#stripe_key"\n'
    cfg = write_config(setup.workdir, f'[output]\ndir = "{setup.out}"\nuser = "65534:65534"\n{secrets_toml}')
    result = run_cli("render", "--config", str(cfg), env=base_env(BAO_ADDR=setup.bao.addr, BAO_TOKEN=token))
    assert result.returncode == 0, result.stderr
    assert (setup.out / "k").read_text() == setup.v2["stripe_key"]
    assert setup.bao.client.auth.token.lookup(token)["data"]["ttl"] > 0
    assert_no_leak(result.stderr, token, setup.v2["stripe_key"])

    token_file = setup.workdir / "token"
    token_file.write_text(token + "\n")
    (setup.out / "k").unlink()
    cfg = write_config(
        setup.workdir,
        f'[output]\ndir = "{setup.out}"\nuser = "65534:65534"\n'
        f'[vault]\naddr = "{setup.bao.addr}"\ntoken_file = "{token_file}"\n{secrets_toml}',
    )
    result = run_cli("render", "--config", str(cfg), env=base_env())
    assert result.returncode == 0, result.stderr
    assert (setup.out / "k").read_text() == setup.v2["stripe_key"]


@pytest.mark.hostile("config")
def test_missing_token_is_a_config_error(setup: Setup) -> None:
    cfg = write_config(
        setup.workdir,
        f'[output]\ndir = "{setup.out}"\n[vault]\naddr = "{setup.bao.addr}"\n'
        f'[[secret]]\nname = "k"\nsource = "vault:{setup.v2_path}#stripe_key"\n',
    )
    result = run_cli("render", "--config", str(cfg), env=base_env())
    assert result.returncode == 78
    assert "VAULT_TOKEN" in result.stderr


@pytest.mark.hostile("vault-answers")
@pytest.mark.parametrize("shape", ["field", "template"])
def test_missing_field_is_65_and_nothing_is_written(setup: Setup, shape: str) -> None:
    broken = (
        f'source = "vault:{setup.v2_path}#nope"'
        if shape == "field"
        else f'source = "vault:{setup.v2_path}"\ntemplate = "${{user}}:${{nope}}"'
    )
    cfg = setup.config(
        f'[[secret]]\nname = "good"\nsource = "vault:{setup.v2_path}#stripe_key"\n[[secret]]\nname = "bad"\n{broken}\n'
    )
    accessors = setup.bao.token_accessors()
    result = run_cli("render", "--config", str(cfg), env=base_env())
    assert result.returncode == 65, result.stderr
    assert setup.bao.token_accessors() == accessors, "the login token is revoked on failure too"
    assert "nope" in result.stderr and "'bad'" in result.stderr
    assert "stripe_key" in result.stderr  # the field names that exist are listed; their values are not
    assert secret_files(setup.out) == []
    assert_no_leak(result.stderr, *setup.values())


@pytest.mark.hostile("vault-answers")
def test_vault_value_over_max_secret_size_is_65(setup: Setup) -> None:
    cfg = setup.config(
        f'[[secret]]\nname = "big"\nsource = "vault:{setup.v2_path}#stripe_key"\n',
        output_extra='user = "65534:65534"\nmax_secret_size = 8',
    )
    result = run_cli("render", "--config", str(cfg), env=base_env())
    assert result.returncode == 65, result.stderr
    assert "max_secret_size" in result.stderr
    assert not (setup.out / "big").exists()


@pytest.mark.hostile("vault-answers")
def test_forbidden_path_is_77_not_retried_and_names_path_not_token(setup: Setup) -> None:
    setup.bao.client.secrets.kv.v2.create_or_update_secret(path=f"forbidden/{setup.key}", secret={"k": "v"})
    path = f"secret/data/forbidden/{setup.key}"
    before = len(setup.bao.audit_entries())
    cfg = setup.config(f'[[secret]]\nname = "nope"\nsource = "vault:{path}#k"\n')
    result = run_cli("render", "--config", str(cfg), env=base_env())
    assert result.returncode == 77, result.stderr
    error = next(e for e in log_events(result.stderr) if e["level"] == "error")["event"]
    assert path in error and "nope" in error and "403" in error
    assert len(audit_requests(setup.bao, path, before)) == 1, "a 403 is not retried"
    assert_no_leak(result.stderr, setup.secret_id, setup.bao.root_token)


@pytest.mark.hostile("vault-answers")
def test_absent_path_is_66(setup: Setup) -> None:
    cfg = setup.config(f'[[secret]]\nname = "gone"\nsource = "vault:secret/data/app/absent-{setup.key}#k"\n')
    result = run_cli("render", "--config", str(cfg), env=base_env())
    assert result.returncode == 66, result.stderr
    assert f"secret/data/app/absent-{setup.key}" in result.stderr


@pytest.mark.hostile("vault-answers")
def test_bad_approle_secret_id_is_77(setup: Setup) -> None:
    setup.secret_file.write_text(random_secret("wrong"))
    cfg = setup.config(f'[[secret]]\nname = "k"\nsource = "vault:{setup.v2_path}#stripe_key"\n')
    result = run_cli("render", "--config", str(cfg), env=base_env())
    assert result.returncode == 77, result.stderr
    assert "AppRole login" in result.stderr
    assert_no_leak(result.stderr, setup.secret_file.read_text())


@pytest.mark.hostile("faults")
def test_vault_down_exits_69_within_startup_timeout(setup: Setup) -> None:
    """Nothing listens on the port: secret-init retries with backoff, then gives up at the bound."""
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = setup.config(
        f'[[secret]]\nname = "k"\nsource = "vault:{setup.v2_path}#stripe_key"\n',
        vault_extra="",
    )
    cfg.write_text(cfg.read_text().replace(setup.bao.addr, dead).replace('"5s"', '"2s"'))
    started = time.monotonic()
    result = run_cli("render", "--config", str(cfg), env=base_env())
    elapsed = time.monotonic() - started
    assert result.returncode == 69, result.stderr
    error = next(e for e in log_events(result.stderr) if e["level"] == "error")["event"]
    assert dead in error and "Connection refused" in error
    retries = [e for e in log_events(result.stderr) if e["event"] == "vault request failed, retrying"]
    assert len(retries) >= 2
    assert 2.0 <= elapsed < 2.0 + 10, "gives up after startup_timeout, not before and not much later"
    assert not setup.out.exists() or secret_files(setup.out) == []


@pytest.mark.hostile("app-user")
def test_run_with_vault_keeps_vault_out_of_the_app(setup: Setup, app_user: UnixUser, probe: list[str]) -> None:
    cfg = setup.config(
        f'[[secret]]\nname = "stripe_key"\nsource = "vault:{setup.v2_path}#stripe_key"\nenv = "STRIPE_KEY_FILE"\n',
        output_extra=f'user = "{app_user.name}"',
    )
    env = base_env(VAULT_ADDR=setup.bao.addr, VAULT_TOKEN=setup.bao.root_token, BAO_TOKEN=setup.bao.root_token)
    result = run_cli("run", "--config", str(cfg), "--", *probe, str(setup.out), env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["resuid"] == [app_user.uid] * 3
    assert not [k for k in report["env"] if k.startswith(("VAULT_", "BAO_"))]
    assert report["env"]["STRIPE_KEY_FILE"] == f"{setup.out}/stripe_key"
    assert report["files"]["STRIPE_KEY_FILE"]["bytes"] == len(setup.v2["stripe_key"])
    assert_no_leak(result.stdout + result.stderr, *setup.values(), setup.bao.root_token)


def test_check_asks_capabilities_and_reads_no_value(setup: Setup) -> None:
    setup.bao.client.secrets.kv.v2.create_or_update_secret(path=f"forbidden/{setup.key}", secret={"k": "v"})
    before = len(setup.bao.audit_entries())
    accessors = setup.bao.token_accessors()
    cfg = setup.config(
        f'[[secret]]\nname = "ok"\nsource = "vault:{setup.v2_path}#stripe_key"\n'
        f'[[secret]]\nname = "denied"\nsource = "vault:secret/data/forbidden/{setup.key}#k"\n'
    )
    result = run_cli("check", "--config", str(cfg), env=base_env())
    assert result.returncode == 77, result.stdout + result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert rows["ok"].endswith("  ok")
    assert "may not read" in rows["denied"]
    assert not setup.out.exists()
    reads = [
        e for e in setup.bao.audit_entries()[before:]
        if e.get("type") == "request" and e["request"]["path"].startswith(("secret/", "kv1/"))
    ]  # fmt: skip
    assert reads == [], "check must not read any secret"
    assert setup.bao.token_accessors() == accessors, "check's login token is revoked"
    assert_no_leak(result.stdout + result.stderr, *setup.values())


@pytest.mark.hostile("faults")
def test_check_reports_vault_down(setup: Setup) -> None:
    cfg = setup.config(f'[[secret]]\nname = "k"\nsource = "vault:{setup.v2_path}#stripe_key"\n')
    cfg.write_text(cfg.read_text().replace(setup.bao.addr, f"http://127.0.0.1:{free_port()}").replace('"5s"', '"1s"'))
    result = run_cli("check", "--config", str(cfg), env=base_env())
    assert result.returncode == 69
    assert any(line.startswith("(vault)") and "unavailable" in line for line in result.stdout.splitlines())


# -- the pure parts of the auth methods (the logins themselves: tests/test_auth_*.py, test_wrapped_secret_id.py) --


@pytest.mark.parametrize(
    ("path", "mount", "expected"),
    [
        ("auth/approle/role/app/secret-id", "approle", True),
        ("auth/team/approle/role/app/secret-id", "team/approle", True),
        ("auth/approle/role/app/secret-id", "other", False),
        ("auth/approle/role/app/secret-id-accessor/lookup", "approle", False),
        ("auth/approle/role/app/custom-secret-id", "approle", False),
        ("auth/approle/role/a/b/secret-id", "approle", False),
        ("secret/data/app/x", "approle", False),
        ("sys/wrapping/wrap", "approle", False),
        ("auth/approleX/role/app/secret-id", "approle", False),
    ],
)
def test_only_an_approle_secret_id_path_under_the_mount_is_accepted_for_a_wrapping_token(
    path: str, mount: str, expected: bool
) -> None:
    from secret_init.vault import _is_secret_id_path

    assert _is_secret_id_path(path, mount) is expected


def test_a_client_key_that_is_encrypted_or_foreign_is_a_config_error_and_nothing_prompts(tmp_path: Path) -> None:
    """OpenSSL would ask for an encrypted key's passphrase on the terminal: the check refuses it instead."""
    import subprocess

    from secret_init.client_cert import check_key_pair
    from secret_init.errors import ConfigError, SourceError

    def pair(name: str, *extra: str) -> tuple[Path, Path]:
        key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", *extra,
             "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}"],
            check=True, capture_output=True, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        return cert, key

    cert, key = pair("plain", "-nodes")
    check_key_pair(str(cert), str(key))  # a matching, unencrypted pair passes
    enc_cert, enc_key = pair("enc", "-passout", "pass:" + secrets.token_hex(8))
    with pytest.raises(ConfigError, match=r"client_key: .*enc\.key is encrypted"):
        check_key_pair(str(enc_cert), str(enc_key))
    other_cert, _ = pair("other", "-nodes")
    with pytest.raises(ConfigError, match="the key does not match the certificate"):
        check_key_pair(str(other_cert), str(key))
    with pytest.raises(ConfigError, match="not a PEM certificate and key"):
        check_key_pair(str(cert), str(cert))
    with pytest.raises(SourceError, match="No such file"):
        check_key_pair(str(tmp_path / "missing.pem"), str(key))


def test_an_empty_client_certificate_or_key_is_66_like_every_empty_credential_file(tmp_path: Path) -> None:
    from secret_init import client_cert
    from secret_init.errors import SourceError

    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("\n")
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(SourceError, match=r"vault client_cert: .*c\.pem is empty") as raised:
        client_cert.load(str(cert), str(key))
    assert raised.value.exit_code == 66
