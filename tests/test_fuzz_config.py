"""Fuzzing the configuration (hypothesis, derandomized): TOML documents built from the real key set,
random bytes, huge, deep and unicode documents, source references, templates and secret names.

The invariant: a loaded config, or a ConfigError (exit 78) with one line; never another exception;
no value the document marks secret (a password in `addr`, a template's text) in the message. A
subset runs through the real `secret-init check` and `render` in a tmpfs: a documented exit code,
no traceback, no secret in the output, and after a failure no file in the output dir.
"""

import math
import os
import re
import shutil
import string
import typing
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secret_init import config
from secret_init.config import (
    ALLOWED_MODES,
    MAX_DURATION,
    SHARED_DIRS,
    Config,
    load,
    load_text,
    parse_reference,
    unprintable,
    validate_name,
)
from secret_init.errors import ConfigError, ExitCode, SecretInitError
from secret_init.template import parse_template
from tests.conftest import assert_no_leak, base_env, log_events, needs_root, random_secret, record_cases, run_cli

# Repeatable in CI: the same examples on every run, no example database.
FAST = settings(derandomize=True, database=None, deadline=None, max_examples=1000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
CLI = settings(FAST, max_examples=150, suppress_health_check=[*FAST.suppress_health_check,
                                                             HealthCheck.function_scoped_fixture])  # fmt: skip
CLI_CODES: Counter[tuple[str, int]] = Counter()  # (command, exit code): shown with -s, for docs/reliability.md
DOCUMENTED_CODES = {int(code) for code in ExitCode} - {int(ExitCode.SOFTWARE)}
SECTIONS = {"output": config.OutputConfig, "vault": config.VaultConfig, "process": config.ProcessConfig,
            "sidecar": config.SidecarConfig}  # fmt: skip


def declared_keys(record: type) -> list[str]:
    """A section's keys: its fields annotated with how they are read (rotate_signal is not one)."""
    return [name for name, hint in record.__annotations__.items() if getattr(hint, "__metadata__", ())]


KEYS = {section: declared_keys(record) for section, record in SECTIONS.items()}
SECRET_KEYS = declared_keys(config.SecretSpec)

# -- values --------------------------------------------------------------------------

# Characters that broke or could break something: controls C0/C1, bidi, separators, NUL, surrogates
# are not in TOML, private use, unassigned, combining, full-width digits.
HOSTILE_CHARS = (
    "\x00\x01\x1b\x7f\x85\x9b\u00ad\u200b\u200e\u202e\u2028\u2029\ufeff\ue000\u0378\u0301\uff11\u0663 /.$#@?:"
)
hostile_text = st.text(alphabet=st.sampled_from(HOSTILE_CHARS) | st.characters(codec="utf-8"), max_size=40)
durations = st.sampled_from(["30s", "5m", "1h30m", "250ms", "0s", "365d", "366d", "1e309s", "nan s", "-1s",
                             "99999999999999999h", "9" * 400 + "s", "1.5s", "\u0663s", " 5s ", "5", ""])  # fmt: skip
modes = st.sampled_from(["0400", "440", "0o600", "0640", "0444", "0644", "0777", "4755", "0999", "", "0o", "07777"])
addrs = st.sampled_from(["http://127.0.0.1:1", "https://vault:8200/", "http://[::1", "http://h:99999", "vault:8200",
                         "http://127.0.0.1:1/v1", "http://h\u202e:1", ""])  # fmt: skip
paths = st.sampled_from(["/run/app-secrets", "//tmp", "/tmp/./", "/run/secrets/../../tmp", "relative", "/", "//",
                         "/dev/shm/", "/var/run", "/srv/x/.", "/a\u0085b", "/run/x\u202e"])  # fmt: skip
references = st.one_of(
    st.sampled_from(["swarm:db", "swarm:", "swarm:a/b", "swarm:.x", "file:/etc/x", "file:rel", "vault:secret/data/a#f",
                     "vault:a/../b", "vault:a#", "vault:a#b#c", "vault:/x", "vault:a#f\u202e", "http://x", ""]),
    st.builds(lambda kind, rest: f"{kind}:{rest}", st.sampled_from(["swarm", "file", "vault", "Vault"]), hostile_text),
)  # fmt: skip
plain_values = st.one_of(
    hostile_text,
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.lists(st.text(max_size=8), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
PLAUSIBLE = {
    "dir": paths, "mode": modes | st.sampled_from([256, 288, 440, 400, 0o644, 0o4755, -1]), "addr": addrs,
    "startup_timeout": durations, "request_timeout": durations, "refresh_interval": durations,
    "stop_timeout": durations | st.sampled_from([math.nan, math.inf, -0.0, 1e308, 10**30]), "rotate_before": durations,
    "source": references, "name": hostile_text, "env": hostile_text,
    "user": st.sampled_from(["app", "0:0", "\u0661:0", "a b", "4294967295:0", "0:99999999999999999999"]),
    "on_rotate": st.sampled_from(["restart", "none", "signal:HUP", "signal:KILL", "signal:\u0130", "signal:"]),
    "stop_signal": st.sampled_from(["TERM", "SIGKILL", "sig", "\u017fIGTERM"]),
    "max_secret_size": st.sampled_from([1, 0, 2**26, 2**26 + 1, 2**63 - 1, 1.5]),
}  # fmt: skip


GOOD: dict[str, st.SearchStrategy[object]] = {
    "dir": st.sampled_from(["/run/app-secrets", "/run/si/out/", "//run//si/.", "/srv/secrets"]),
    "user": st.sampled_from(["0:0", "root", "1000:1000"]),
    "mode": st.sampled_from(["0400", "440", "0o600", 0o640, 256]),
    "allow_non_tmpfs": st.booleans(), "max_secret_size": st.integers(1, 2**26),
    "addr": st.sampled_from(["http://127.0.0.1:8200", "https://[::1]:8200/", "https://vault.internal"]),
    "auth": st.just("token"), "token_file": st.just("/run/secrets/token"), "role_id_file": st.just("/run/secrets/r"),
    "secret_id_file": st.just("/run/secrets/s"), "approle_mount": st.sampled_from(["approle", "/auth/x/", ""]),
    "ca_cert": st.just("/etc/ca.pem"), "namespace": st.sampled_from(["", "team", "a/b"]),
    "startup_timeout": st.sampled_from(["0s", "30s", 5, 0.5]), "request_timeout": st.sampled_from(["10s", "250ms", 3]),
    "refresh_interval": st.sampled_from(["5m", "1s", 3600]), "revoke_on_exit": st.booleans(),
    "scrub_env": st.sampled_from([[], ["AWS_SECRET"], ["DEBUG_*", "X"]]), "allow_root": st.booleans(),
    "supervise": st.booleans(), "stop_signal": st.sampled_from(["TERM", "SIGINT", "hup"]),
    "stop_timeout": st.sampled_from(["10s", "0s", "1h30m", 2.5, "365d"]),
    "rotate_before": st.sampled_from(["1s", "2h"]),
    "on_rotate": st.sampled_from(["restart", "none", "signal:HUP", "signal:SIGUSR1"]),
    "on_expiry": st.sampled_from(["stop", "keep"]), "notify_pidfile": st.just("/run/app.pid"),
    "notify_signal": st.sampled_from(["HUP", "SIGUSR2"]),
}  # fmt: skip


@st.composite
def good_secret(draw: st.DrawFn, i: int) -> dict[str, object]:
    source = draw(st.sampled_from([f"swarm:s{i}", f"file:/etc/s{i}", "vault:kv/data/app", "vault:kv/app#f.1"]))
    table: dict[str, object] = {
        "name": f"s{i}" + draw(st.sampled_from(["", ".pem", "-key", "\u00e9"])),
        "source": source,
    }
    if draw(st.booleans()):
        table["env"] = f"S{i}_FILE"
    if source == "vault:kv/data/app" and draw(st.booleans()):
        table["template"] = "user=${username} pass=${password} $$"
    if draw(st.booleans()):
        table["mode"] = draw(GOOD["mode"])
    return table


def bad_value(key: str) -> st.SearchStrategy[object]:
    return (PLAUSIBLE[key] | plain_values) if key in PLAUSIBLE else plain_values


# -- writing TOML ---------------------------------------------------------------------


def toml_string(text: str) -> str:
    """A TOML basic string: printable ASCII as is, everything else escaped (surrogates cannot be)."""
    return '"' + "".join(c if " " <= c <= "~" and c not in '"\\' else f"\\U{ord(c):08X}" for c in text) + '"'


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_table(header: str, table: dict[str, object]) -> str:
    return f"{header}\n" + "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in table.items())


def no_surrogates(value: object) -> bool:
    """TOML has no way to write a lone surrogate; hypothesis's text can make one."""
    if isinstance(value, str):
        return not any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, list):
        return all(no_surrogates(v) for v in value)
    if isinstance(value, dict):
        return all(no_surrogates(k) and no_surrogates(v) for k, v in value.items())
    return True


class Document(typing.NamedTuple):
    text: str
    secrets: tuple[str, ...]  # values the document marks secret: they must not appear in an error


@st.composite
def documents(draw: st.DrawFn) -> Document:
    """A valid document from the real key set, then 0 to 3 of its values (or an addr, a template) made hostile."""
    tables: dict[str, dict[str, object]] = {}
    for section, keys in KEYS.items():
        if draw(st.booleans()):
            chosen = draw(st.lists(st.sampled_from([k for k in keys if k in GOOD]), unique=True))
            tables[section] = {key: draw(GOOD[key]) for key in chosen}
    secrets_tables = [draw(good_secret(i)) for i in range(draw(st.integers(0, 4)))]
    marked = []
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from([*KEYS, *(["secret"] if secrets_tables else [])]))
        table = draw(st.sampled_from(secrets_tables)) if where == "secret" else tables.setdefault(where, {})
        key = draw(st.sampled_from(SECRET_KEYS if where == "secret" else KEYS[where]))
        if key == "addr" and draw(st.booleans()):
            password = random_secret("pw")
            marked.append(password)
            table[key] = draw(st.sampled_from([f"http://u:{password}@127.0.0.1:1", f"https://v:1/?t={password}",
                                               f"http://{password}@v", f"https://v:1#{password}"]))  # fmt: skip
        elif key == "template" and draw(st.booleans()):
            literal = random_secret("tpl")
            marked.append(literal)
            table[key] = f"{literal}${{password}}" + draw(st.sampled_from(["", "$", "${", "$x", "${a b}", "$$"]))
        else:
            table[key] = draw(bad_value(key).filter(no_surrogates))
    if draw(st.integers(0, 9)) == 0:
        tables.setdefault("output", {})[draw(hostile_text.filter(no_surrogates))] = 1  # unknown, maybe unprintable
    parts = [toml_table(f"[{section}]", table) for section, table in tables.items()]
    parts += [toml_table("[[secret]]", table) for table in secrets_tables]
    return Document("".join(draw(st.permutations(parts))), tuple(marked))


# -- the invariant --------------------------------------------------------------------


def outcome(text: str, secrets: tuple[str, ...] = ()) -> Config | ConfigError:
    """Load in-process: a Config, or a one-line ConfigError that holds no secret; anything else fails the test."""
    try:
        return load_text(text, "/etc/secret-init/config.toml", {})
    except ConfigError as e:
        message = str(e)
        assert e.exit_code == ExitCode.CONFIG
        assert unprintable(message) is None and len(message) < 2000, message[:2000]
        for secret in secrets:
            assert_no_leak(message, secret)
        record_cases("config", 1, [e.exit_code])
        return e


def assert_sound(cfg: Config) -> None:
    """What a loaded config promises the code after it."""
    record_cases("config")
    directory = cfg.output.dir
    assert directory.startswith("/") and "//" not in directory and directory not in SHARED_DIRS
    assert not set(directory.split("/")[1:]) & {".", ".."} and unprintable(directory) is None
    assert all(spec.mode in ALLOWED_MODES for spec in cfg.secrets) and cfg.output.mode in ALLOWED_MODES
    for seconds in (cfg.vault.startup_timeout, cfg.vault.request_timeout, cfg.vault.refresh_interval,
                    cfg.process.stop_timeout, cfg.process.rotate_before or 1.0):  # fmt: skip
        assert math.isfinite(seconds) and 0 <= seconds <= MAX_DURATION
    assert 0 < cfg.output.max_secret_size <= config.MAX_SECRET_SIZE_LIMIT
    for user in (cfg.output.user, *(spec.user for spec in cfg.secrets)):
        ids = re.fullmatch(r"([0-9]+):([0-9]+)", user or "")
        assert ids is None or max(int(n) for n in ids.groups()) <= config.MAX_ID
    assert cfg.vault.addr is None or not set(cfg.vault.addr) & set("@?#")
    for spec in cfg.secrets:
        assert validate_name(spec.name) is None and unprintable(str(spec.source)) is None


@pytest.mark.hostile("config")
@FAST
@given(documents())
def test_generated_documents_load_or_fail_with_one_line(doc: Document) -> None:
    result = outcome(doc.text, doc.secrets)
    if isinstance(result, Config):
        assert_sound(result)


@pytest.mark.hostile("config")
@settings(FAST, max_examples=500)
@given(st.binary(max_size=2000) | st.text(max_size=500).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_random_bytes_as_a_config_file(tmp_path_factory: pytest.TempPathFactory, raw: bytes) -> None:
    """Through load(): the file read, decoded and parsed; a Config or a ConfigError."""
    path = tmp_path_factory.mktemp("bytes") / "config.toml"
    path.write_bytes(raw)
    try:
        result = load(str(path), {})
    except ConfigError as e:
        assert unprintable(str(e)) is None
        record_cases("config", 1, [e.exit_code])
    else:
        assert_sound(result)


def huge_or_deep(kind: str, n: int) -> str:
    return {
        "deep arrays": "a = " + "[" * n + "]" * n,
        "deep tables": "a = " + "{b = " * n + "1" + "}" * n,
        "dotted keys": "a" + ".a" * n + " = 1",
        "long string": f'[output]\ndir = "/run/{"x" * n * 50}"',
        "long name": f'[[secret]]\nname = "{"n" * n}"\nsource = "swarm:x"',
        "long integer": f"[output]\nmax_secret_size = {'9' * n}",
        "many secrets": "".join(f'[[secret]]\nname = "s{i}"\nsource = "swarm:s{i}"\n' for i in range(n)),
        "many tables": "".join(f"[t{i}]\n" for i in range(n)),
        "unicode keys": "".join(f'"{chr(0x400 + i)}" = {i}\n' for i in range(n)),
    }[kind]


@pytest.mark.hostile("config")
@settings(FAST, max_examples=60)
@given(
    st.sampled_from(["deep arrays", "deep tables", "dotted keys", "long string", "long name", "long integer",
                     "many secrets", "many tables", "unicode keys"]),
    st.sampled_from([10, 300, 1000, 5000]),
)  # fmt: skip
def test_huge_and_deep_documents(kind: str, n: int) -> None:
    result = outcome(huge_or_deep(kind, n))
    if isinstance(result, Config):
        assert_sound(result)


@pytest.mark.hostile("config")
@FAST
@given(references | st.text(max_size=60))
def test_source_references(text: str) -> None:
    try:
        ref = parse_reference(text)
    except ConfigError as e:
        assert unprintable(str(e)) is None
        record_cases("config", 1, [e.exit_code])
        return
    record_cases("config")
    assert unprintable(str(ref)) is None
    assert parse_reference(str(ref)) == ref
    if ref.kind == "swarm":
        assert validate_name(ref.path) is None
    if ref.kind == "file":
        assert ref.path.startswith("/")
    if ref.kind == "vault":
        assert re.fullmatch(r"[A-Za-z0-9_.\-/@+=:,~]+", ref.path) and ".." not in ref.path.split("/")


@pytest.mark.hostile("config")
@FAST
@given(hostile_text | st.text(alphabet="${}ab_.-", max_size=20))
def test_templates_and_names(text: str) -> None:
    """A template parses or is a ConfigError that names an offset, never the text; a name is valid or has a reason."""
    try:
        template = parse_template(text)
    except ConfigError as e:
        assert len(text) < 12 or text not in str(e)  # shorter texts occur in the fixed wording by chance
        record_cases("config", 1, [e.exit_code])
    else:
        record_cases("config")
        assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", name) for name in template.fields)
    if validate_name(text) is None:
        assert unprintable(text) is None and "/" not in text and not text.startswith(".")


# -- through the real CLI ----------------------------------------------------------------

SWARM_NAMES = ["db", "api", "a.b"]
CLI_OUTPUT = ["{out}", "{out}/", "/{out}//.", "{out}/../x", "{link}", "{up}/tmp", "{out}/sub\u202e", "//tmp"]


@st.composite
def cli_documents(draw: st.DrawFn) -> dict[str, object]:
    """Mostly valid: swarm: and file: sources that exist, the output dir on the tmpfs; then 0 to 2 hostile values.
    A vault: source gets a closed loopback port and no retry, so no run waits long."""
    output: dict[str, object] = {"dir": draw(st.sampled_from(CLI_OUTPUT[:3])), "user": "65534:65534"}
    if draw(st.booleans()):
        output["mode"] = draw(GOOD["mode"])
    vault: dict[str, object] = {
        "addr": "http://127.0.0.1:1",
        "startup_timeout": "0s",
        "request_timeout": "1s",
        "token_file": "{base}/token",
    }
    process: dict[str, object] = {}
    secrets: list[dict[str, object]] = []
    for i in range(draw(st.integers(1, 3))):
        source = draw(st.sampled_from([f"swarm:{n}" for n in SWARM_NAMES] + ["file:{base}/file"]))
        secrets.append({"name": f"f{i}" + draw(st.sampled_from(["", ".pem", "\u00e9"])), "source": source})
    for _ in range(draw(st.integers(0, 2))):
        where = draw(st.sampled_from(["output", "vault", "process", "secret"]))
        table = draw(st.sampled_from(secrets)) if where == "secret" else {"output": output, "vault": vault,
                                                                           "process": process}[where]  # fmt: skip
        key = draw(st.sampled_from(CLI_KEYS[where]))
        table[key] = draw(CLI_HOSTILE.get(key, bad_value(key)).filter(no_surrogates))
    return {"output": output, "vault": vault, "process": process, "secret": secrets}


CLI_KEYS = {
    "output": ["dir", "mode", "max_secret_size", "user"],
    "vault": ["addr", "namespace"],
    "process": ["stop_timeout", "on_rotate", "scrub_env"],
    "secret": ["name", "source", "env", "mode", "template"],
}
CLI_HOSTILE: dict[str, st.SearchStrategy[object]] = {
    "dir": st.sampled_from(CLI_OUTPUT), "addr": st.sampled_from(["http://u:{pw}@127.0.0.1:1", "http://127.0.0.1:1?t={pw}"]),
    "source": st.sampled_from(["swarm:missing", "file:{base}/fifo", "file:rel", "vault:kv/a#b", "file:{base}/real",
                               "swarm:a\u202eb", "file:{base}/fi\u0085le"]),
    "name": st.sampled_from(["..", ".x", "a/b", "x" * 256, "a\u2028b", "a\u0000b", "f0", "\u202egnp.exe"])
    | hostile_text,
}  # fmt: skip


def render_document(doc: dict[str, object], places: dict[str, str]) -> str:
    def fill(value: object) -> object:
        return value.format(**places) if isinstance(value, str) and "{" in value and "${" not in value else value

    text = ""
    for section in ("output", "vault", "process"):
        table = typing.cast(dict[str, object], doc[section])
        text += toml_table(f"[{section}]", {k: fill(v) for k, v in table.items()})
    for table in typing.cast(list[dict[str, object]], doc["secret"]):
        text += toml_table("[[secret]]", {k: fill(v) for k, v in table.items()})
    return text


@pytest.fixture(scope="module", autouse=True)
def cli_figures() -> Iterator[None]:
    yield
    if CLI_CODES:
        print(f"\ncheck/render runs by (command, exit code): {sorted(CLI_CODES.items())}")


def fresh_scene(tmpfs: Path) -> tuple[Path, dict[str, str], list[str]]:
    """A clean example directory on the tmpfs: swarm files, a file source, a FIFO, a token, symlinks."""
    base = tmpfs / "example"
    shutil.rmtree(base, ignore_errors=True)
    (base / "swarm").mkdir(parents=True)
    values = []
    for name in [*SWARM_NAMES, "file", "token"]:
        value = random_secret(name.replace(".", ""))
        values.append(value)
        (base / ("swarm" if name in SWARM_NAMES else ".") / name).write_text(value)
    os.mkfifo(base / "fifo")
    (base / "real").mkdir()
    (base / "link").symlink_to(base / "real")
    (base / "up").symlink_to("/")
    places = {"out": str(base / "out"), "link": str(base / "link"), "up": str(base / "up"), "base": str(base)}
    return base, places, values


@needs_root
@pytest.mark.hostile("config")
@CLI
@given(cli_documents(), st.sampled_from(["check", "render"]))
def test_check_and_render_exit_with_a_documented_code(tmpfs: Path, doc: dict[str, object], command: str) -> None:
    base, places, values = fresh_scene(tmpfs)
    password = random_secret("addrpw")
    places["pw"] = password
    path = base / "config.toml"
    path.write_text(render_document(doc, places))
    env = base_env(SECRET_INIT_SWARM_DIR=str(base / "swarm"), SECRET_INIT_CONFIG=str(path))
    result = run_cli(command, env=env, timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode in DOCUMENTED_CODES | {0}, output
    assert "Traceback" not in output and "internal error" not in output, output
    assert_no_leak(output, password, *values)
    for line in result.stderr.splitlines():
        assert line.startswith("{"), f"not a one-line log event: {line!r}"
    log_events(result.stderr)
    record_cases("config", 1, [result.returncode] if result.returncode else [])
    CLI_CODES[command, result.returncode] += 1
    out = base / "out"
    if result.returncode != 0 and out.is_dir():
        left = [p.name for p in out.iterdir() if p.name != ".secret-init"]
        assert left == [], f"a failed {command} left {left}"
    assert sorted(p.name for p in (base / "real").iterdir()) == [], "wrote through a symlinked output dir"


@pytest.mark.hostile("config")
@settings(FAST, max_examples=200)
@given(st.text(alphabet=string.printable + "\u202e\x85", max_size=30))
def test_environment_addresses_never_reach_an_error(text: str) -> None:
    """$VAULT_ADDR with a password in it: refused when used, ignored when not; never in a message or note."""
    password = random_secret("envpw")
    addr = f"http://{text}:{password}@127.0.0.1:8200"
    for doc in ('[[secret]]\nname = "x"\nsource = "vault:kv/x"\n', ""):
        try:
            cfg = load_text(doc, "x.toml", {"VAULT_ADDR": addr})
        except SecretInitError as e:
            assert_no_leak(str(e), password)
            record_cases("config", 1, [e.exit_code])
        else:
            assert cfg.vault.addr is None and all(password not in note for note in cfg.notes)
            record_cases("config")
