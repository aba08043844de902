"""The TLS client certificate: read at each login, checked as a pair, and kept in memory per token.

OpenBao's cert method renews a token only for the very certificate it logged in with. So the
certificate and key a login used are copied into a memfd (memory, never disk) and each token keeps
presenting its own copy: a certificate renewed on disk is taken up at the next login, and the
tokens before it can still be renewed. requests loads a certificate from a path at each new
connection; /proc/self/fd/N names the memfd. Only a process that may ptrace this one can open it
through /proc: root, or this uid while the process is dumpable (secret-init makes itself non-dumpable).
"""

import os
import stat

import structlog

from secret_init.errors import ConfigError, SourceError
from secret_init.redaction import REDACTOR
from secret_init.sources.files import read_regular_file

log = structlog.get_logger()

MAX_CERT_FILE = 1024 * 1024  # a certificate with its chain
MAX_KEY_FILE = 64 * 1024
SAFE_KEY_MODES = (0o400, 0o600)


class CertCopy:
    """A certificate and its key in one PEM memfd; `path` is what requests and OpenSSL open."""

    __slots__ = ("_fd",)

    def __init__(self, pem: bytes) -> None:
        self._fd: int | None = os.memfd_create("secret-init-client-cert", os.MFD_CLOEXEC)
        view = memoryview(pem)
        while view:
            view = view[os.write(self._fd, view) :]

    @property
    def path(self) -> str:
        assert self._fd is not None, "closed"
        return f"/proc/self/fd/{self._fd}"

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __repr__(self) -> str:
        return f"CertCopy(fd={self._fd})"


def load(cert: str, key: str) -> CertCopy:
    """The pair as the files hold it now, checked; the key is registered for redaction first."""
    cert_pem = read_regular_file(cert, MAX_CERT_FILE, "vault client_cert", "the limit of a certificate file")
    key_pem = read_regular_file(key, MAX_KEY_FILE, "vault client_key", "the limit of a credential file")
    for name, path, pem in (("client_cert", cert, cert_pem), ("client_key", key, key_pem)):
        if not pem.strip():
            raise SourceError(f"vault {name}: {path} is empty")
    REDACTOR.add(key_pem.decode("utf-8", "replace"))
    mode = stat.S_IMODE(os.stat(key).st_mode)
    if mode not in SAFE_KEY_MODES:
        log.warning("vault client_key mode is not 0400 or 0600", path=key, mode=f"{mode:04o}")
    copy = CertCopy(cert_pem.rstrip(b"\n") + b"\n" + key_pem)
    try:
        check_key_pair(copy.path, copy.path, shown=(cert, key))
    except BaseException:
        copy.close()
        raise
    return copy


class _NoPassphrase(Exception):
    pass


def _refuse_passphrase() -> bytes:
    raise _NoPassphrase  # else OpenSSL would prompt on the terminal, and the start would wait for it


def check_key_pair(cert: str, key: str, shown: tuple[str, str] | None = None) -> None:
    """The certificate and key load as a pair, the key unencrypted; else a config error naming the files."""
    import ssl

    cert_name, key_name = shown or (cert, key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert, key, password=_refuse_passphrase)
    except _NoPassphrase:
        raise ConfigError(f"vault client_key: {key_name} is encrypted; give secret-init an unencrypted key") from None
    except ssl.SSLError as e:
        reason = "the key does not match the certificate" if "MISMATCH" in str(e) else "not a PEM certificate and key"
        raise ConfigError(f"vault client_cert and client_key: {cert_name} and {key_name}: {reason}") from None
    except OSError as e:
        raise SourceError(f"vault client_cert and client_key: {cert_name} and {key_name}: {e.strerror}") from None
