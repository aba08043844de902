"""The app's environment and the final exec: paths in, values and Vault settings out."""

import errno
import os
import stat
from collections.abc import Iterable, Mapping
from typing import NoReturn

import structlog

from secret_init import privileges
from secret_init.config import SCRUBBED_ENV_PREFIXES
from secret_init.errors import ExitCode, SecretInitError

log = structlog.get_logger()

MIN_MATCHED_VALUE = 8


def child_environment(
    environ: Mapping[str, str],
    scrub: Iterable[str],
    user_env: Mapping[str, str | None],
    file_vars: Mapping[str, str],
    secret_values: Iterable[bytes],
) -> dict[str, str]:
    """secret-init's environment minus VAULT_*, BAO_*, SECRET_INIT_* and scrub_env, plus *_FILE paths.

    A variable that holds a materialized secret's exact value is removed too: the app
    gets the file instead. Values shorter than 8 characters are not matched, so a secret
    like "1" cannot strip DEBUG=1.
    """
    exact = {s for s in scrub if not s.endswith("*")}
    prefixes = SCRUBBED_ENV_PREFIXES + tuple(s[:-1] for s in scrub if s.endswith("*"))
    values = {_plain(v.decode("utf-8", "surrogateescape")) for v in secret_values}
    values = {v for v in values if len(v) >= MIN_MATCHED_VALUE}
    env: dict[str, str] = {}
    for name, value in environ.items():
        if name in exact or name.startswith(prefixes):
            continue
        if _plain(value) in values:
            log.warning("removed a variable holding a secret value from the app's environment", variable=name)
            continue
        env[name] = value
    for name, user_value in user_env.items():
        if user_value is None:
            env.pop(name, None)
        else:
            env[name] = user_value
    env.update(file_vars)
    return env


def _plain(value: str) -> str:
    # `echo pw | docker secret create` stores "pw\n"; the variable usually lacks the newline.
    return value.rstrip("\r\n")


def resolve_command(command: str, path_var: str) -> str:
    """Find `command` like execvp would, telling 'not found' (127) from 'not executable' (126)."""
    dirs = [""] if "/" in command else [d or "." for d in path_var.split(":")]
    candidates = [os.path.join(d, command) for d in dirs]
    denied = None
    for candidate in candidates:
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and os.access(candidate, os.X_OK):
            return candidate
        denied = candidate
    if denied is not None:
        raise SecretInitError(f"command {command!r}: {denied} is not executable", ExitCode.NOT_EXECUTABLE)
    raise SecretInitError(f"command {command!r} not found (PATH={path_var})", ExitCode.NOT_FOUND)


def exec_app(argv: list[str], env: Mapping[str, str]) -> NoReturn:
    """Replace this process with the app. Nothing of Python runs after this."""
    path = resolve_command(argv[0], env.get("PATH", os.defpath))
    privileges.restore_core_limit()
    log.info("exec", argv0=argv[0], path=path)
    try:
        os.execve(path, argv, dict(env))  # noqa: S606 - exec without a shell is the point
    except OSError as e:
        code = ExitCode.NOT_FOUND if e.errno == errno.ENOENT else ExitCode.NOT_EXECUTABLE
        raise SecretInitError(f"exec of {argv[0]!r} failed: {e.strerror}", code) from None
