"""Config loading: every documented key, and one clear error for each kind of mistake."""

from pathlib import Path

import pytest

from secret_init.config import (
    DEFAULT_OUTPUT_DIR,
    SourceRef,
    config_path,
    docs_table,
    is_loopback_url,
    load,
    load_text,
    parse_duration,
    parse_mode,
    parse_reference,
)
from secret_init.errors import ConfigError, ExitCode
from tests.conftest import REPO

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
token_file = "/run/secrets/vault_token"
role_id_file = "/run/secrets/vault_role_id"
secret_id_file = "/run/secrets/vault_secret_id"
approle_mount = "approle"
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


def test_the_documented_example_loads() -> None:
    """Every key from the issue's example is accepted and lands in the right field."""
    cfg = load_text(FULL, "full.toml", {})
    assert cfg.output.dir == "/run/app-secrets"
    assert cfg.output.user == "app"
    assert cfg.output.mode == 0o400
    assert cfg.output.max_secret_size == 4096
    assert cfg.vault.auth == "approle"
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
        {"BAO_ADDR": "https://user:pw@vault.internal:8200/v1"},
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


@pytest.mark.parametrize("section", ["output", "vault", "process", "sidecar", "secret"])
def test_the_docs_show_each_key_table_as_declared(section: str) -> None:
    """docs/configuration.md holds exactly what docs_table renders (regenerate it from there)."""
    docs = (REPO / "docs" / "configuration.md").read_text()
    assert f"\n\n{docs_table(section)}\n\n" in docs
    assert docs.count("| key | type | default | meaning |") == 5, "no other, hand-written key table"


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
