"""The configuration: immutable records (NamedTuples), loaded from TOML and validated in full.

Pure: `load_text` takes the text and the environment, touches nothing else, and raises
ConfigError with a one-line message naming the section and key at fault.
"""

import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

from secret_init.errors import ConfigError

if TYPE_CHECKING:
    from secret_init.template import Template

DEFAULT_CONFIG_PATH = "/etc/secret-init/config.toml"
DEFAULT_OUTPUT_DIR = "/run/app-secrets"
DEFAULT_SWARM_DIR = "/run/secrets"
DEFAULT_MAX_SECRET_SIZE = 1024 * 1024
MAX_CONFIG_SIZE = 1024 * 1024
MAX_NAME_BYTES = 255

# The sink takes over its directory (owner, mode, stray temp files): never one of these.
SHARED_DIRS = frozenset(
    {"/", "/bin", "/boot", "/dev", "/dev/shm", "/etc", "/home", "/lib", "/opt", "/proc", "/root", "/run",  # noqa: S108
     "/run/secrets", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/run", "/var/tmp"}  # noqa: S108
)  # fmt: skip

# Prefixes removed from the child's environment: they hold Vault and secret-init settings.
SCRUBBED_ENV_PREFIXES = ("VAULT_", "BAO_", "SECRET_INIT_")

# Patterns, not compiled ones: re compiles (and caches) each on first use, so a start
# that never needs one never pays for it.
_ENV_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_USER_NAME = r"[A-Za-z_][A-Za-z0-9_.\-]*\$?"
_UID_GID = r"(\d+):(\d+)"
_DURATION_PART = r"(\d+(?:\.\d+)?)(ms|s|m|h|d)"
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_VAULT_PATH_CHARS = r"[A-Za-z0-9_.\-/@+=:,~]+"
SOURCE_KINDS = ("swarm", "file", "vault")


# NamedTuples rather than frozen dataclasses: defining a frozen dataclass costs ~1.4 ms
# of start-up, a NamedTuple ~0.3 ms, and these are defined on every start.
class SourceRef(NamedTuple):
    """Where a secret comes from: `swarm:NAME`, `file:/PATH` or `vault:PATH[#FIELD]`."""

    kind: str
    path: str
    field: str | None = None

    def __str__(self) -> str:
        suffix = f"#{self.field}" if self.field is not None else ""
        return f"{self.kind}:{self.path}{suffix}"


class SecretSpec(NamedTuple):
    name: str
    source: SourceRef
    env: str | None
    template: "Template | None"
    mode: int
    user: str | None  # owner of this file; None means output.user


class OutputConfig(NamedTuple):
    dir: str = DEFAULT_OUTPUT_DIR
    user: str | None = None  # None: the user secret-init runs as
    mode: int = 0o400
    allow_non_tmpfs: bool = False
    max_secret_size: int = DEFAULT_MAX_SECRET_SIZE


class VaultConfig(NamedTuple):
    addr: str | None = None
    auth: str = "token"
    token_file: str | None = None
    role_id_file: str | None = None
    secret_id_file: str | None = None
    approle_mount: str = "approle"
    ca_cert: str | None = None
    namespace: str | None = None
    startup_timeout: float = 30.0
    request_timeout: float = 10.0
    refresh_interval: float = 300.0
    revoke_on_exit: bool = True


class ProcessConfig(NamedTuple):
    scrub_env: tuple[str, ...] = ()
    allow_root: bool = False
    supervise: bool = False  # stay as PID 1 and supervise the app even without leases
    stop_signal: int = 15  # SIGTERM
    stop_timeout: float = 10.0
    rotate_before: float | None = None  # None: 1/3 of each lease's whole lifetime
    on_rotate: str = "restart"  # "restart", "signal", or "none"
    rotate_signal: int = 1  # for on_rotate = "signal:NAME"; SIGHUP
    on_expiry: str = "stop"  # "stop" (exit 75) or "keep"


class SidecarConfig(NamedTuple):
    notify_pidfile: str | None = None  # a file holding the app's pid, in a shared PID namespace
    notify_signal: int = 1  # SIGHUP


class Config(NamedTuple):
    path: str
    output: OutputConfig
    vault: VaultConfig
    process: ProcessConfig
    secrets: tuple[SecretSpec, ...]
    swarm_dir: str = DEFAULT_SWARM_DIR
    sidecar: SidecarConfig = SidecarConfig()

    @property
    def uses_vault(self) -> bool:
        return any(s.source.kind == "vault" for s in self.secrets)

    def file_path(self, spec: SecretSpec) -> str:
        return f"{self.output.dir.rstrip('/')}/{spec.name}"


def is_loopback_url(addr: str) -> bool:
    """localhost, or a loopback IP (not a name that merely starts with "127.")."""
    import ipaddress
    from urllib.parse import urlsplit

    host = urlsplit(addr).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_plain_http_loopback(addr: str) -> bool:
    """http:// to this host: no TLS, and nothing crosses the network."""
    return addr.startswith("http://") and is_loopback_url(addr)


def config_path(cli_value: str | None, environ: Mapping[str, str]) -> str:
    """--config wins, then SECRET_INIT_CONFIG, then the default path."""
    return cli_value or environ.get("SECRET_INIT_CONFIG") or DEFAULT_CONFIG_PATH


def load(path: str, environ: Mapping[str, str]) -> Config:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_SIZE + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None
    if len(raw) > MAX_CONFIG_SIZE:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_SIZE} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8") from None
    return load_text(text, path, environ)


def load_text(text: str, path: str, environ: Mapping[str, str]) -> Config:
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path}: not valid TOML: {e}") from None
    try:
        return _parse(data, path, environ)
    except ConfigError as e:
        raise ConfigError(f"config {path}: {e}") from None


def _parse(data: dict[str, Any], path: str, environ: Mapping[str, str]) -> Config:
    root = _Table(data, "top level")
    output = _parse_output(root.table("output"))
    vault = _parse_vault(root.table("vault"), environ)
    process = _parse_process(root.table("process"))
    sidecar = _parse_sidecar(root.table("sidecar"))
    secret_tables = root.table_list("secret")
    root.finish()
    secrets = tuple(_parse_secret(t, output) for t in secret_tables)
    _check_unique(secrets)
    swarm_dir = environ.get("SECRET_INIT_SWARM_DIR") or DEFAULT_SWARM_DIR
    return Config(path, output, vault, process, secrets, swarm_dir, sidecar)


def _parse_sidecar(t: "_Table") -> SidecarConfig:
    d = SidecarConfig()
    notify_signal = d.notify_signal
    name = t.string("notify_signal")
    if name is not None:
        notify_signal = _checked(t, "notify_signal", lambda: parse_signal(name))
    out = SidecarConfig(notify_pidfile=t.abs_path("notify_pidfile"), notify_signal=notify_signal)
    t.finish()
    return out


def _parse_output(t: "_Table") -> OutputConfig:
    d = OutputConfig()
    out_dir = t.string("dir") or d.dir
    if not out_dir.startswith("/"):
        t.fail("dir", "must be an absolute path")
    if os.path.normpath(out_dir) in SHARED_DIRS:
        t.fail("dir", f"{out_dir} is a shared system directory; use a dedicated one such as {DEFAULT_OUTPUT_DIR}")
    user = t.string("user")
    if user is not None:
        t.check(validate_user_spec(user), "user")
    out = OutputConfig(
        dir=out_dir,
        user=user,
        mode=t.mode("mode", d.mode),
        allow_non_tmpfs=t.boolean("allow_non_tmpfs", d.allow_non_tmpfs),
        max_secret_size=t.positive_int("max_secret_size", d.max_secret_size),
    )
    t.finish()
    return out


def _parse_vault(t: "_Table", environ: Mapping[str, str]) -> VaultConfig:
    d = VaultConfig()
    auth = t.string("auth") or d.auth
    if auth not in ("token", "approle"):
        t.fail("auth", f'must be "token" or "approle", not {auth!r}')
    addr = t.string("addr") or environ.get("VAULT_ADDR") or environ.get("BAO_ADDR")
    if addr is not None and not re.fullmatch(r"https?://[^\s/]+/?", addr):
        t.fail("addr", f"must look like http(s)://HOST:PORT, not {addr!r}")
    out = VaultConfig(
        addr=addr.rstrip("/") if addr else None,
        auth=auth,
        token_file=t.abs_path("token_file"),
        role_id_file=t.abs_path("role_id_file"),
        secret_id_file=t.abs_path("secret_id_file"),
        approle_mount=(t.string("approle_mount") or d.approle_mount).strip("/"),
        ca_cert=t.abs_path("ca_cert") or environ.get("VAULT_CACERT") or environ.get("BAO_CACERT"),
        namespace=_explicit_or_env(t.string("namespace"), environ.get("VAULT_NAMESPACE")),
        startup_timeout=t.duration("startup_timeout", d.startup_timeout),
        request_timeout=t.duration("request_timeout", d.request_timeout),
        refresh_interval=t.duration("refresh_interval", d.refresh_interval),
        revoke_on_exit=t.boolean("revoke_on_exit", d.revoke_on_exit),
    )
    if out.refresh_interval < 1:
        t.fail("refresh_interval", "must be at least 1s")
    if auth == "approle" and out.role_id_file is None:
        t.fail("role_id_file", 'is required when auth = "approle"')
    if out.request_timeout <= 0:
        t.fail("request_timeout", "must be more than zero")
    t.finish()
    return out


def _explicit_or_env(value: str | None, env_value: str | None) -> str | None:
    """A key set in the file wins, even when empty; otherwise the environment's value."""
    chosen = value if value is not None else env_value
    return chosen or None


def _parse_process(t: "_Table") -> ProcessConfig:
    scrub = t.string_list("scrub_env")
    for name in scrub:
        if not re.fullmatch(_ENV_NAME, name.removesuffix("*")):
            t.fail("scrub_env", f"{name!r} is not a variable name (or PREFIX*)")
    d = ProcessConfig()
    stop_signal = d.stop_signal
    signal_name = t.string("stop_signal")
    if signal_name is not None:
        stop_signal = _checked(t, "stop_signal", lambda: parse_signal(signal_name))
    on_rotate, rotate_signal = d.on_rotate, d.rotate_signal
    on_rotate_text = t.string("on_rotate")
    if on_rotate_text is not None:
        on_rotate = on_rotate_text
        if on_rotate_text.startswith("signal:"):
            on_rotate = "signal"
            rotate_signal = _checked(t, "on_rotate", lambda: parse_signal(on_rotate_text.removeprefix("signal:")))
        elif on_rotate_text not in ("restart", "none"):
            t.fail("on_rotate", f'must be "restart", "signal:NAME" or "none", not {on_rotate_text!r}')
    on_expiry = t.string("on_expiry") or d.on_expiry
    if on_expiry not in ("stop", "keep"):
        t.fail("on_expiry", f'must be "stop" or "keep", not {on_expiry!r}')
    rotate_before = None
    if t.data.get("rotate_before") is not None:
        rotate_before = t.duration("rotate_before", 0.0)
        if rotate_before <= 0:
            t.fail("rotate_before", "must be more than zero")
    out = ProcessConfig(
        scrub_env=tuple(scrub),
        allow_root=t.boolean("allow_root", d.allow_root),
        supervise=t.boolean("supervise", d.supervise),
        stop_signal=stop_signal,
        stop_timeout=t.duration("stop_timeout", d.stop_timeout),
        rotate_before=rotate_before,
        on_rotate=on_rotate,
        rotate_signal=rotate_signal,
        on_expiry=on_expiry,
    )
    t.finish()
    return out


def parse_signal(name: str) -> int:
    """A signal by name, with or without SIG: "SIGHUP", "HUP"."""
    import signal

    full = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
    number = getattr(signal.Signals, full, None) if full.isidentifier() else None
    if number is None or full in ("SIGKILL", "SIGSTOP", "SIGCHLD"):
        raise ConfigError(f"{name!r} is not a signal that can be sent to stop or reload an app")
    return int(number)


def _parse_secret(t: "_Table", output: OutputConfig) -> SecretSpec:
    name = t.string("name")
    if name is None:
        t.fail("name", "is required")
    t.where = f"[[secret]] {name!r}"
    t.check(validate_name(name), "name")
    source_text = t.string("source")
    if source_text is None:
        t.fail("source", "is required")
    source = _checked(t, "source", lambda: parse_reference(source_text))
    env = t.string("env")
    if env is not None:
        t.check(validate_env_name(env), "env")
    template_text = t.string("template")
    template = None
    if template_text is not None:
        from secret_init.template import parse_template

        template = _checked(t, "template", lambda: parse_template(template_text))
        if source.kind != "vault" or source.field is not None:
            t.fail("template", "needs a vault: source without #field (the template picks the fields)")
    user = t.string("user")
    if user is not None:
        t.check(validate_user_spec(user), "user")
    spec = SecretSpec(name, source, env, template, t.mode("mode", output.mode), user)
    t.finish()
    return spec


def _checked(t: "_Table", key: str, parse: Any) -> Any:
    try:
        return parse()
    except ConfigError as e:
        t.fail(key, str(e))


def _check_unique(secrets: tuple[SecretSpec, ...]) -> None:
    names: set[str] = set()
    envs: set[str] = set()
    for s in secrets:
        if s.name in names:
            raise ConfigError(f"[[secret]] {s.name!r}: name is used twice")
        names.add(s.name)
        if s.env is not None:
            if s.env in envs:
                raise ConfigError(f"[[secret]] {s.name!r}: env {s.env} is used twice")
            envs.add(s.env)


# Validators return None when the value is fine, or the reason it is not.


def validate_name(name: str) -> str | None:
    """A secret name is one plain file name inside output.dir."""
    if name == "":
        return "must not be empty"
    if "/" in name:
        return "must be a plain file name, without '/'"
    if "\x00" in name:
        return "must not contain NUL"
    if name.startswith("."):
        return "must not start with '.' (no hidden files, no '..')"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "must not contain control characters"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"must be at most {MAX_NAME_BYTES} bytes"
    return None


def validate_env_name(env: str) -> str | None:
    if not re.fullmatch(_ENV_NAME, env):
        return f"{env!r} is not a valid environment variable name"
    if env.startswith(SCRUBBED_ENV_PREFIXES):
        return f"{env!r} uses a prefix secret-init removes from the child's environment"
    return None


def validate_user_spec(user: str) -> str | None:
    if re.fullmatch(_UID_GID, user) or re.fullmatch(_USER_NAME, user):
        return None
    return f"{user!r} is neither a user name nor uid:gid"


def parse_reference(text: str) -> SourceRef:
    kind, sep, rest = text.partition(":")
    if not sep or kind not in SOURCE_KINDS:
        raise ConfigError(f"{text!r} must start with swarm:, file: or vault:")
    if kind == "swarm":
        reason = validate_name(rest)
        if reason:
            raise ConfigError(f"swarm secret name {reason}")
        return SourceRef("swarm", rest)
    if kind == "file":
        if not rest.startswith("/") or "\x00" in rest:
            raise ConfigError("file: needs an absolute path")
        return SourceRef("file", rest)
    path, hash_sep, field = rest.partition("#")
    reason = _vault_path_problem(path)
    if reason:
        raise ConfigError(f"vault path {reason}")
    if hash_sep and (field == "" or "#" in field):
        raise ConfigError("vault field after '#' must be one non-empty name")
    return SourceRef("vault", path, field if hash_sep else None)


def _vault_path_problem(path: str) -> str | None:
    if path == "":
        return "must not be empty"
    if path.startswith("/") or path.endswith("/"):
        return "must not start or end with '/'"
    if not re.fullmatch(_VAULT_PATH_CHARS, path):
        return "has characters outside letters, digits and _.-/@+=:,~"
    if any(seg in ("", ".", "..") for seg in path.split("/")):
        return "must not have empty, '.' or '..' segments"
    return None


def parse_duration(value: object) -> float:
    """`30s`, `5m`, `1h30m`, `250ms`, or a number of seconds."""
    if isinstance(value, bool):
        raise ConfigError('expected a duration like "30s"')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        pos, seconds = 0, 0.0
        for m in re.finditer(_DURATION_PART, text):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos = m.end()
        if pos != len(text) or pos == 0:
            raise ConfigError(f'{value!r} is not a duration like "30s", "5m" or "1h30m"')
    else:
        raise ConfigError('expected a duration like "30s"')
    if seconds < 0:
        raise ConfigError("a duration cannot be negative")
    return seconds


def parse_mode(value: object) -> int:
    """A file mode: "0400", "400" or a TOML integer such as 0o400."""
    if isinstance(value, bool):
        raise ConfigError('expected an octal mode like "0400"')
    if isinstance(value, int):
        mode = value
    elif isinstance(value, str) and re.fullmatch(r"(0o?)?[0-7]{1,4}", value):
        mode = int(value.removeprefix("0o"), 8)
    else:
        raise ConfigError(f'{value!r} is not an octal mode like "0400"')
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"mode {mode:#o} has bits beyond 0777 (no setuid, setgid or sticky)")
    return mode


class _Table:
    """One TOML table being read: typed getters, and an error for every unknown key."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be a table")
        self.data: dict[str, Any] = data
        self.where = where
        self.used: set[str] = set()

    def fail(self, key: str, reason: str) -> NoReturn:
        raise ConfigError(f"{self.where}: {key} {reason}")

    def check(self, reason: str | None, key: str) -> None:
        if reason is not None:
            self.fail(key, reason)

    def _get(self, key: str) -> Any:
        self.used.add(key)
        return self.data.get(key)

    def string(self, key: str) -> str | None:
        value = self._get(key)
        if value is not None and not isinstance(value, str):
            self.fail(key, "must be a string")
        return str(value) if value is not None else None

    def abs_path(self, key: str) -> str | None:
        value = self.string(key)
        if value is not None and not value.startswith("/"):
            self.fail(key, "must be an absolute path")
        return value or None

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(key, "must be true or false")
        return bool(value)

    def positive_int(self, key: str, default: int) -> int:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            self.fail(key, "must be a positive integer")
        return int(value)

    def string_list(self, key: str) -> list[str]:
        value = self._get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(key, "must be a list of strings")
        return list(value)

    def duration(self, key: str, default: float) -> float:
        value = self._get(key)
        if value is None:
            return default
        return float(_checked(self, key, lambda: parse_duration(value)))

    def mode(self, key: str, default: int) -> int:
        value = self._get(key)
        if value is None:
            return default
        return int(_checked(self, key, lambda: parse_mode(value)))

    def table(self, key: str) -> "_Table":
        value = self._get(key)
        return _Table({} if value is None else value, f"[{key}]")

    def table_list(self, key: str) -> list["_Table"]:
        value = self._get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(key, "must be written as [[secret]] tables")
        return [_Table(item, f"[[{key}]] #{i + 1}") for i, item in enumerate(value)]

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.where}: unknown key(s) {', '.join(unknown)}")
