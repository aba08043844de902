"""The configuration: immutable records (NamedTuples), loaded from TOML and validated in full.

Each section is declared once, as its record's fields: `Annotated[type, _Type, doc(, shown)]`
says how the key is read and what docs/configuration.md says of it (`docs_table`), and the
field's default is the key's default. A field without a `_Type` is not a key: the checks after
the declared part set it. Pure: `load_text` takes the text and the environment, touches nothing
else, and raises ConfigError with a one-line message naming the section and key at fault.
"""

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Annotated, NamedTuple, NoReturn, TypeVar

from secret_init.errors import ConfigError, PermissionRefusedError

if TYPE_CHECKING:
    from secret_init.template import Template

DEFAULT_CONFIG_PATH = "/etc/secret-init/config.toml"
DEFAULT_OUTPUT_DIR = "/run/app-secrets"
DEFAULT_SWARM_DIR = "/run/secrets"
DEFAULT_MAX_SECRET_SIZE = 1024 * 1024
MAX_SECRET_SIZE_LIMIT = 64 * 1024 * 1024  # the largest max_secret_size: a secret is read into memory whole
MAX_CONFIG_SIZE = 1024 * 1024
MAX_NAME_BYTES = 255
MAX_ID = 2**32 - 2  # the largest uid or gid: 2**32 - 1 is (uid_t)-1
MAX_DURATION = 365 * 86400.0  # any duration: far beyond a sane one, far below what time arithmetic overflows on
# A secret file's mode: owner read, optionally owner write, optionally group read; never others.
ALLOWED_MODES = (0o400, 0o440, 0o600, 0o640)
# Control, format (bidi overrides, zero-width), line/paragraph separator, surrogate, private and unassigned.
UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})

# The sink takes over its directory (owner, mode, stray temp files): never one of these.
SHARED_DIRS = frozenset(
    {"/", "/bin", "/boot", "/dev", "/dev/shm", "/etc", "/home", "/lib", "/opt", "/proc", "/root", "/run",  # noqa: S108
     "/run/secrets", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/run", "/var/tmp"}  # noqa: S108
)  # fmt: skip

# Prefixes removed from the child's environment: they hold Vault and secret-init settings.
SCRUBBED_ENV_PREFIXES = ("VAULT_", "BAO_", "SECRET_INIT_")
AUTH_METHODS = ("token", "approle", "jwt", "kubernetes", "cert")
SERVICE_ACCOUNT_JWT = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # the kubelet mounts the pod's token here
JWT_DEFAULT = f"for `kubernetes`: `{SERVICE_ACCOUNT_JWT}`"
CERT_DEFAULT = "`$VAULT_CLIENT_CERT`, then `$BAO_CLIENT_CERT`"
KEY_DEFAULT = "`$VAULT_CLIENT_KEY`, then `$BAO_CLIENT_KEY`"
# The [vault] keys that belong to one or some auth methods; any other method refuses them.
_AUTH_KEYS = {
    "token_file": ("token",),
    "role_id_file": ("approle",),
    "secret_id_file": ("approle",),
    "secret_id_wrapped": ("approle",),
    "approle_mount": ("approle",),
    "auth_mount": ("approle", "jwt", "kubernetes", "cert"),
    "role": ("jwt", "kubernetes", "cert"),
    "jwt_file": ("jwt", "kubernetes"),
}

# Patterns, not compiled ones: re compiles (and caches) each on first use, so a start
# that never needs one never pays for it.
_ENV_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_USER_NAME = r"[A-Za-z_][A-Za-z0-9_.\-]*\$?"
_UID_GID = r"([0-9]+):([0-9]+)"  # ASCII digits: \d matches other scripts' digits too
_DURATION_PART = r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)"
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_VAULT_PATH_CHARS = r"[A-Za-z0-9_.\-/@+=:,~]+"
_VAULT_ADDR = r"https?://[^\s/?#@]+/?"
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


# Validators return None when the value is fine, or the reason it is not.


def _quote(value: object, limit: int = 64) -> str:
    """repr() for a message, cut short: a 1 MiB name must not make a 1 MiB log line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-1]}"


def unprintable(text: str) -> str | None:
    """The first control or format character (NUL, C1, bidi overrides, U+2028...): never in a name, path or log line."""
    import unicodedata

    for offset, char in enumerate(text):
        if unicodedata.category(char) in UNPRINTABLE_CATEGORIES:
            return f"must not contain control or format characters (U+{ord(char):04X} at offset {offset})"
    return None


def validate_path(path: str) -> str | None:
    if not path.startswith("/"):
        return "must be an absolute path"
    return unprintable(path)


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
    if reason := unprintable(name):
        return reason
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"must be at most {MAX_NAME_BYTES} bytes"
    return None


def validate_env_name(env: str) -> str | None:
    if not re.fullmatch(_ENV_NAME, env):
        return f"{_quote(env)} is not a valid environment variable name"
    if env.startswith(SCRUBBED_ENV_PREFIXES):
        return f"{_quote(env)} uses a prefix secret-init removes from the child's environment"
    return None


def validate_user_spec(user: str) -> str | None:
    if ids := re.fullmatch(_UID_GID, user):
        # (uid_t)-1 means "leave unchanged" to chown and setresuid: a file would stay root's
        # more than 10 digits is over MAX_ID anyway, and int() refuses over 4300 (ValueError: exit 70)
        too_big = any(len(n) > len(str(MAX_ID)) or int(n) > MAX_ID for n in ids.groups())
        return f"{_quote(user)}: a uid or gid must be at most {MAX_ID}" if too_big else None
    if re.fullmatch(_USER_NAME, user):
        return None
    return f"{_quote(user)} is neither a user name nor uid:gid"


def parse_reference(text: str) -> SourceRef:
    kind, sep, rest = text.partition(":")
    if not sep or kind not in SOURCE_KINDS:
        raise ConfigError(f"{_quote(text)} must start with swarm:, file: or vault:")
    if kind == "swarm":
        reason = validate_name(rest)
        return _reject(f"swarm secret name {reason}") if reason else SourceRef("swarm", rest)
    if kind == "file":
        reason = validate_path(rest)
        return _reject(f"file: path {reason}") if reason else SourceRef("file", rest)
    path, hash_sep, field = rest.partition("#")
    if reason := _vault_path_problem(path):
        raise ConfigError(f"vault path {reason}")
    if hash_sep and (field == "" or "#" in field):
        raise ConfigError("vault field after '#' must be one non-empty name")
    if reason := unprintable(field):
        raise ConfigError(f"vault field after '#' {reason}")
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


def parse_signal(name: str) -> int:
    """A signal by name, with or without SIG: "SIGHUP", "HUP"."""
    import signal

    full = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
    number = getattr(signal.Signals, full, None) if full.isidentifier() else None
    if number is None or full in ("SIGKILL", "SIGSTOP", "SIGCHLD"):
        raise ConfigError(f"{_quote(name)} is not a signal that can be sent to stop or reload an app")
    return int(number)


def parse_duration(value: object) -> float:
    """`30s`, `5m`, `1h30m`, `250ms`, or a number of seconds; finite, 0 to MAX_DURATION."""
    text = value.strip() if isinstance(value, str) else ""
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = float(min(max(value, -1), int(MAX_DURATION) + 1))  # a huge TOML integer overflows float()
    elif isinstance(value, float):
        seconds = value
    elif text:
        pos, seconds = 0, 0.0
        for m in re.finditer(_DURATION_PART, text):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos = m.end()
        if pos != len(text) or pos == 0:
            raise ConfigError(f'{_quote(value)} is not a duration like "30s", "5m" or "1h30m"')
    else:
        raise ConfigError('expected a duration like "30s"')
    if seconds != seconds:  # NaN: every comparison with it is false, so a timeout never fires
        raise ConfigError("must be a finite duration, not nan")
    if seconds < 0:
        raise ConfigError("cannot be negative")
    if seconds > MAX_DURATION:  # inf too
        raise ConfigError(f"must be at most {MAX_DURATION / 86400:g}d (a year)")
    return seconds


def parse_mode(value: object) -> int:
    """A file mode, one of ALLOWED_MODES: "0400", "400", "0o400" or a TOML integer such as 0o400."""
    if isinstance(value, bool):
        raise ConfigError('expected an octal mode like "0400"')
    if isinstance(value, int):
        mode = value
    elif isinstance(value, str) and re.fullmatch(r"(0o?)?[0-7]{1,4}", value):
        mode = int(value.removeprefix("0o"), 8)
    else:
        raise ConfigError(f'{_quote(value)} is not an octal mode like "0400"')
    if mode in ALLOWED_MODES:
        return mode
    meant = int(str(value), 8) if isinstance(value, int) and re.fullmatch(r"[0-7]{3,4}", str(value)) else None
    if meant in ALLOWED_MODES:  # TOML cannot tell 440 from 0o440: the digits say what was meant
        raise ConfigError(
            f'{value} is {value:#o} in octal (TOML integers are decimal); write mode = "{meant:04o}" or {meant:#o}'
        )
    shown = f"{mode:#o} (decimal {mode})" if isinstance(value, int) else f"{mode:04o}"
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"{shown} has bits beyond 0777 (no setuid, setgid or sticky); {_MODES_ALLOWED}")
    raise ConfigError(f"{shown} is not allowed; {_MODES_ALLOWED}")


_MODES_ALLOWED = "a secret file's mode is 0400, 0440, 0600 or 0640 (owner read, owner write, group read)"


# The types of keys. A parser returns the value, None for "the default" (an empty string, for
# some keys), or raises ConfigError with the reason; the loader adds the section and key.


def _reject(reason: str) -> NoReturn:
    raise ConfigError(reason)


def _show(value: object) -> str:
    if isinstance(value, bool | tuple):
        return f"`{str(value).lower() if isinstance(value, bool) else list(value)}`"
    return f'`"{value}"`' if isinstance(value, str) else f"`{value}`"


class _Type:  # a plain class: a NamedTuple costs ~0.04 ms more to define
    __slots__ = ("label", "parse", "show")  # the label and show (a default) are for the docs

    def __init__(self, label: str, parse: Callable[[object], object], show: Callable[[object], str] = _show) -> None:
        self.label, self.parse, self.show = label, parse, show


def _str(value: object) -> str:
    return value if isinstance(value, str) else _reject("must be a string")


def _valid(check: Callable[[str], str | None], value: object) -> str:
    """A string in which `check` (a validate_* function) finds no fault."""
    reason = check(_str(value))
    return _str(value) if reason is None else _reject(reason)


def _url(value: object) -> str | None:
    """Vault's address: scheme, host and port. Never echoed when it may carry a credential."""
    text = _str(value)
    if "@" in text:
        _reject("is refused: the address carries a user name or password; use token_file or AppRole")
    if "?" in text or "#" in text:
        _reject("is refused: the address carries a query or fragment, which may hold a credential; "
                "give only http(s)://HOST:PORT")  # fmt: skip
    if reason := unprintable(text):
        _reject(reason)
    if text and not (re.fullmatch(_VAULT_ADDR, text) and _host_and_port_parse(text)):
        _reject(f"must look like http(s)://HOST:PORT, not {_quote(value)}")
    return text or None


MAX_ADDRS = 8
MAX_EXPIRY_GRACE = 600.0


def _urls(value: object) -> str | tuple[str, ...] | None:
    """One address, or a list of 1 to MAX_ADDRS (an HA cluster's nodes): the same scheme, each once."""
    if not isinstance(value, list):
        return _url(value)
    if not 1 <= len(value) <= MAX_ADDRS:
        _reject(f"must list 1 to {MAX_ADDRS} addresses")
    addrs: list[str] = []
    for i, item in enumerate(value, 1):
        try:
            addr = _url(item)
        except ConfigError as e:
            _reject(f"#{i} {e}")
        if addr is None:
            _reject(f"#{i} is empty")
        addr = addr.rstrip("/")
        if _node(addr) in (_node(a) for a in addrs):
            _reject(f"#{i} {_quote(addr)} is listed twice")
        addrs.append(addr)
    if len({a.split(":", 1)[0].lower() for a in addrs}) > 1:
        _reject("mixes http:// and https://: one plain address would carry the token in clear; use one scheme")
    return addrs[0] if len(addrs) == 1 else tuple(addrs)


def _node(addr: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a valid address, the default port filled in: `https://v` is `https://v:443`."""
    from urllib.parse import urlsplit

    parts = urlsplit(addr)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


def _host_and_port_parse(addr: str) -> bool:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(addr)
        return bool(parts.hostname) and (parts.port is None or parts.port > 0)
    except ValueError:  # "[::1" or a port out of range
        return False


def _count(value: object) -> int:
    if type(value) is not int or value <= 0:
        _reject("must be a positive integer")
    if value > MAX_SECRET_SIZE_LIMIT:
        _reject(f"must be at most {MAX_SECRET_SIZE_LIMIT} (64 MiB)")
    return value


def _text(value: object) -> str:
    """A string that reaches a request or a log line: no control or format characters."""
    return _valid(unprintable, value)


def _env_patterns(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _reject("must be a list of strings")
    bad = [name for name in value if not re.fullmatch(_ENV_NAME, name.removesuffix("*"))]
    return _reject(f"{_quote(bad[0])} is not a variable name (or PREFIX*)") if bad else tuple(value)


def _choice(*choices: str) -> _Type:
    shown = [f'"{c}"' for c in choices]
    spoken = f"{', '.join(shown[:-1])} or {shown[-1]}"

    def parse(value: object) -> str | None:
        if _str(value) and value not in choices:
            _reject(f"must be {spoken}, not {_quote(value)}")
        return _str(value) or None

    return _Type(", ".join(f"`{c}`" for c in shown[:-1]) + f" or `{shown[-1]}`", parse)


def _template(value: object) -> "Template":
    from secret_init.template import parse_template

    return parse_template(_str(value))


MAX_PARAMS = 64

Params = tuple[tuple[str, "str | int | float | bool | tuple[str | int, ...]"], ...]


def _params(value: object) -> Params:
    """A table of flat values for a Vault write; kept sorted so that equal tables compare equal."""
    if not isinstance(value, dict):
        _reject('must be a table, e.g. params = { common_name = "web.internal", ttl = "24h" }')
    if len(value) > MAX_PARAMS:
        _reject(f"has more than {MAX_PARAMS} keys")
    pairs = []
    for key, item in sorted(value.items()):
        if not key or unprintable(key):
            _reject(f"key {_quote(key)} must be a printable, non-empty name")
        pairs.append((key, _param_value(key, item)))
    return tuple(pairs)


def _param_value(key: str, item: object) -> "str | int | float | bool | tuple[str | int, ...]":
    if isinstance(item, bool | int | str) or (isinstance(item, float) and math.isfinite(item)):
        return item
    if isinstance(item, list) and all(isinstance(v, str | int) and not isinstance(v, bool) for v in item):
        return tuple(item)
    return _reject(f"{key!r} must be a string, a number, a boolean or a list of strings or integers, not {_kind(item)}")


def _kind(value: object) -> str:
    return {dict: "a table", list: "a list of mixed values", float: "a number that is not finite"}.get(
        type(value), type(value).__name__
    )


def params_key(params: Params | None) -> str:
    """One text per distinct params table (True is not 1 here, unlike in a tuple comparison)."""
    import json

    return json.dumps(params)


def _mount(value: str) -> str:
    """A mount path as Vault names it: segments of a URL path, no '..' or '.' that could climb out of auth/."""
    mount = value.strip("/")
    if not mount or any(part in ("", ".", "..") for part in mount.split("/")):
        _reject(f'must be a path such as "approle" or "team/jwt", not {_quote(value)}')
    if re.search(r"[?#%\\\s]", mount):
        _reject("must not hold '?', '#', '%', a backslash or white space")
    return mount


def _show_duration(seconds: object) -> str:
    minutes = seconds / 60 if isinstance(seconds, float) and seconds % 60 == 0 else None
    return f'`"{minutes:g}m"`' if minutes else f'`"{seconds:g}s"`'


def _show_signal(number: object) -> str:
    import signal

    return f'`"{next(s.name for s in signal.Signals if s == number)}"`'


_TEXT = _Type("string", lambda v: _text(v) or None)
_MOUNT = _Type("mount path", lambda v: _mount(_text(v)))
_STRING = _Type("string", _text)
_PATH = _Type("absolute path", lambda v: _valid(validate_path, v))
_DIR = _Type("absolute path", lambda v: _PATH.parse(v) if _str(v) else None)
_URLS = _Type("URL or list of URLs", _urls)
_BOOL = _Type("boolean", lambda v: v if isinstance(v, bool) else _reject("must be true or false"))
_COUNT = _Type("positive integer", _count)
_DURATION = _Type("duration", parse_duration, _show_duration)
_MODE = _Type("mode", parse_mode, lambda mode: f'`"{mode:04o}"`')
_SIGNAL = _Type("signal name", lambda v: parse_signal(_str(v)), _show_signal)
_USER = _Type('user name or `"uid:gid"`', lambda v: _valid(validate_user_spec, v))
_NAMES = _Type("list of names", _env_patterns)
_ON_ROTATE = _Type('`"restart"`, `"signal:NAME"` or `"none"`', _str)
_NAME = _Type("file name", lambda v: _valid(validate_name, v))
_SOURCE = _Type("source", lambda v: parse_reference(_str(v)))
_ENV = _Type("variable name", lambda v: _valid(validate_env_name, v))
_TEMPLATE = _Type("template", _template)
_PARAMS = _Type("table", _params)


class SecretSpec(NamedTuple):
    name: Annotated[str, _NAME, "The file's name in `output.dir`; unique."]
    source: Annotated[SourceRef, _SOURCE, "Where the value comes from; see [Sources](#sources)."]
    env: Annotated[str | None, _ENV, "A variable the app gets, set to the file's path; unique."] = None
    template: Annotated["Template | None", _TEMPLATE, "The file's content, built from the fields."] = None
    mode: Annotated[int, _MODE, 'This file\'s mode, e.g. `"0440"`.', "`output.mode`"] = 0o400
    user: Annotated[str | None, _USER, "This file's owner.", "`output.user`"] = None  # None means output.user
    params: Annotated[Params | None, _PARAMS, "Write the `vault:` path with these; see [Writes](#writes)."] = None

    @property
    def written(self) -> bool:
        """A Vault path written (POST) with params, not read: it issues something new each time."""
        return self.params is not None


class OutputConfig(NamedTuple):
    dir: Annotated[str, _DIR, "A directory for secret-init alone, created if missing."] = DEFAULT_OUTPUT_DIR
    user: Annotated[str | None, _USER, "Owns the files, and runs the app.", "the user secret-init runs as"] = None
    mode: Annotated[int, _MODE, 'The mode of every file: `"0400"`, `"0440"`, `"0600"` or `"0640"`.'] = 0o400
    allow_non_tmpfs: Annotated[bool, _BOOL, "Allow a `dir` that is not on tmpfs or ramfs."] = False
    max_secret_size: Annotated[int, _COUNT, "The largest secret in bytes, at most 64 MiB (else exit 65)."] = (
        DEFAULT_MAX_SECRET_SIZE
    )


class VaultConfig(NamedTuple):
    addr: Annotated[
        str | tuple[str, ...] | None,
        _URLS,
        "Vault's or OpenBao's URL; a list for an HA cluster's nodes, tried in turn.",
        "`$VAULT_ADDR`, then `$BAO_ADDR`",
    ] = None
    auth: Annotated[str, _choice(*AUTH_METHODS), "How secret-init logs in."] = "token"
    auth_mount: Annotated[str | None, _MOUNT, "Where the auth method is mounted.", "the method's name"] = None
    token_file: Annotated[str | None, _PATH, 'For `auth = "token"`: a file holding the token.'] = None
    role_id_file: Annotated[str | None, _PATH, 'For `auth = "approle"`, required: a file with the role_id.'] = None
    secret_id_file: Annotated[str | None, _PATH, 'For `auth = "approle"`: a file with the secret_id.'] = None
    secret_id_wrapped: Annotated[bool, _BOOL, "For `approle`: `secret_id_file` holds a wrapping token."] = False
    approle_mount: Annotated[str | None, _MOUNT, "An alias of `auth_mount` for `approle`.", "none"] = None
    role: Annotated[str | None, _TEXT, "For `jwt`, `kubernetes` (required) and `cert`: the role."] = None
    jwt_file: Annotated[str | None, _PATH, "For `jwt` (required), `kubernetes`: a file with the JWT.", JWT_DEFAULT] = (
        None
    )
    client_cert: Annotated[str | None, _PATH, "A PEM client certificate (mTLS; `cert` needs it).", CERT_DEFAULT] = None
    client_key: Annotated[str | None, _PATH, "The PEM key of `client_cert`.", KEY_DEFAULT] = None
    ca_cert: Annotated[str | None, _PATH, "A PEM CA bundle for Vault.", "`$VAULT_CACERT`, then `$BAO_CACERT`"] = None
    namespace: Annotated[str | None, _STRING, "A Vault namespace; empty means none.", "`$VAULT_NAMESPACE`"] = None
    startup_timeout: Annotated[float, _DURATION, "How long to retry while Vault is unavailable, then exit 69."] = 30.0
    request_timeout: Annotated[float, _DURATION, "The timeout of one HTTP request."] = 10.0
    refresh_interval: Annotated[float, _DURATION, "When supervising: how often to read unleased secrets again."] = 300.0
    revoke_on_exit: Annotated[
        bool, _BOOL, "When supervising: on exit, revoke the leases it created and the token it logged in with."
    ] = True

    @property
    def addrs(self) -> tuple[str, ...]:
        """Every configured address, the first tried first; () when none is set."""
        if self.addr is None:
            return ()
        return (self.addr,) if isinstance(self.addr, str) else self.addr

    @property
    def mount(self) -> str:
        """Where `auth` is mounted: as configured (load fills it in), else the method's own name."""
        return self.auth_mount or self.approle_mount or self.auth


class ProcessConfig(NamedTuple):
    scrub_env: Annotated[tuple[str, ...], _NAMES, "More variables to remove from the app's environment."] = ()
    allow_root: Annotated[bool, _BOOL, "Let `run` exec the app as uid 0."] = False
    supervise: Annotated[bool, _BOOL, "Supervise the app as PID 1 even when no secret has a lease."] = False
    stop_signal: Annotated[int, _SIGNAL, "The signal that stops the app."] = 15  # SIGTERM
    stop_timeout: Annotated[float, _DURATION, "How long to wait after `stop_signal` before SIGKILL."] = 10.0
    rotate_before: Annotated[float | None, _DURATION, "Rotate a lease with this much left.", "1/3 of its life"] = None
    on_rotate: Annotated[str, _ON_ROTATE, "What happens to the app when its files change."] = "restart"  # or "signal"
    rotate_signal: int = 1  # not a key: on_rotate = "signal:NAME" sets it; SIGHUP
    on_expiry: Annotated[
        str, _choice("stop", "keep"), "What happens when a lease is still unrotated `expiry_grace` after its expiry."
    ] = "stop"
    expiry_grace: Annotated[
        float, _DURATION, "After a lease expires, how long rotation is retried (about once a second), at most 10m."
    ] = 30.0


class SidecarConfig(NamedTuple):
    notify_pidfile: Annotated[str | None, _PATH, "A file with the app's pid, to signal after files change."] = None
    notify_signal: Annotated[int, _SIGNAL, "The signal it sends."] = 1  # SIGHUP


class Listen(NamedTuple):
    host: str  # an IP literal; IPv6 without brackets
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        import ipaddress

        return ipaddress.ip_address(self.host).is_loopback


def parse_listen(value: object) -> Listen:
    """ "127.0.0.1:9102", "[::1]:9102" or "localhost:9102" (taken as 127.0.0.1): an address to bind, not a name."""
    import ipaddress

    text = _str(value)
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([0-9A-Za-z.]+):(\d{1,5})", text)
    if not match:
        _reject(f'must be "HOST:PORT" such as "127.0.0.1:9102" or "[::1]:9102", not {_quote(text)}')
    host, port = (match[1], match[2]) if match[1] else (match[3], match[4])
    host = "127.0.0.1" if host == "localhost" else host
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        _reject(f"host {_quote(host)} must be an IP address (or localhost)")
    if not 1 <= int(port) <= 65535:
        _reject(f"port {port} must be from 1 to 65535")
    return Listen(host, int(port))


_LISTEN = _Type('`"HOST:PORT"`', parse_listen, lambda v: f'`"{v}"`')


class MetricsConfig(NamedTuple):
    listen: Annotated[Listen | None, _LISTEN, 'Serve Prometheus metrics here, e.g. `"127.0.0.1:9102"`.', "off"] = None
    allow_remote: Annotated[bool, _BOOL, "Allow a `listen` address that is not loopback."] = False


class Config(NamedTuple):
    path: str
    output: OutputConfig
    vault: VaultConfig
    process: ProcessConfig
    secrets: tuple[SecretSpec, ...]
    swarm_dir: str = DEFAULT_SWARM_DIR
    sidecar: SidecarConfig = SidecarConfig()
    notes: tuple[str, ...] = ()  # for a debug log line each; they hold no secret
    metrics: MetricsConfig = MetricsConfig()

    @property
    def uses_vault(self) -> bool:
        return bool(self.vault_specs)

    @property
    def vault_specs(self) -> tuple[SecretSpec, ...]:
        return tuple(s for s in self.secrets if s.source.kind == "vault")

    @property
    def vault_paths(self) -> list[str]:
        """Each Vault path once, sorted: one read serves every secret from it."""
        return sorted({s.source.path for s in self.vault_specs})

    @property
    def written_paths(self) -> set[str]:
        """Vault paths written with params: each request issues something new, so none is re-read on a timer."""
        return {s.source.path for s in self.vault_specs if s.written}

    def file_path(self, spec: SecretSpec) -> str:
        return f"{self.output.dir.rstrip('/')}/{spec.name}"


_SECTIONS: dict[str, type[NamedTuple]] = {
    "output": OutputConfig, "vault": VaultConfig, "process": ProcessConfig, "sidecar": SidecarConfig,
    "secret": SecretSpec, "metrics": MetricsConfig,
}  # fmt: skip


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


def config_path(cli_value: str | None, environ: Mapping[str, str]) -> str:
    """--config wins, then SECRET_INIT_CONFIG, then the default path."""
    return cli_value or environ.get("SECRET_INIT_CONFIG") or DEFAULT_CONFIG_PATH


def load(path: str, environ: Mapping[str, str]) -> Config:
    """The config file at `path`, then the output dir checked against what is on disk."""
    text = _read_config_file(path)
    cfg = load_text(text, path, environ)
    _check_output_dir_on_disk(cfg.output.dir, _shown(path))
    return cfg


def _shown(text: str) -> str:
    """A string for a one-line message: as it is, or escaped when it holds a control or format character."""
    shown = text if unprintable(text) is None else ascii(text)
    return shown if len(shown) <= 200 else f"{shown[:195]}..."


def _read_config_file(path: str) -> str:
    """Its text. Opened without blocking (a FIFO), then only a regular file of at most MAX_CONFIG_SIZE is read."""
    import stat

    shown = _shown(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise ConfigError(f"config file {shown} does not exist") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise ConfigError(f"config file {shown} cannot be read: {getattr(e, 'strerror', None) or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"config file {shown} is not a regular file ({_file_kind(st.st_mode)})")
        if st.st_size > MAX_CONFIG_SIZE:
            raise ConfigError(f"config file {shown} is larger than {MAX_CONFIG_SIZE} bytes")
        raw = _read_at_most(fd, MAX_CONFIG_SIZE + 1)  # it may grow after fstat
    except OSError as e:
        raise ConfigError(f"config file {shown} cannot be read: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_CONFIG_SIZE:
        raise ConfigError(f"config file {shown} is larger than {MAX_CONFIG_SIZE} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {shown} is not UTF-8") from None


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks, size = [], 0
    while size < limit and (chunk := os.read(fd, min(65536, limit - size))):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _file_kind(mode: int) -> str:
    import stat

    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "not a file")


def _check_output_dir_on_disk(directory: str, path: str) -> None:
    """Refuse an output dir that resolves, through symlinks, to a shared one, or that is a symlink itself.

    The sink opens the directory with O_NOFOLLOW, which guards only the last component: a
    symlink above it (`/srv/link/tmp` with link -> /) would hand it /tmp.
    """
    real = os.path.realpath(directory)  # for a dir not made yet: its parent resolved, its name appended
    if real in SHARED_DIRS or real in {os.path.realpath(d) for d in SHARED_DIRS}:
        raise ConfigError(
            f"config {path}: [output]: dir {_shown(directory)} resolves to {real}, a shared system directory; "
            f"use a dedicated one such as {DEFAULT_OUTPUT_DIR}"
        )
    if os.path.islink(directory):
        raise PermissionRefusedError(
            f"config {path}: [output]: dir {_shown(directory)} is a symlink (to {_shown(real)}); "
            "name the directory itself"
        )


def load_text(text: str, path: str, environ: Mapping[str, str]) -> Config:
    import tomllib

    shown = _shown(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {shown}: not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"config {shown}: not valid TOML here: arrays or tables nested too deeply") from None
    except ValueError:  # int() refuses more than sys.get_int_max_str_digits() digits
        raise ConfigError(f"config {shown}: not valid TOML here: a number too long to read") from None
    try:
        _refuse_nul(data)
        return _parse(data, path, environ)
    except ConfigError as e:
        raise ConfigError(f"config {shown}: {e}") from None


def _refuse_nul(data: dict[str, object]) -> None:
    """No key or string anywhere may hold NUL: no file name, path or header can carry one."""
    pending: list[tuple[str, object]] = [("", data)]
    while pending:  # not recursive: TOML nests as deep as tomllib's own recursion allows
        where, value = pending.pop()
        where = where.removeprefix(".")
        if isinstance(value, str) and "\x00" in value:
            raise ConfigError(f"{where or 'a key'}: a value holds NUL; no value may")
        children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, child in children:
            if isinstance(key, str) and "\x00" in key:
                raise ConfigError(f"{where or 'top level'}: a key holds NUL; no key may")
            pending.append((f"{where}.{key}" if isinstance(key, str) else f"{where} #{key + 1}", child))


def _fail(where: str, key: str, reason: str) -> NoReturn:
    raise ConfigError(f"{where}: {key} {reason}")


def _parse(data: dict[str, object], path: str, environ: Mapping[str, str]) -> Config:
    _check_known(data, "top level", _SECTIONS)
    output = _read(OutputConfig, data.get("output"), "[output]")
    output = output._replace(dir=_normal_dir(output.dir))
    if output.dir in SHARED_DIRS:
        reason = f"is a shared system directory; use a dedicated one such as {DEFAULT_OUTPUT_DIR}"
        _fail("[output]", "dir", f"{output.dir} {reason}")
    vault = _auth_keys(_read(VaultConfig, data.get("vault"), "[vault]"))
    if vault.request_timeout <= 0:
        _fail("[vault]", "request_timeout", "must be more than zero")
    if vault.refresh_interval < 1:
        _fail("[vault]", "refresh_interval", "must be at least 1s")
    process = _read(ProcessConfig, data.get("process"), "[process]")
    if process.rotate_before is not None and process.rotate_before <= 0:
        _fail("[process]", "rotate_before", "must be more than zero")
    if process.expiry_grace > MAX_EXPIRY_GRACE:
        _fail("[process]", "expiry_grace", "must be at most 10m: past that, credentials are long dead")
    if process.on_rotate.startswith("signal:"):
        try:
            process = process._replace(on_rotate="signal", rotate_signal=parse_signal(process.on_rotate[7:]))
        except ConfigError as e:
            _fail("[process]", "on_rotate", str(e))
    elif process.on_rotate not in ("restart", "none"):
        _fail("[process]", "on_rotate", f'must be "restart", "signal:NAME" or "none", not {_quote(process.on_rotate)}')
    sidecar = _read(SidecarConfig, data.get("sidecar"), "[sidecar]")
    metrics = _read(MetricsConfig, data.get("metrics"), "[metrics]")
    if metrics.listen is not None and not metrics.listen.is_loopback and not metrics.allow_remote:
        _fail("[metrics]", "listen", f"{metrics.listen} is not a loopback address; set allow_remote = true to serve "
              "metrics beyond this host")  # fmt: skip
    secrets = _parse_secrets(data.get("secret", []), output)
    vault, notes = _vault_from_env(vault, environ, any(s.source.kind == "vault" for s in secrets))
    swarm_dir = environ.get("SECRET_INIT_SWARM_DIR") or DEFAULT_SWARM_DIR
    if any(s.source.kind == "swarm" for s in secrets) and (problem := validate_path(swarm_dir)):
        _fail("environment", "$SECRET_INIT_SWARM_DIR", problem)
    return Config(path, output, vault, process, secrets, swarm_dir, sidecar, notes, metrics)


def _normal_dir(path: str) -> str:
    """output.dir as the kernel resolves it, spelled once: no '..', no '//' or '/.', no trailing '/'."""
    import posixpath

    if ".." in path.split("/"):
        _fail("[output]", "dir", f"{_shown(path)} must not have '..' components; name the directory itself")
    normal = posixpath.normpath(path)  # without '..' a purely textual normalization is exact
    return "/" + normal.lstrip("/")  # POSIX keeps a leading '//'; Linux reads it as '/'


def _parse_secrets(items: object, output: OutputConfig) -> tuple[SecretSpec, ...]:
    if not isinstance(items, list):
        _fail("top level", "secret", "must be written as [[secret]] tables")
    secrets: dict[str, SecretSpec] = {}
    envs: set[str | None] = set()
    for i, item in enumerate(items, 1):
        name = item.get("name") if isinstance(item, dict) else None
        where = f"[[secret]] {_quote(name)}" if isinstance(name, str) else f"[[secret]] #{i}"
        spec = _read(SecretSpec, item, where, {"mode": output.mode})
        if spec.template is not None and (spec.source.kind != "vault" or spec.source.field is not None):
            _fail(where, "template", "needs a vault: source without #field (the template picks the fields)")
        if spec.params is not None and spec.source.kind != "vault":
            _fail(where, "params", "needs a vault: source (the path is written with them)")
        if spec.name in secrets:
            _fail(where, "name", "is used twice")
        if same_path := _differing_params(spec, secrets.values()):
            reason = f"differ from those of secret {_quote(same_path.name)}, which names the same path"
            _fail(where, "params", f"{reason} {spec.source.path}: one path is one request, one set of params")
        if spec.env is not None and spec.env in envs:
            _fail(where, f"env {spec.env}", "is used twice")
        secrets[spec.name] = spec
        envs.add(spec.env)
    return tuple(secrets.values())


def _differing_params(spec: SecretSpec, earlier: Iterable[SecretSpec]) -> SecretSpec | None:
    if spec.source.kind != "vault":
        return None
    for other in earlier:
        same = other.source.kind == "vault" and other.source.path == spec.source.path
        if same and params_key(other.params) != params_key(spec.params):
            return other
    return None


def _vault_from_env(vault: VaultConfig, environ: Mapping[str, str], used: bool) -> tuple[VaultConfig, tuple[str, ...]]:
    """[vault] with what the environment adds. A bad address there is ignored while no secret needs it."""
    addr, notes = vault.addr, []
    if addr is None:
        origin = "VAULT_ADDR" if environ.get("VAULT_ADDR") else "BAO_ADDR"
        try:
            addr = _url(environ.get(origin, ""))
        except ConfigError as e:
            if used:
                _fail("[vault]", "addr", str(e))
            notes.append(f"${origin} ignored: it is not like http(s)://HOST:PORT, and no secret has a vault: source")
    namespace = environ.get("VAULT_NAMESPACE") if vault.namespace is None else vault.namespace  # "" in the file wins
    if used and namespace and (reason := unprintable(namespace)):
        _fail("[vault]", "namespace", f"(from $VAULT_NAMESPACE) {reason}")
    vault = vault._replace(
        addr=addr.rstrip("/") if isinstance(addr, str) else addr,
        ca_cert=vault.ca_cert or environ.get("VAULT_CACERT") or environ.get("BAO_CACERT"),
        namespace=namespace or None,
        client_cert=vault.client_cert or _env_path(environ, "CLIENT_CERT", used),
        client_key=vault.client_key or _env_path(environ, "CLIENT_KEY", used),
    )
    _check_client_cert(vault, used)
    return vault, tuple(notes)


def _auth_keys(vault: VaultConfig) -> VaultConfig:
    """Each auth key only with its method, each method's required keys, and the defaults that depend on it."""
    method = vault.auth
    for key, methods in _AUTH_KEYS.items():
        if getattr(vault, key) not in (None, False) and method not in methods:
            _fail("[vault]", key, f'is not used with auth = "{method}"; it is for {_spoken(methods)}')
    required = {"approle": ("role_id_file",), "jwt": ("role", "jwt_file"), "kubernetes": ("role",)}
    for key in required.get(method, ()):
        if getattr(vault, key) is None:
            _fail("[vault]", key, f'is required when auth = "{method}"')
    if vault.secret_id_wrapped and vault.secret_id_file is None:
        _fail("[vault]", "secret_id_file", "is required when secret_id_wrapped = true: it holds the wrapping token")
    if vault.approle_mount and vault.auth_mount and vault.approle_mount != vault.auth_mount:
        _fail("[vault]", "approle_mount", "differs from auth_mount; it is an alias of auth_mount: set only auth_mount")
    return vault._replace(
        auth_mount=vault.auth_mount or vault.approle_mount or (None if method == "token" else method),
        jwt_file=vault.jwt_file or (SERVICE_ACCOUNT_JWT if method == "kubernetes" else None),
    )


def _spoken(words: tuple[str, ...]) -> str:
    quoted = [f'"{w}"' for w in words]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


def _env_path(environ: Mapping[str, str], suffix: str, used: bool) -> str | None:
    """$VAULT_<suffix>, then $BAO_<suffix>, when a secret needs Vault: an absolute path."""
    name = f"VAULT_{suffix}" if environ.get(f"VAULT_{suffix}") else f"BAO_{suffix}"
    value = environ.get(name)
    if not value or not used:
        return None
    if problem := validate_path(value):
        _fail("[vault]", suffix.lower(), f"(from ${name}) {problem}")
    return value


def _check_client_cert(vault: VaultConfig, used: bool) -> None:
    """A client certificate comes with its key, over https; auth = "cert" needs one once Vault is used."""
    for key, other in (("client_cert", "client_key"), ("client_key", "client_cert")):
        if getattr(vault, key) is None and (getattr(vault, other) is not None or (vault.auth == "cert" and used)):
            why = 'auth = "cert"' if vault.auth == "cert" else f"{other} is set"
            _fail("[vault]", key, f"is required when {why} (or ${'VAULT_' + key.upper()})")
    if vault.auth == "cert" and any(not addr.startswith("https://") for addr in vault.addrs):
        _fail("[vault]", "addr", 'must be https:// for auth = "cert": the certificate is presented in TLS')


_R = TypeVar("_R", bound=NamedTuple)


def _declared(cls: type[_R]) -> dict[str, tuple[_Type, str, str | None]]:
    """A section's keys (its fields annotated with a _Type), each with its doc and its default as shown."""
    keys = {}
    for field, hint in cls.__annotations__.items():
        meta: tuple[object, ...] = getattr(hint, "__metadata__", ())
        if meta and isinstance(meta[0], _Type):
            keys[field] = (meta[0], str(meta[1]), str(meta[2]) if len(meta) > 2 else None)
    return keys


def _check_known(table: dict[str, object], where: str, known: Mapping[str, object]) -> None:
    unknown = sorted(set(table) - set(known))
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ConfigError(f"{where}: unknown key(s) {', '.join(_shown(key) for key in unknown[:5])}{more}")


def _read(cls: type[_R], table: object, where: str, defaults: Mapping[str, object] | None = None) -> _R:
    """A section's record from its TOML table, as its declaration says."""
    table = {} if table is None else table
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    keys = _declared(cls)
    _check_known(table, where, keys)
    values: list[object] = []
    for field in cls._fields:
        value = None
        if field in keys and table.get(field) is not None:
            try:
                value = keys[field][0].parse(table[field])
            except ConfigError as e:
                _fail(where, field, str(e))
        if value is None and field not in cls._field_defaults:
            _fail(where, field, "is required")
        values.append((defaults or {}).get(field, cls._field_defaults[field]) if value is None else value)
    return cls._make(values)


def docs_table(section: str) -> str:
    """The markdown table of a section's keys ("output", "vault", "process", "sidecar", "secret")."""
    cls = _SECTIONS[section]
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, (kind, doc, shown) in _declared(cls).items():
        default = cls._field_defaults.get(key, ...)
        shown = shown or ("required" if default is ... else "none" if default is None else kind.show(default))
        rows.append(f"| `{key}` | {kind.label} | {shown} | {doc} |")
    return "\n".join(rows)
