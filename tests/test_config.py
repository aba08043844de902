"""Config loading: every documented key, and one clear error for each kind of mistake."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from secret_init.config import (
    DEFAULT_OUTPUT_DIR,
    MAX_DURATION,
    SourceRef,
    VaultConfig,
    config_path,
    docs_table,
    is_loopback_url,
    load,
    load_text,
    parse_duration,
    parse_mode,
    parse_reference,
)
from secret_init.errors import ConfigError, ExitCode, SecretInitError
from tests.conftest import REPO, assert_no_leak, base_env, needs_root, random_secret, record_output, run_cli

FULL = """
[output]
dir = "/run/app-secrets"
user = "app"
mode = "0400"
allow_non_tmpfs = false
max_secret_size = 4096

[vault]
addr = "http://127.0.0.1:8200"
auth = "approle"
auth_mount = "approle"
role_id_file = "/run/secrets/vault_role_id"
secret_id_file = "/run/secrets/vault_secret_id"
ca_cert = "/run/secrets/vault_ca.pem"
namespace = ""
startup_timeout = "30s"
request_timeout = "5s"

[process]
scrub_env = ["AWS_SECRET_ACCESS_KEY", "DEBUG_*"]
allow_root = false

[[secret]]
name = "db_password"
source = "swarm:db_password"
env = "DB_PASSWORD_FILE"

[[secret]]
name = "tls.key"
source = "file:/etc/certs/tls.key"

[[secret]]
name = "stripe_key"
source = "vault:secret/data/payments#stripe_key"

[[secret]]
name = "payments.json"
source = "vault:secret/data/payments"

[[secret]]
name = "db.dsn"
source = "vault:database/creds/app"
template = "postgresql://${username}:${password}@db:5432/app"
mode = "0440"
user = "1000:1000"
"""


USED = '\n[[secret]]\nname = "x"\nsource = "vault:kv/x#f"'  # a secret that needs Vault


@pytest.mark.parametrize(
    ("vault", "message"),
    [
        ('auth = "token"\nrole = "a"', '[vault]: role is not used with auth = "token"; it is for "jwt", "kubernetes"'),
        ('auth = "cert"\njwt_file = "/j"', '[vault]: jwt_file is not used with auth = "cert"; it is for "jwt" and'),
        ('auth = "jwt"\nrole = "r"\njwt_file = "/j"\nrole_id_file = "/r"', "role_id_file is not used with auth"),
        ('auth = "kubernetes"\nrole = "r"\ntoken_file = "/t"', 'token_file is not used with auth = "kubernetes"'),
        ('auth = "token"\nauth_mount = "x"', 'auth_mount is not used with auth = "token"'),
        ('auth = "jwt"\nrole = "r"\njwt_file = "/j"\napprole_mount = "x"', "approle_mount is not used with auth"),
        ('auth = "jwt"\nrole = "r"\njwt_file = "/j"\nsecret_id_wrapped = true', "secret_id_wrapped is not used"),
        ('auth = "approle"\nrole_id_file = "/r"\nrole = "x"', 'role is not used with auth = "approle"'),
        ('auth = "jwt"\njwt_file = "/j"', '[vault]: role is required when auth = "jwt"'),
        ('auth = "jwt"\nrole = "r"', '[vault]: jwt_file is required when auth = "jwt"'),
        ('auth = "kubernetes"', '[vault]: role is required when auth = "kubernetes"'),
        (f'auth = "cert"\naddr = "https://v:8200"{USED}', '[vault]: client_cert is required when auth = "cert"'),
        ('auth = "cert"\naddr = "https://v:8200"\nclient_cert = "/c"', "client_key is required when auth"),
        ('client_key = "/k"', "[vault]: client_cert is required when client_key is set"),
        ('auth = "cert"\naddr = "http://v:8200"\nclient_cert = "/c"\nclient_key = "/k"', "must be https:// for auth"),
        ('auth = "approle"\nrole_id_file = "/r"\nsecret_id_wrapped = true', "secret_id_file is required when secret"),
        ('auth = "approle"\nrole_id_file = "/r"\napprole_mount = "a"\nauth_mount = "b"', "approle_mount differs"),
        ('auth = "jwt"\nrole = "r"\njwt_file = "/j"\nauth_mount = "a/../b"', "auth_mount must be a path"),
        ('auth = "jwt"\nrole = "r"\njwt_file = "/j"\nauth_mount = "/"', "auth_mount must be a path"),
        ('auth = "jwt"\nrole = "r"\njwt_file = "/j"\nauth_mount = "a?b"', "auth_mount must not hold '?'"),
        ('auth = "jwt"\nrole = "r"\njwt_file = "relative"', "jwt_file must be an absolute path"),
        ('auth = "oidc"', 'auth must be "token", "approle", "jwt", "kubernetes" or "cert", not \'oidc\''),
    ],
)
def test_auth_keys_go_only_with_their_method_and_the_message_names_the_key(vault: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(f"[vault]\n{vault}\n", "auth.toml", {})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value) and caught.value.exit_code == ExitCode.CONFIG


def test_each_auth_method_gets_its_defaults() -> None:
    """auth_mount is the method's name (approle_mount an alias); kubernetes reads the pod's token by default."""

    def vault(text: str, environ: dict[str, str] | None = None) -> VaultConfig:
        secret = '[[secret]]\nname = "x"\nsource = "vault:kv/x#f"\n'  # the environment counts only then
        return load_text(f'[vault]\naddr = "https://v:8200"\n{text}\n{secret}', "auth.toml", environ or {}).vault

    assert vault('auth = "kubernetes"\nrole = "r"').auth_mount == "kubernetes"
    assert vault('auth = "kubernetes"\nrole = "r"').jwt_file == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    assert vault('auth = "jwt"\nrole = "r"\njwt_file = "/j"\nauth_mount = "/team/ci/"').auth_mount == "team/ci"
    assert vault('auth = "approle"\nrole_id_file = "/r"\napprole_mount = "old/"').auth_mount == "old"
    assert vault('auth = "approle"\nrole_id_file = "/r"').auth_mount == "approle"
    assert vault("").auth_mount is None and vault("").jwt_file is None
    cert = vault('auth = "cert"', {"VAULT_CLIENT_CERT": "/c.pem", "BAO_CLIENT_KEY": "/k.pem"})
    assert (cert.client_cert, cert.client_key, cert.auth_mount, cert.role) == ("/c.pem", "/k.pem", "cert", None)
    mtls = vault('auth = "token"\nclient_cert = "/mine.pem"\nclient_key = "/mine.key"', {"VAULT_CLIENT_CERT": "/c"})
    assert (mtls.client_cert, mtls.client_key) == ("/mine.pem", "/mine.key")  # the file wins over the environment


def test_auth_cert_without_a_vault_secret_needs_no_certificate() -> None:
    """Like every default from the environment, the certificate matters only once a secret needs Vault."""
    cfg = load_text('[vault]\nauth = "cert"\n', "cert.toml", {"VAULT_CLIENT_CERT": "/c.pem", "VAULT_CLIENT_KEY": "/k"})
    assert cfg.vault.client_cert is None and not cfg.uses_vault


def test_a_client_certificate_from_the_environment_is_checked_only_when_vault_is_used() -> None:
    secret = '[[secret]]\nname = "x"\nsource = "vault:kv/x#f"\n'
    environ = {"VAULT_CLIENT_CERT": "relative.pem", "VAULT_CLIENT_KEY": "/k"}
    with pytest.raises(ConfigError, match=r"client_cert \(from \$VAULT_CLIENT_CERT\) must be an absolute path"):
        load_text(f'[vault]\naddr = "https://v:8200"\n{secret}', "env.toml", environ)
    unused = load_text('[[secret]]\nname = "x"\nsource = "swarm:x"\n', "env.toml", environ)
    assert unused.vault.client_cert is None and unused.vault.client_key is None  # nothing would present them


def test_the_documented_example_loads() -> None:
    """Every key from the issue's example is accepted and lands in the right field."""
    cfg = load_text(FULL, "full.toml", {})
    assert cfg.output.dir == "/run/app-secrets"
    assert cfg.output.user == "app"
    assert cfg.output.mode == 0o400
    assert cfg.output.max_secret_size == 4096
    assert cfg.vault.auth == "approle" and cfg.vault.auth_mount == "approle"
    assert cfg.vault.startup_timeout == 30.0
    assert cfg.vault.request_timeout == 5.0
    assert cfg.vault.namespace is None
    assert cfg.process.scrub_env == ("AWS_SECRET_ACCESS_KEY", "DEBUG_*")
    names = [s.name for s in cfg.secrets]
    assert names == ["db_password", "tls.key", "stripe_key", "payments.json", "db.dsn"]
    dsn = cfg.secrets[4]
    assert dsn.mode == 0o440 and dsn.user == "1000:1000"
    assert dsn.template is not None and dsn.template.fields == ("username", "password")
    assert cfg.secrets[2].source == SourceRef("vault", "secret/data/payments", "stripe_key")
    assert cfg.secrets[0].env == "DB_PASSWORD_FILE"
    assert cfg.uses_vault
    assert cfg.file_path(cfg.secrets[1]) == "/run/app-secrets/tls.key"


def test_defaults_and_environment() -> None:
    """An empty config is valid; Vault address and swarm dir come from the environment."""
    env = {"BAO_ADDR": "http://127.0.0.1:8300", "SECRET_INIT_SWARM_DIR": "/srv/secrets"}
    cfg = load_text("", "empty.toml", env)
    assert cfg.output.dir == DEFAULT_OUTPUT_DIR
    assert cfg.output.user is None
    assert cfg.output.mode == 0o400
    assert cfg.vault.addr == "http://127.0.0.1:8300"
    assert cfg.vault.auth == "token"
    assert cfg.swarm_dir == "/srv/secrets"
    assert not cfg.uses_vault
    both = load_text("", "x", {"VAULT_ADDR": "http://127.0.0.1:1", "BAO_ADDR": "http://127.0.0.1:2"})
    assert both.vault.addr == "http://127.0.0.1:1"
    assert load_text("", "x", {"VAULT_NAMESPACE": "team"}).vault.namespace == "team"
    assert load_text('[vault]\nnamespace = ""\n', "x", {"VAULT_NAMESPACE": "team"}).vault.namespace is None


def test_secrets_are_split_by_source_kind() -> None:
    """vault_specs and vault_paths (each path once, sorted): the one filter others share."""
    cfg = load_text(FULL, "full.toml", {})
    assert [s.name for s in cfg.vault_specs] == ["stripe_key", "payments.json", "db.dsn"]
    assert cfg.vault_paths == ["database/creds/app", "secret/data/payments"]
    assert cfg.notes == ()
    empty = load_text("", "x", {})
    assert (empty.vault_specs, empty.vault_paths) == ((), [])


SWARM_ONLY = '[[secret]]\nname = "x"\nsource = "swarm:x"\n'
VAULT_ONE = '[[secret]]\nname = "x"\nsource = "vault:secret/data/x"\n'


@pytest.mark.parametrize(
    "env",
    [
        {"VAULT_ADDR": "vault.internal:8200"},
        {"BAO_ADDR": "https://vault.internal:8200/v1"},
        {"VAULT_ADDR": "", "BAO_ADDR": "not an address"},
    ],
)
def test_a_bad_vault_address_in_the_environment_is_ignored_while_no_secret_uses_vault(env: dict[str, str]) -> None:
    """Issue 9 section 6: no exit 78 for an address nothing uses, only a note naming the variable, not its value."""
    name, value = next((k, v) for k, v in env.items() if v)
    cfg = load_text(SWARM_ONLY, "x.toml", env)
    assert cfg.vault.addr is None
    (note,) = cfg.notes
    assert f"${name}" in note and value not in note
    with pytest.raises(ConfigError) as info:
        load_text(VAULT_ONE, "bad.toml", env)
    assert info.value.exit_code == ExitCode.CONFIG
    assert str(info.value) == f"config bad.toml: [vault]: addr must look like http(s)://HOST:PORT, not {value!r}"


def test_a_bad_vault_address_in_the_file_always_fails() -> None:
    """Written in the file, a malformed addr is a config error even with no vault: source."""
    for text in ('[vault]\naddr = "vault:8200"\n' + SWARM_ONLY, '[vault]\naddr = "vault:8200"\n'):
        with pytest.raises(ConfigError) as info:
            load_text(text, "bad.toml", {"VAULT_ADDR": "http://127.0.0.1:8200"})
        assert str(info.value) == "config bad.toml: [vault]: addr must look like http(s)://HOST:PORT, not 'vault:8200'"


def test_a_good_environment_address_is_kept_and_a_bad_second_one_is_not_read() -> None:
    env = {"VAULT_ADDR": "http://127.0.0.1:8200/", "BAO_ADDR": "bad"}
    for text in (SWARM_ONLY, VAULT_ONE):
        cfg = load_text(text, "x", env)
        assert (cfg.vault.addr, cfg.notes) == ("http://127.0.0.1:8200", ())


@pytest.mark.parametrize("section", ["output", "vault", "process", "sidecar", "secret", "metrics"])
def test_the_docs_show_each_key_table_as_declared(section: str) -> None:
    """docs/configuration.md holds exactly what docs_table renders (regenerate it from there)."""
    docs = (REPO / "docs" / "configuration.md").read_text()
    assert f"\n\n{docs_table(section)}\n\n" in docs
    assert docs.count("| key | type | default | meaning |") == 6, "no other, hand-written key table"


def test_config_path_precedence() -> None:
    assert config_path("/a.toml", {"SECRET_INIT_CONFIG": "/b.toml"}) == "/a.toml"
    assert config_path(None, {"SECRET_INIT_CONFIG": "/b.toml"}) == "/b.toml"
    assert config_path(None, {}) == "/etc/secret-init/config.toml"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[output\n", "not valid TOML"),
        ('[output]\ndirr = "/x"\n', "unknown key(s) dirr"),
        ('colour = "red"\n', "top level: unknown key(s) colour"),
        ('[output]\ndir = "relative"\n', "dir must be an absolute path"),
        ('[output]\ndir = "/dev/shm/"\n', "shared system directory"),
        ('[output]\ndir = "/tmp"\n', "shared system directory"),
        ('[output]\nmode = "0999"\n', "not an octal mode"),
        ('[output]\nmode = "4755"\n', "bits beyond 0777"),
        ('[output]\nuser = "bad user"\n', "neither a user name nor uid:gid"),
        ('[output]\nallow_non_tmpfs = "yes"\n', "must be true or false"),
        ('[vault]\nauth = "kerberos"\n', "auth must be"),
        ('[vault]\nauth = "approle"\n', "role_id_file is required"),
        ('[vault]\naddr = "127.0.0.1:8200"\n', "must look like http(s)://"),
        ('[vault]\nstartup_timeout = "soon"\n', "not a duration"),
        ('[process]\nscrub_env = ["A B"]\n', "not a variable name"),
        ('[[secret]]\nsource = "swarm:x"\n', "name is required"),
        ('[[secret]]\nname = "x"\n', "source is required"),
        ('[[secret]]\nname = "../x"\nsource = "swarm:x"\n', "without '/'"),
        ('[[secret]]\nname = ".hidden"\nsource = "swarm:x"\n', "must not start with '.'"),
        ('[[secret]]\nname = "x"\nsource = "http://x"\n', "must start with swarm:, file: or vault:"),
        ('[[secret]]\nname = "x"\nsource = "file:relative"\n', "absolute path"),
        ('[[secret]]\nname = "x"\nsource = "vault:a/../b"\n', "'..' segments"),
        ('[[secret]]\nname = "x"\nsource = "vault:a#"\n', "non-empty name"),
        ('[[secret]]\nname = "x"\nsource = "swarm:x"\nenv = "VAULT_X_FILE"\n', "prefix secret-init removes"),
        ('[[secret]]\nname = "x"\nsource = "swarm:x"\nenv = "1BAD"\n', "not a valid environment variable"),
        ('[[secret]]\nname = "x"\nsource = "swarm:x"\ntemplate = "${a}"\n', "needs a vault: source"),
        ('[[secret]]\nname = "x"\nsource = "vault:a/b"\ntemplate = "$a"\n', "bad placeholder"),
        ('[[secret]]\nname = "x"\nsource = "swarm:x"\ncolor = 1\n', "unknown key(s) color"),
        ('[[secret]]\nname = "x"\nsource = "swarm:a"\n[[secret]]\nname = "x"\nsource = "swarm:b"\n', "used twice"),
        (
            '[[secret]]\nname = "x"\nsource = "swarm:a"\nenv = "A_FILE"\n'
            '[[secret]]\nname = "y"\nsource = "swarm:b"\nenv = "A_FILE"\n',
            "env A_FILE is used twice",
        ),
        ('secret = "x"\n', "must be written as [[secret]]"),
    ],
)
def test_mistakes_are_one_line_config_errors(text: str, message: str) -> None:
    """Each mistake is a ConfigError (exit 78) with a single line naming what is wrong."""
    with pytest.raises(ConfigError) as info:
        load_text(text, "bad.toml", {})
    assert info.value.exit_code == ExitCode.CONFIG
    text_of_error = str(info.value)
    assert message in text_of_error
    assert text_of_error.startswith("config bad.toml")
    assert "\n" not in text_of_error


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(str(tmp_path / "nope.toml"), {})
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(str(binary), {})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25), ("1.5s", 1.5), (12, 12), (0.5, 0.5), ("2d", 172800)],
)
def test_durations(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "s", "5", "5x", "m5", "1h 30m", True, -1, [1]])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ConfigError):
        parse_duration(bad)


@pytest.mark.parametrize(("text", "mode"), [("0400", 0o400), ("440", 0o440), ("0o600", 0o600), (0o400, 0o400)])
def test_modes(text: str | int, mode: int) -> None:
    assert parse_mode(text) == mode


def test_references() -> None:
    assert parse_reference("swarm:db") == SourceRef("swarm", "db")
    assert parse_reference("file:/etc/x") == SourceRef("file", "/etc/x")
    assert parse_reference("vault:secret/data/p#k") == SourceRef("vault", "secret/data/p", "k")
    assert parse_reference("vault:database/creds/app") == SourceRef("vault", "database/creds/app", None)
    for bad in ["swarm:a/b", "swarm:", "vault:/abs", "vault:a//b", "vault:a#b#c", "vault:", "vault:a b"]:
        with pytest.raises(ConfigError):
            parse_reference(bad)


@pytest.mark.parametrize(
    ("addr", "loopback"),
    [
        ("http://127.0.0.1:8200", True),
        ("http://127.9.9.9", True),
        ("http://[::1]:8200", True),
        ("http://localhost:8200", True),
        ("https://127.0.0.1:8200", True),
        ("http://127.0.0.1.attacker.example", False),
        ("http://10.0.0.1:8200", False),
        ("http://vault.internal:8200", False),
    ],
)
def test_loopback_means_a_loopback_address_not_a_lookalike_name(addr: str, loopback: bool) -> None:
    assert is_loopback_url(addr) is loopback


# -- credentials in the address ---------------------------------------------------------


def address_with(shape: str, secret: str) -> str:
    return {
        "userinfo": f"https://reader:{secret}@vault.internal:8200",
        "user only": f"http://{secret}@127.0.0.1:8200",
        "query": f"https://vault.internal:8200/?token={secret}",
        "fragment": f"https://vault.internal:8200#{secret}",
    }[shape]


@pytest.mark.hostile("config")
@pytest.mark.parametrize("shape", ["userinfo", "user only", "query", "fragment"])
@pytest.mark.parametrize("origin", ["file", "VAULT_ADDR", "BAO_ADDR"])
def test_credentials_in_the_vault_address_are_refused_without_echoing_them(origin: str, shape: str) -> None:
    """A user name, password or query in the address is exit 78, and the message never holds it."""
    secret = random_secret("addr")
    addr = address_with(shape, secret)
    text = (f'[vault]\naddr = "{addr}"\n' if origin == "file" else "") + VAULT_ONE
    with pytest.raises(ConfigError) as info:
        load_text(text, "bad.toml", {} if origin == "file" else {origin: addr})
    assert info.value.exit_code == ExitCode.CONFIG
    message = str(info.value)
    assert_no_leak(message, secret)
    want = "user name or password; use token_file or AppRole" if "@" in addr else "query or fragment"
    assert want in message and "\n" not in message


@pytest.mark.hostile("config")
def test_credentials_in_the_address_through_check_exit_78_and_stay_out_of_the_output(tmp_path: Path) -> None:
    secret = random_secret("addr")
    config = tmp_path / "config.toml"
    config.write_text(VAULT_ONE)
    result = run_cli("check", "--config", str(config), env=base_env(VAULT_ADDR=address_with("userinfo", secret)))
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert_no_leak(result.stdout + result.stderr, secret)
    (line,) = result.stderr.strip().splitlines()
    assert "the address carries a user name or password" in line


# -- modes ----------------------------------------------------------------------------------


@pytest.mark.hostile("config")
@pytest.mark.parametrize(("written", "meant"), [("400", "0400"), ("440", "0440"), ("600", "0600"), ("640", "0640")])
def test_a_decimal_toml_mode_is_refused_naming_what_was_meant(written: str, meant: str) -> None:
    """TOML `mode = 440` is decimal 440 = 0o670: refused, and the message says how to write 0440."""
    for where in ("[output]\n", '[[secret]]\nname = "x"\nsource = "swarm:x"\n'):
        with pytest.raises(ConfigError) as info:
            load_text(f"{where}mode = {written}\n", "bad.toml", {})
        assert info.value.exit_code == ExitCode.CONFIG
        octal = f"{int(written):#o}"
        assert (
            f'mode {written} is {octal} in octal (TOML integers are decimal); write mode = "{meant}" or 0o{written}'
            in str(info.value)
        )


@pytest.mark.parametrize(
    ("text", "mode"),
    [("0400", 0o400), ("400", 0o400), ("0o400", 0o400), ("0440", 0o440), ("440", 0o440), ("0o600", 0o600),
     ("0640", 0o640), (0o400, 0o400), (0o440, 0o440), (0o600, 0o600), (0o640, 0o640), (256, 0o400)],
)  # fmt: skip
def test_the_allowed_modes_in_every_spelling(text: str | int, mode: int) -> None:
    assert parse_mode(text) == mode
    shown = f'"{text}"' if isinstance(text, str) else f"{text:#o}"
    assert load_text(f"[output]\nmode = {shown}\n", "x", {}).output.mode == mode


@pytest.mark.hostile("config")
@pytest.mark.parametrize("mode", ["0444", "0644", "0o444", "0660", "0604", "0700", "0000", "0200", "0500", "0777"])
def test_modes_beyond_owner_read_write_and_group_read_are_refused(mode: str) -> None:
    """Only 0400, 0440, 0600 and 0640: never others-readable, never executable (0444 and 0644 were accepted)."""
    with pytest.raises(ConfigError, match="is not allowed; a secret file's mode is 0400, 0440, 0600 or 0640"):
        load_text(f'[output]\nmode = "{mode}"\n', "bad.toml", {})
    with pytest.raises(ConfigError, match="is not allowed"):
        load_text(f"[output]\nmode = 0o{mode.removeprefix('0o')[-3:]}\n", "bad.toml", {})


# -- durations and numbers -------------------------------------------------------------------


@pytest.mark.hostile("config")
@pytest.mark.parametrize(
    "value",
    ["nan", "+nan", "inf", "-inf", "-1", "1e309", '"1e309s"', '"nan s"', '"nan"', '"inf s"', '"-1s"',
     '"99999999999999999h"', '"366d"', f'"{"9" * 400}s"', "99999999999999999999", "31622400", '"٣s"'],
)  # fmt: skip
@pytest.mark.parametrize(
    "key",
    ["vault.startup_timeout", "vault.request_timeout", "vault.refresh_interval", "process.stop_timeout",
     "process.rotate_before"],
)  # fmt: skip
def test_durations_must_be_finite_and_at_most_a_year(key: str, value: str) -> None:
    """`stop_timeout = nan` never killed an app that ignored SIGTERM; a huge one overflowed time arithmetic."""
    section, name = key.split(".")
    with pytest.raises(ConfigError) as info:
        load_text(f"[{section}]\n{name} = {value}\n", "bad.toml", {})
    assert info.value.exit_code == ExitCode.CONFIG
    assert f"{name} " in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("365d", MAX_DURATION), ("0s", 0.0), (0, 0.0), (31536000, MAX_DURATION), ("8759h60m", MAX_DURATION)],
)
def test_the_duration_bounds_are_inclusive(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.hostile("config")
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[vault]\nrequest_timeout = 0\n", "request_timeout must be more than zero"),
        ('[vault]\nrefresh_interval = "500ms"\n', "refresh_interval must be at least 1s"),
        ('[process]\nrotate_before = "0s"\n', "rotate_before must be more than zero"),
        ("[output]\nmax_secret_size = 0\n", "must be a positive integer"),
        ("[output]\nmax_secret_size = 67108865\n", "must be at most 67108864"),
        ("[output]\nmax_secret_size = 9223372036854775807\n", "must be at most 67108864"),
        ("[output]\nmax_secret_size = 1e3\n", "must be a positive integer"),
        ("[output]\nmax_secret_size = nan\n", "must be a positive integer"),
        (f"[output]\nmax_secret_size = {'9' * 5000}\n", "a number too long"),
        ("a = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ],
)
def test_numbers_out_of_range_are_config_errors(text: str, message: str) -> None:
    """Each is 78 with one line; the last two raised ValueError and RecursionError (exit 70) before."""
    with pytest.raises(ConfigError) as info:
        load_text(text, "bad.toml", {})
    assert message in str(info.value) and "\n" not in str(info.value)


# -- control and format characters, NUL ----------------------------------------------------

INVISIBLE = ["\x85", "\x9b", "\u200e", "\u202e", "\u2028", "\u2029", "\ufeff", "\u0378", "\ue000", "\U000e0041", "\x1b"]


def toml_string(text: str) -> str:
    """A TOML basic string holding `text`, every character escaped as TOML allows."""
    return json.dumps(text)  # JSON's \\uXXXX escapes are TOML's too; astral ones become surrogate pairs, not TOML


def toml_escaped(text: str) -> str:
    escaped = "".join(c if c.isascii() and c.isprintable() else f"\\U{ord(c):08X}" for c in text)
    return '"' + escaped.replace('"', '\\"') + '"'


@pytest.mark.hostile("config")
@pytest.mark.parametrize("char", INVISIBLE)
@pytest.mark.parametrize(
    "where",
    [
        '[[secret]]\nname = {v}\nsource = "swarm:x"\n',
        '[[secret]]\nname = "x"\nsource = {v}\n',  # swarm:NAME
        '[[secret]]\nname = "x"\nsource = {f}\n',  # file:/PATH
        '[[secret]]\nname = "x"\nsource = {k}\n',  # vault:PATH#FIELD
        '[[secret]]\nname = "x"\nsource = "swarm:x"\nenv = {v}\n',
        "[output]\ndir = {p}\n",
        "[output]\nuser = {v}\n",
        "[vault]\ntoken_file = {p}\n",
        "[vault]\nnamespace = {v}\n",
        "[vault]\napprole_mount = {v}\n",
        '[vault]\nauth = "jwt"\nauth_mount = {v}\nrole = "r"\njwt_file = "/j"\n',
        '[vault]\nauth = "jwt"\nrole = {v}\njwt_file = "/j"\n',
        '[vault]\nauth = "jwt"\nrole = "r"\njwt_file = {p}\n',
        '[vault]\nclient_cert = {p}\nclient_key = "/k"\n',
        "[vault]\naddr = {a}\n",
        "[sidecar]\nnotify_pidfile = {p}\n",
    ],
)
def test_control_and_format_characters_are_refused_where_they_reach_a_name_or_a_log_line(where: str, char: str) -> None:
    """C1 controls, bidi overrides, separators, private and unassigned code points: 78, the message one line."""
    text = where.format(
        v=toml_escaped(f"a{char}b"),
        f=toml_escaped(f"file:/etc/a{char}b"),
        k=toml_escaped(f"vault:secret/data/a#f{char}"),
        p=toml_escaped(f"/run/a{char}b"),
        a=toml_escaped(f"http://vault{char}.internal:8200"),
    ).replace('source = "a', 'source = "swarm:a')
    with pytest.raises(ConfigError) as info:
        load_text(text, "bad.toml", {})
    message = str(info.value)
    assert info.value.exit_code == ExitCode.CONFIG
    assert message.isprintable(), "the message itself must not carry the character"


@pytest.mark.hostile("config")
@pytest.mark.parametrize(
    "text",
    [
        '[output]\ndir = "/run/a\\u0000b"\n',
        '[[secret]]\nname = "x"\nsource = "vault:a/b"\ntemplate = "a\\u0000${f}"\n',
        '[vault]\nnamespace = "\\u0000"\n',
        '[process]\nscrub_env = ["A", "B\\u0000"]\n',
        '"\\u0000" = 1\n',
        '[output]\n"dir\\u0000" = "/x"\n',
    ],
)
def test_nul_anywhere_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="holds NUL"):
        load_text(text, "bad.toml", {})


@needs_root
@pytest.mark.hostile("config")
def test_nul_in_output_dir_is_78_not_an_internal_error(tmpfs: Path) -> None:
    """It gave 70: os raised ValueError on the embedded NUL."""
    config = tmpfs / "config.toml"
    config.write_text(f'[output]\ndir = "{tmpfs}/out\\u0000x"\n')
    result = run_cli("render", "--config", str(config))
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert "holds NUL" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmpfs.iterdir()) == ["config.toml"]


# -- the config file itself -------------------------------------------------------------------


@pytest.mark.hostile("filesystem")
@pytest.mark.parametrize("kind", ["fifo", "directory", "/dev/zero", "/dev/null", "huge", "socket"])
def test_a_config_path_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    """A FIFO blocked forever, /dev/zero read without end: now 78 with one line, without blocking."""
    path = tmp_path / "config.toml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "huge":
        with open(path, "wb") as f:
            f.truncate(4 * 1024**3)  # sparse: no disk used
    elif kind == "socket":
        import socket

        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
    else:
        path = Path(kind)
    result = run_cli("check", "--config", str(path), timeout=20)
    assert result.returncode == ExitCode.CONFIG, result.stderr
    (line,) = result.stderr.strip().splitlines()
    want = "larger than" if kind == "huge" else "cannot be read" if kind == "socket" else "is not a regular file"
    assert want in line


def test_a_config_path_with_a_newline_stays_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(str(tmp_path / "a\nb\u202e.toml"), {})
    assert str(info.value).isprintable()


# -- output.dir spellings -----------------------------------------------------------------------


@pytest.mark.hostile("filesystem")
@pytest.mark.parametrize(
    "spelling",
    ["//tmp", "///tmp", "/tmp/.", "/tmp/./", "/tmp//", "//tmp/./.", "/./tmp", "/dev//shm", "//run/secrets/.",
     "/run/./secrets", "//", "/.", "//var//tmp//"],
)  # fmt: skip
def test_other_spellings_of_a_shared_dir_are_refused(spelling: str) -> None:
    """`//tmp` passed (POSIX normpath keeps a leading //) and render took /tmp over."""
    with pytest.raises(ConfigError, match="is a shared system directory") as info:
        load_text(f'[output]\ndir = "{spelling}"\n', "bad.toml", {})
    assert info.value.exit_code == ExitCode.CONFIG


@pytest.mark.hostile("filesystem")
@pytest.mark.parametrize("spelling", ["/run/secrets/../../tmp", "/run/app-secrets/..", "/x/../run/app-secrets"])
def test_dot_dot_in_output_dir_is_refused(spelling: str) -> None:
    with pytest.raises(ConfigError, match=r"must not have '\.\.' components"):
        load_text(f'[output]\ndir = "{spelling}"\n', "bad.toml", {})


@pytest.mark.parametrize(
    ("spelling", "normal"),
    [("/run/app-secrets/", "/run/app-secrets"), ("//run//app-secrets/.", "/run/app-secrets"), ("/srv/./a/", "/srv/a")],
)
def test_the_sink_gets_the_normalized_dir(spelling: str, normal: str) -> None:
    cfg = load_text(f'[output]\ndir = "{spelling}"\n[[secret]]\nname = "k"\nsource = "swarm:k"\n', "x", {})
    assert cfg.output.dir == normal
    assert cfg.file_path(cfg.secrets[0]) == f"{normal}/k"


@needs_root
@pytest.mark.hostile("filesystem")
def test_a_symlink_at_output_dir_to_a_shared_dir_is_refused(tmpfs: Path) -> None:
    (tmpfs / "out").symlink_to("/tmp")
    (tmpfs / "up").symlink_to("/")
    for directory in (tmpfs / "out", tmpfs / "up" / "tmp", tmpfs / "up" / "run" / "secrets"):
        config = tmpfs / "config.toml"
        config.write_text(f'[output]\ndir = "{directory}"\n')
        with pytest.raises(ConfigError, match="a shared system directory") as info:
            load(str(config), {})
        assert "resolves to /" in str(info.value)


@needs_root
@pytest.mark.hostile("filesystem")
def test_a_symlink_at_output_dir_is_refused_wherever_it_points(tmpfs: Path) -> None:
    (tmpfs / "real").mkdir()
    (tmpfs / "out").symlink_to(tmpfs / "real")
    config = tmpfs / "config.toml"
    for spelling in (f"{tmpfs}/out", f"{tmpfs}/out/", f"/{tmpfs}//out/."):
        config.write_text(f'[output]\ndir = "{spelling}"\n')
        with pytest.raises(SecretInitError, match="is a symlink") as info:
            load(str(config), {})
        assert info.value.exit_code == ExitCode.NO_PERMISSION


RENDER_IN_PRIVATE_SHARED_DIR = r"""
set -e
mount -t tmpfs si-test "$SI_DIR"
chmod 1777 "$SI_DIR"
mkdir -m 0700 "$SI_DIR/si-cfg"
cat > "$SI_DIR/si-cfg/secret"
printf '%s' "$SI_CONFIG" > "$SI_DIR/si-cfg/config.toml"
ln -s "$SI_DIR" "$SI_DIR/si-cfg/link"
ln -s / "$SI_DIR/si-cfg/root"
echo others > "$SI_DIR/.si-tmp-others"
echo others > "$SI_DIR/others"
set +e
"$SI_PYTHON" -m secret_init render --config "$SI_DIR/si-cfg/config.toml" 2>"$SI_DIR/si-cfg/stderr"
echo "rc=$?"
stat -c 'dir=%a %u %g' "$SI_DIR"
ls -A "$SI_DIR" | sed 's/^/entry=/'
sed 's/^/stderr=/' "$SI_DIR/si-cfg/stderr"
"""


def shared_dir_away_from_the_code() -> str:
    """A shared dir to hide under a private tmpfs: not one that holds this checkout or its interpreter."""
    code = (os.path.realpath(REPO), os.path.realpath(sys.prefix), os.path.realpath(sys.executable))
    for candidate in ("/var/tmp", "/tmp"):
        if not any(path == candidate or path.startswith(candidate + "/") for path in code):
            return candidate
    pytest.skip("this checkout lives under both /var/tmp and /tmp")


@needs_root
@pytest.mark.hostile("filesystem")
@pytest.mark.parametrize("spelling", ["/{d}", "{d}/./", "{d}/si-cfg/../..{d}", "{d}/si-cfg/link", "{d}/si-cfg/root{d}"])
def test_render_into_another_spelling_of_a_shared_dir_touches_nothing_there(spelling: str) -> None:
    """The realistic case, in a private mount namespace over its own tmpfs at a shared dir: render
    refuses (78) and the dir keeps its mode, owner and the others' entries (the sink's clean-up used
    to delete `.si-tmp-*`). The dir is /var/tmp, or /tmp if the checkout is under /var/tmp: the
    private tmpfs hides what was there, and the interpreter must stay reachable."""
    shared = shared_dir_away_from_the_code()
    secret = random_secret("render")
    config = (
        f'[output]\ndir = "{spelling.format(d=shared)}"\n'
        f'[[secret]]\nname = "k"\nsource = "file:{shared}/si-cfg/secret"\n'
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", RENDER_IN_PRIVATE_SHARED_DIR],
        input=secret,
        env=base_env(SI_CONFIG=config, SI_PYTHON=sys.executable, SI_DIR=shared),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    record_output(result.stdout + result.stderr, "render in a private shared dir")
    assert_no_leak(result.stdout + result.stderr, secret)
    facts = [line.split("=", 1) for line in result.stdout.splitlines() if "=" in line]
    assert ["rc", str(int(ExitCode.CONFIG))] in facts, result.stdout + result.stderr
    assert ["dir", f"{stat.S_IMODE(0o1777):o} 0 0"] in facts
    entries = sorted(value for key, value in facts if key == "entry")
    assert entries == [".si-tmp-others", "others", "si-cfg"]


@pytest.mark.hostile("config")
@pytest.mark.parametrize(
    "text",
    [
        f'[[secret]]\nname = "{"n" * 100_000}"\nsource = "swarm:x"\n',
        f'[[secret]]\nname = "x"\nsource = "{"q" * 100_000}"\n',
        "".join(f"k{i} = 1\n" for i in range(20_000)),
        f'[output]\ndir = "/run/{"d/" * 30_000}../x"\n',
        f'[vault]\naddr = "{"v" * 100_000}"\n',
    ],
)
def test_a_huge_value_makes_a_short_message(text: str) -> None:
    """A 100 KB name was quoted whole: one log line as big as the config file."""
    with pytest.raises(ConfigError) as info:
        load_text(text, "bad.toml", {})
    assert len(str(info.value)) < 400


@pytest.mark.hostile("config")
@pytest.mark.parametrize(
    "user", ["4294967295:0", "0:4294967295", "99999999999999999999:1", "1:" + "9" * 400, "1" * 5000 + ":1"]
)
def test_a_uid_or_gid_beyond_uid_t_is_a_config_error(user: str) -> None:
    """4294967295 is (uid_t)-1, "unchanged" to chown: render left files root's; bigger: OverflowError, exit 70."""
    for where in ("[output]\n", '[[secret]]\nname = "x"\nsource = "swarm:x"\n'):
        with pytest.raises(ConfigError, match="a uid or gid must be at most 4294967294"):
            load_text(f'{where}user = "{user}"\n', "bad.toml", {})
    assert load_text('[output]\nuser = "4294967294:4294967294"\n', "x", {}).output.user == "4294967294:4294967294"


@needs_root
@pytest.mark.hostile("config")
def test_a_huge_uid_through_render_is_78_not_an_internal_error(tmpfs: Path) -> None:
    secret = random_secret("uid")
    (tmpfs / "source").write_text(secret)
    config = tmpfs / "config.toml"
    config.write_text(
        f'[output]\ndir = "{tmpfs}/out"\nuser = "99999999999999999999:1"\n'
        f'[[secret]]\nname = "a"\nsource = "file:{tmpfs}/source"\n'
    )
    result = run_cli("render", "--config", str(config))
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmpfs / "out").exists()


@pytest.mark.hostile("config")
def test_a_uid_of_5000_digits_through_check_is_78_not_an_internal_error(tmp_path: Path) -> None:
    """int() refuses a string of over 4300 digits with ValueError: `check` said "internal error" (70)."""
    config = tmp_path / "config.toml"
    config.write_text(f'[output]\nuser = "{"1" * 5000}:1"\n[[secret]]\nname = "a"\nsource = "swarm:a"\n')
    result = run_cli("check", "--config", str(config))
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert "a uid or gid must be at most 4294967294" in result.stderr


@pytest.mark.hostile("config")
@pytest.mark.parametrize("swarm_dir", ["relative/secrets", "/run/se\u202ecrets", "/run/\x85"])
def test_the_swarm_dir_from_the_environment_is_an_absolute_printable_path(swarm_dir: str) -> None:
    env = {"SECRET_INIT_SWARM_DIR": swarm_dir}
    with pytest.raises(ConfigError, match=r"environment: \$SECRET_INIT_SWARM_DIR ") as info:
        load_text(SWARM_ONLY, "bad.toml", env)
    assert unprintable_free(str(info.value))
    assert load_text(VAULT_ONE, "x.toml", {**env, "VAULT_ADDR": "http://127.0.0.1:1"}).swarm_dir == swarm_dir


def unprintable_free(text: str) -> bool:
    return all(c.isprintable() for c in text)
