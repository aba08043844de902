"""Every failure secret-init reports, each carrying the exit code the container sees.

The codes follow sysexits(3), so an orchestrator can tell a bad config (78) from a
Vault outage (69) without parsing logs.
"""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    USAGE = 64
    DATA = 65  # a missing field or placeholder; a request Vault rejects; a malformed or oversized Vault answer
    NO_INPUT = 66  # a source file or Vault path that does not exist or cannot be read
    NO_USER = 67  # the configured user does not exist
    UNAVAILABLE = 69  # Vault unreachable, sealed, overloaded or too slow past startup_timeout; a foreign redirect
    SOFTWARE = 70  # a bug in secret-init
    CANT_CREATE = 73  # an output file could not be written (disk full, I/O error)
    TEMPFAIL = 75  # a lease expired unrotated (on_expiry = "stop"); the output dir is another's or its lock is held
    NO_PERMISSION = 77  # non-tmpfs dir, chown refused, root refused, Vault denied
    CONFIG = 78  # malformed or inconsistent configuration
    NOT_EXECUTABLE = 126
    NOT_FOUND = 127


class SecretInitError(Exception):
    """A failure with a one-line message that holds no secret value."""

    exit_code: ExitCode = ExitCode.SOFTWARE

    def __init__(self, message: str, exit_code: ExitCode | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(SecretInitError):
    exit_code = ExitCode.USAGE


class ConfigError(SecretInitError):
    exit_code = ExitCode.CONFIG


class DataError(SecretInitError):
    exit_code = ExitCode.DATA


class MissingFieldError(DataError):
    pass


class RequestRejected(DataError):
    """Vault answered 400 to a request that is not a login: for a lease, it no longer exists."""


class SourceError(SecretInitError):
    exit_code = ExitCode.NO_INPUT


class UnknownUserError(SecretInitError):
    exit_code = ExitCode.NO_USER


class VaultUnavailableError(SecretInitError):
    exit_code = ExitCode.UNAVAILABLE


class PermissionRefusedError(SecretInitError):
    exit_code = ExitCode.NO_PERMISSION


class WriteError(SecretInitError):
    exit_code = ExitCode.CANT_CREATE
