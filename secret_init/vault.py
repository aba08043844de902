"""The Vault/OpenBao client: hvac, the auth methods, bounded retries with tenacity.

Imported only when a vault: source is configured, so a files-only start never pays
for hvac and requests. Every token, role_id, secret_id, JWT, wrapping token and client key
is registered for redaction when it is read, and no error message built here quotes one.
"""

import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit, urlunsplit

import hvac
import hvac.adapters
import hvac.exceptions as hvac_errors
import requests
import structlog
import tenacity

from secret_init import client_cert
from secret_init.client_cert import CertCopy
from secret_init.config import DEFAULT_MAX_SECRET_SIZE, VaultConfig, is_loopback_url
from secret_init.errors import (
    ConfigError,
    DataError,
    PermissionRefusedError,
    RequestRejected,
    SecretInitError,
    SourceError,
    VaultUnavailableError,
)
from secret_init.metrics import NO_METRICS, Recorder
from secret_init.model import CERTIFICATE_PUBLIC, MAX_TIMESTAMP, Lease
from secret_init.redaction import REDACTOR
from secret_init.sources.files import read_regular_file
from secret_init.transport import AnswerTooLarge, RedirectRefused, VaultSession, never_connected, origin, safe_url

log = structlog.get_logger()
T = TypeVar("T")

# Vault answers with these when it is sealed, a standby, overloaded or mid-failover.
# UnexpectedError is every status hvac does not map: 504 and other 5xx, and 412 (a
# performance standby not yet caught up).
_TRANSIENT_HTTP = (
    hvac_errors.InternalServerError,
    hvac_errors.BadGateway,
    hvac_errors.VaultDown,
    hvac_errors.VaultNotInitialized,
    hvac_errors.RateLimitExceeded,
    hvac_errors.UnexpectedError,
)
_TRANSIENT_NETWORK = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
)
_MAX_REASON = 200
_STATUS_OF = {
    hvac_errors.InvalidRequest: 400,
    hvac_errors.Unauthorized: 401,
    hvac_errors.Forbidden: 403,
    hvac_errors.InvalidPath: 404,
    hvac_errors.RateLimitExceeded: 429,
    hvac_errors.InternalServerError: 500,
    hvac_errors.VaultNotInitialized: 501,
    hvac_errors.BadGateway: 502,
    hvac_errors.VaultDown: 503,
}
_MAX_CREDENTIAL_FILE = 64 * 1024
# TLS alerts a server sends about the client's certificate (missing, untrusted, expired...).
_CLIENT_CERT_ALERTS = frozenset(
    {"CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_EXPIRED", "CERTIFICATE_REVOKED",
     "CERTIFICATE_UNKNOWN", "UNSUPPORTED_CERTIFICATE", "ACCESS_DENIED"}
)  # fmt: skip
_METHOD_NAMES = {"approle": "AppRole", "jwt": "JWT", "kubernetes": "Kubernetes", "cert": "TLS certificate"}
# The most bytes of an answer that is not a secret read (a login, a renewal, a lookup).
SMALL_ANSWER = 1024 * 1024
# A request started this close to the end of startup_timeout still gets this long; so do
# the revocations after a failed start, and the start overruns its bound by at most this.
_LAST_TRY = 1.0
_LEADER_BUDGET = 2.0  # seconds for sys/leader: a hint is not worth a whole request_timeout on a dead node
_LEADER_ANSWER = 64 * 1024


PROBE_INCREMENT = 10**9  # seconds; Vault caps it at the max TTL, which is what we want to know
MAX_NESTING = 32  # JSON levels in a secret's data; deeper would strain the recursive encoders that render it
MAX_LEASE_ID = 512  # Vault's are a path and a 24-character id
MAX_WARNINGS = 10  # a read's warnings that are logged, each cut to MAX_WARNING_CHARS
MAX_WARNING_CHARS = 200
MAX_DURATION = PROBE_INCREMENT  # a longer TTL is not an answer Vault gives (and overflows timers)


class MalformedAnswer(Exception):
    """An answer that is not the shape Vault gives; its message quotes no value."""


def answer_cap(max_secret_size: int) -> int:
    """The most bytes a read's answer may have: every field of a path, JSON-escaped, and room for the rest."""
    return 8 * max_secret_size + 1024 * 1024


class TokenInfo(NamedTuple):
    ttl: float
    renewable: bool
    max_remaining: float  # until the token's max TTL; inf for a token that never expires


class RetiredToken:
    """A token a re-login replaced: its hvac client, and the certificate it logged in with (OpenBao's cert
    method renews a token only for that one). Kept for renewing until the leases it made are rotated."""

    __slots__ = ("cert", "client")

    def __init__(self, client: hvac.Client, cert: CertCopy | None) -> None:
        self.client = client
        self.cert = cert

    def __repr__(self) -> str:
        return "RetiredToken(<hidden>)"


class VaultSecret:
    """One read of one path: its fields (KV v2 unwrapped) and its lease, if any. Its repr shows no field."""

    __slots__ = ("fields", "lease", "path", "warnings")

    def __init__(
        self, path: str, fields: Mapping[str, Any], lease: Lease | None, warnings: tuple[str, ...] = ()
    ) -> None:
        self.path = path
        self.fields = fields
        self.lease = lease
        self.warnings = warnings

    def __repr__(self) -> str:
        return f"VaultSecret(path={self.path!r}, fields=<{len(self.fields)}>, lease={self.lease!r})"


# Answers that say this node cannot serve now while another may: sealed or a standby without an
# active node (503), overloaded (429), a proxy before a dead node (502, 504), not initialized (501).
_FAILOVER_STATUS = frozenset({429, 501, 502, 503, 504})
# A 500 that says so in words: "active node not found", "local node not active", "Vault is sealed".
_NODE_CANNOT_SERVE = re.compile(r"active node|not active|standby|sealed|leader", re.IGNORECASE)


def http_status(exc: BaseException) -> int | None:
    """The HTTP status an hvac error was made from, when it was made from one here."""
    status = getattr(exc, "http_status", None)
    return status if isinstance(status, int) else _STATUS_OF.get(type(exc))


def fails_over(exc: BaseException, idempotent: bool = True, sent: bool = True) -> bool:
    """A failure after which the same request goes to the next address at once.

    `sent` False: a request that may not be sent twice (an unwrap); it moves on only when
    nothing reached the server (the connection was never made).
    """
    if not sent:
        return never_connected(exc)
    if isinstance(exc, hvac_errors.VaultError):
        status = http_status(exc)
        if status == 500:
            return bool(_NODE_CANNOT_SERVE.search(" ".join(str(e) for e in exc.errors or ())))
        return status in _FAILOVER_STATUS
    return is_transient(exc, idempotent)  # refused, reset, timed out (when it may be sent again)


def is_transient(exc: BaseException, idempotent: bool = True) -> bool:
    # A certificate that fails verification will not pass on the next try.
    if isinstance(exc, requests.exceptions.SSLError):
        return False
    # After a read timeout the request may have been served: a login may have used up
    # a single-use secret_id, so it is not sent again.
    if not idempotent and isinstance(exc, requests.exceptions.ReadTimeout):
        return False
    return isinstance(exc, _TRANSIENT_NETWORK + _TRANSIENT_HTTP)


def describe(exc: BaseException) -> str:
    """A short, token-free description of a failed request."""
    if isinstance(exc, RedirectRefused | AnswerTooLarge | MalformedAnswer):
        return str(exc)
    if isinstance(exc, hvac_errors.VaultError):
        status = http_status(exc)
        errors = "; ".join(str(e) for e in exc.errors) if exc.errors else str(exc.args[0] if exc.args else "")
        errors = " ".join(errors.split())[:_MAX_REASON]  # one line, bounded: it may be a raw body
        prefix = f"HTTP {status}" if status else "unexpected HTTP status"
        return f"{prefix}: {errors}" if errors else prefix
    if isinstance(exc, requests.exceptions.Timeout):
        return "request timed out"
    if isinstance(exc, requests.exceptions.SSLError):
        return _describe_tls(str(exc))
    errno_text = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(exc))
    if errno_text:
        return errno_text.group(1).strip()
    return type(exc).__name__


def _describe_tls(text: str) -> str:
    """Which side of a failed TLS handshake refused: ours (the server's certificate) or the server (ours)."""
    if reason := re.search(r"certificate verify failed: ([^(']+)", text):
        return f"TLS verification failed: {reason.group(1).strip()}"
    alert = re.search(r"\[SSL: (\w*ALERT_(\w+))\]", text)
    if alert and alert.group(2) in _CLIENT_CERT_ALERTS:
        return (
            f"the server refused the TLS handshake ({alert.group(2).lower().replace('_', ' ')}): "
            "it wants a client certificate it trusts; see client_cert"
        )
    if alert:
        return f"the server ended the TLS handshake ({alert.group(2).lower().replace('_', ' ')})"
    if "EOF occurred in violation of protocol" in text or "UNEXPECTED_EOF" in text:
        return (
            "the server closed the connection during the TLS handshake (a server that requires a client "
            "certificate does so when it gets none, or one it does not trust; see client_cert)"
        )
    return "TLS verification failed: see ca_cert"


class VaultClient:
    def __init__(
        self,
        cfg: VaultConfig,
        environ: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        wall: Callable[[], float] = time.time,  # only to read a certificate's expiration, a wall time
        metrics: Recorder = NO_METRICS,
    ) -> None:
        if not cfg.addrs:
            raise ConfigError("vault: no address; set [vault] addr, VAULT_ADDR or BAO_ADDR")
        if any(origin(addr) is None for addr in cfg.addrs):
            raise ConfigError("vault: addr must be http(s)://host[:port]")
        self.cfg = cfg
        self._environ = environ
        self._clock = clock
        self._sleep = sleep
        self._wall = wall
        self._deadline = clock() + cfg.startup_timeout
        self._budget_cap = math.inf  # a shorter budget for a hint (sys/leader) than for a request
        self.owns_token = False  # True when this process logged in and so may revoke
        self._unwrapped: str | None = None  # a wrapped secret_id, once unwrapped: memory is its only copy
        self._lock = threading.RLock()  # the renewer thread and the main loop share one session
        self.session = _session(cfg, environ, self._budget)
        self._metrics = metrics
        if metrics is not NO_METRICS:
            self.session.observe = lambda method, url, seconds: metrics.vault_request(operation(method, url), seconds)
        self._cert: CertCopy | None = None  # the current token's login certificate, when one is configured
        self.client = self._hvac("", None)
        self._leader_asked = len(cfg.addrs) == 1  # with several addresses, sys/leader is asked before the first request
        first = without_userinfo(cfg.addrs[0])
        if cfg.client_cert and first.startswith("http://"):
            log.warning("client_cert is never presented: the vault address is plain http", addr=first)
        for addr in cfg.addrs:
            if addr.startswith("http://") and not is_loopback_url(addr):
                log.warning(
                    "vault address is plain http; tokens and secrets cross the network unencrypted",
                    addr=without_userinfo(addr),
                )

    @property
    def addr(self) -> str:
        """The address requests go to now, for log lines: never a userinfo."""
        return safe_url(self.session.current)

    def end_startup(self) -> None:
        """From now on each request is tried once at each address: the renewer keeps its own schedule."""
        self._deadline = -math.inf

    def _budget(self) -> float:
        """Seconds the next request may take in total: request_timeout, and during the start no more than is left."""
        if self._deadline == -math.inf:
            return min(self.cfg.request_timeout, self._budget_cap)
        left = self._deadline - self._clock()
        return min(self.cfg.request_timeout, max(left, _LAST_TRY), self._budget_cap)

    # -- authentication ---------------------------------------------------------

    def login(self) -> None:
        """Log in as `auth` says. Credential files are read again each time: a JWT or a certificate rotates."""
        previous = self._login()
        if previous is not None:
            self.release(previous)  # a supplied token is not ours to keep alive

    def relogin(self) -> "RetiredToken | None":
        """Log in again; the token it replaces, if this process made it: its leases live only while it does."""
        with self._lock:
            owned = self.owns_token
            previous = self._login()
        if previous is not None and not owned:
            self.release(previous)
            return None
        return previous

    def _login(self) -> "RetiredToken | None":
        """Log in; what was replaced: the previous token's client, with the certificate it logged in with."""
        cert = client_cert.load(self.cfg.client_cert, self.cfg.client_key or "") if self.cfg.client_cert else None
        try:
            fresh = self._hvac("", cert)  # presents the certificate read just now
            if self.cfg.auth == "token":
                fresh.token = self._static_token()
                log.info("vault token loaded", addr=self.addr, auth="token")
                owned = False
            else:
                fresh.token = self._log_in(fresh)
                owned = True
        except BaseException:
            self._drop_copy(cert)
            raise
        with self._lock:
            previous = RetiredToken(self.client, self._cert) if self.client.token else None
            self.client, self._cert, self.owns_token = fresh, cert, owned
        return previous

    def _log_in(self, via: hvac.Client) -> str:
        mount = self.cfg.mount
        body = self._login_body(via)

        def login() -> Any:
            return via.adapter.post(f"/v1/auth/{mount}/login", json=body)

        auth = self._call(f"{_METHOD_NAMES[self.cfg.auth]} login at auth/{mount}", login, login_answer, is_login=True)
        log.info(
            "vault login", addr=self.addr, auth=self.cfg.auth, mount=mount, token_ttl=auth.ttl, renewable=auth.renewable
        )
        return auth.token

    def _hvac(self, token: str, cert: "CertCopy | None") -> hvac.Client:
        """An hvac client on the shared session, for one token and the certificate it logs in and renews with.

        token="" keeps hvac from reading VAULT_TOKEN or ~/.vault-token behind our back; the certificate is
        named, else hvac presents $VAULT_CLIENT_CERT (read when it was imported). RawAdapter with
        ignore_exceptions: every answer, whatever its status or shape, is judged here.
        """
        return hvac.Client(
            url=self.cfg.addrs[0],  # the session aims each request at the active address
            token=token,
            timeout=self.cfg.request_timeout,
            namespace=self.cfg.namespace,
            session=self.session,
            cert=cert.path if cert is not None else None,
            adapter=hvac.adapters.RawAdapter,
            ignore_exceptions=True,
        )

    def _static_token(self) -> str:
        if self.cfg.token_file:
            token = self._credential_file(self.cfg.token_file, "token_file")
        else:
            token = self._environ.get("VAULT_TOKEN") or self._environ.get("BAO_TOKEN") or ""
            REDACTOR.add(token)
        if not token:
            raise ConfigError('vault: auth = "token" needs [vault] token_file, VAULT_TOKEN or BAO_TOKEN')
        return token

    def _login_body(self, via: hvac.Client) -> dict[str, str]:
        cfg = self.cfg
        if cfg.auth == "approle":
            assert cfg.role_id_file is not None  # enforced by config
            body = {"role_id": self._credential_file(cfg.role_id_file, "role_id_file")}
            if secret_id := self._secret_id(via):
                body["secret_id"] = secret_id
            return body
        if cfg.auth in ("jwt", "kubernetes"):
            assert cfg.role is not None and cfg.jwt_file is not None  # enforced by config
            return {"role": cfg.role, "jwt": self._jwt(cfg.jwt_file)}
        return {"name": cfg.role} if cfg.role else {}  # cert: without a name, every trusted role is tried

    def _jwt(self, path: str) -> str:
        jwt = self._credential_file(path, "jwt_file")
        REDACTOR.add(jwt.rpartition(".")[2])  # the signature alone: what makes a copy of the claims usable
        return jwt

    def _secret_id(self, via: hvac.Client) -> str | None:
        """The secret_id: from its file, or unwrapped once from the wrapping token there and kept in memory."""
        if self.cfg.secret_id_file is None:
            return None
        if not self.cfg.secret_id_wrapped:
            return self._credential_file(self.cfg.secret_id_file, "secret_id_file")
        if self._unwrapped is None:
            self._unwrapped = self._unwrap_secret_id(
                via, self._credential_file(self.cfg.secret_id_file, "secret_id_file")
            )
        return self._unwrapped

    def _unwrap_secret_id(self, via: hvac.Client, wrapping_token: str) -> str:
        """Secure introduction: look the wrapping token up, check where it was made, then unwrap it, once."""
        self._check_wrapping_token(via, wrapping_token)
        with _intercepted_if_refused(self.cfg.secret_id_file):
            return self._call(
                "wrapping token unwrap",
                # via has no token yet, so this header is the only one: the wrapping token unwraps itself
                lambda: via.adapter.post("/v1/sys/wrapping/unwrap", headers={"X-Vault-Token": wrapping_token}),
                unwrapped_secret_id,
                is_login=True,
                once=True,  # whatever failed may have reached the server and spent the token: never sent twice
            )

    def check_wrapping_token(self) -> str:
        """For `check`: where secret_id_file's wrapping token was made, checked as a start would; never unwrapped."""
        assert self.cfg.secret_id_file is not None  # enforced by config
        wrapping_token = self._credential_file(self.cfg.secret_id_file, "secret_id_file")
        cert = client_cert.load(self.cfg.client_cert, self.cfg.client_key or "") if self.cfg.client_cert else None
        try:
            return self._check_wrapping_token(self._hvac("", cert), wrapping_token)
        finally:
            self._drop_copy(cert)

    def _check_wrapping_token(self, via: hvac.Client, wrapping_token: str) -> str:
        with _intercepted_if_refused(self.cfg.secret_id_file):
            made_at = self._call(
                "wrapping token lookup",
                lambda: via.adapter.post("/v1/sys/wrapping/lookup", json={"token": wrapping_token}),
                creation_path_answer,
                is_login=True,  # a refusal means the token is not valid: 77
                idempotent=True,
            )
        mount = self.cfg.mount
        if not _is_secret_id_path(made_at, mount):
            raise PermissionRefusedError(
                f"vault secret_id_file {self.cfg.secret_id_file}: the wrapping token was created at {made_at}, not at "
                f"auth/{mount}/role/<name>/secret-id; it may have been intercepted or replaced; it was not unwrapped"
            )
        return made_at

    def renew_retired(self, retired: "RetiredToken", increment: float) -> float:
        """renew-self for a token a re-login replaced, with its own certificate (only renew-self needs no policy)."""
        return self._call(
            "renew-self of the previous token",
            lambda: retired.client.auth.token.renew_self(increment=int(increment)),
            renew_answer,
        )

    def revoke_retired(self, retired: "RetiredToken") -> None:
        """Best effort, as for our own token: it expires by itself anyway. Its certificate copy is let go."""
        try:
            revoke = retired.client.auth.token.revoke_self
            self._call("revoke-self of the previous token", revoke, no_answer, retry=False)
            log.info("previous vault token revoked", addr=self.addr)
        except SecretInitError as e:
            log.warning("previous vault token revoke failed", error=str(e))
        finally:
            self.release(retired)

    def release(self, retired: "RetiredToken") -> None:
        """Let a replaced token go: its certificate copy is closed."""
        self._drop_copy(retired.cert)

    def _drop_copy(self, cert: "CertCopy | None") -> None:
        """Close a certificate copy, and the pooled connections with it: requests pools connections by the
        certificate's path, and the next copy may get the same fd number, so the same path, while a
        connection made with the old certificate stays open in the pool."""
        if cert is None:
            return
        with self._lock:
            cert.close()
            self.session.close()

    @staticmethod
    def _credential_file(path: str, key: str) -> str:
        """A credential file's text, registered for redaction; missing is 66, unreadable 77, empty 66."""
        raw = read_regular_file(path, _MAX_CREDENTIAL_FILE, f"vault {key}", "the limit of a credential file")
        text = raw.decode("utf-8", "replace").strip()
        REDACTOR.add(text)
        if not text:
            raise SourceError(f"vault {key}: {path} is empty")
        return text

    def revoke_own_token(self) -> None:
        """Revoke a token this process created by logging in; a supplied token is not ours to revoke."""
        with self._lock:
            if not self.owns_token:
                return
            try:
                self._call("token revoke-self", self.client.auth.token.revoke_self, no_answer, retry=False)
                self.owns_token = False
                log.info("vault token revoked", addr=self.addr)
            except SecretInitError as e:  # best effort: the token expires by itself anyway
                log.warning("vault token revoke failed", error=str(e))

    # -- reads ----------------------------------------------------------------------

    def read(self, path: str, purpose: str, max_size: int = DEFAULT_MAX_SECRET_SIZE) -> VaultSecret:
        """One path's secret; its answer may be answer_cap(max_size) bytes at most."""
        return self._call(
            f"read of {path} ({purpose})",
            lambda: self.client.read(path),
            lambda doc: parse_response(path, need_object(doc), self._clock()),
            cap=answer_cap(max_size),
        )

    def write(self, path: str, params: Mapping[str, Any], purpose: str, max_size: int) -> VaultSecret:
        """POST `params` to `path`: each call issues something new, a certificate from pki/issue/ROLE say.

        Sent again after a lost answer, as a read of database/creds is: what the lost answer
        issued was never ours to use, and a certificate without a lease cannot be revoked anyway.
        """
        return self._call(
            f"write of {path} ({purpose})",
            lambda: self.client.write_data(path, data=dict(params)),
            lambda doc: parse_response(path, need_object(doc), self._clock(), self._wall()),
            cap=answer_cap(max_size),
        )

    def capabilities(self, paths: list[str]) -> dict[str, list[str]]:
        def check(doc: dict[str, Any] | None) -> dict[str, list[str]]:
            answer = need_object(doc)
            data = answer.get("data") or answer
            if not isinstance(data, dict):
                raise MalformedAnswer("data is not an object")
            return {p: string_list(data.get(p), f"capabilities of {p}") for p in paths}

        return self._call("capabilities-self", lambda: self.client.sys.get_capabilities(paths=paths), check)

    # -- leases and the token ---------------------------------------------------------

    def probe_lease(self, lease_id: str, duration: float) -> tuple[float, float]:
        """Seconds until the lease's max TTL, and its TTL after the probe.

        Vault does not say the max TTL, so this asks once for a renewal it must cap, then
        renews back to the lease's own duration: the lease is long-lived only for that instant.
        """
        probe = self._call(
            "lease max TTL probe", lambda: self.client.sys.renew_lease(lease_id, PROBE_INCREMENT), lease_answer
        )
        return probe, self.renew_lease(lease_id, duration)

    def renew_lease(self, lease_id: str, increment: float) -> float:
        return self._call(
            f"renewal of {lease_id}",
            lambda: self.client.sys.renew_lease(lease_id, max(1, int(increment))),
            lease_answer,
        )

    def revoke_lease(self, lease_id: str) -> None:
        self._call(f"revoke of {lease_id}", lambda: self.client.sys.revoke_lease(lease_id), no_answer)
        log.info("lease revoked", lease_id=lease_id)

    def revoke_lease_quietly(self, lease_id: str) -> bool:
        try:
            self.revoke_lease(lease_id)
        except SecretInitError as e:
            log.warning("lease revoke failed; it expires by itself", lease_id=lease_id, error=str(e))
            return False
        return True

    def token_info(self) -> TokenInfo:
        token = self._call("token lookup-self", lambda: self.client.auth.token.lookup_self(), lookup_answer)
        if token.ttl == 0:
            return TokenInfo(0, False, math.inf)  # a root or periodic-less token that never expires
        if not token.renewable:
            return TokenInfo(token.ttl, False, token.ttl)
        probe = self._call(
            "token max TTL probe", lambda: self.client.auth.token.renew_self(increment=PROBE_INCREMENT), renew_answer
        )
        back = self.renew_token(token.creation_ttl)
        return TokenInfo(back, True, probe)

    def renew_token(self, increment: float) -> float:
        return self._call(
            "token renew-self", lambda: self.client.auth.token.renew_self(increment=int(increment)), renew_answer
        )

    # -- retries and error mapping ------------------------------------------------

    def _call(
        self,
        what: str,
        send: Callable[[], Any],
        check: Callable[[dict[str, Any] | None], T],
        is_login: bool = False,
        cap: int = SMALL_ANSWER,
        idempotent: bool | None = None,
        once: bool = False,
        retry: bool = True,
    ) -> T:
        """Send with retries until startup_timeout; `check` turns the answer into what the caller uses.

        Each try goes to every address in turn, from the active one, while the failure says that
        node cannot serve (see fails_over); only then does it back off. A login's refusal (400 too)
        is a permission error; a login is not sent again after a read timeout (it may have spent a
        single-use secret_id) unless `idempotent` says it can be. `once`: never sent twice, to any
        address, unless the connection was never made. `retry` False: one round of the addresses.
        """
        attempts = 0
        again = not is_login if idempotent is None else idempotent

        def attempt() -> T:
            nonlocal attempts
            if not self._leader_asked:
                self._ask_leader()
            tried: set[int] = set()  # this round's addresses: each is tried once, whatever a hint says
            leader_asked = False
            while True:
                if self.session.active in tried:  # a sys/leader hint named one already tried
                    self.session.advance(skip=tried)
                tried.add(self.session.active)
                attempts += 1
                self.session.cap = cap
                before = self.session.active
                try:
                    answer = check(document(send()))
                except Exception as e:
                    if len(tried) >= len(self.cfg.addrs) or not fails_over(e, again, sent=not once):
                        raise
                    leader_asked |= self._fail_over(what, e, tried, ask_leader=not leader_asked)
                    continue
                if self.session.active != before:
                    log.info("vault active node", addr=self.addr, learned="redirect")
                return answer

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(lambda e: is_transient(e, idempotent=again)),
            stop=lambda _state: once or not retry or self._clock() >= self._deadline,
            wait=self._wait,
            sleep=self._sleep,
            before_sleep=lambda state: log.warning(
                "vault request failed, retrying",
                addr=self._failed_at(state.outcome.exception() if state.outcome else None),
                request=what,
                attempt=state.attempt_number,
                error=_outcome_error(state),
                retry_in=round(state.next_action.sleep, 2) if state.next_action else None,
            ),
            reraise=True,
        )
        try:
            with self._lock:
                return retrying(attempt)
        except SecretInitError:
            raise
        except Exception as e:
            raise self._map_error(e, what, attempts, is_login, again) from None

    def _wait(self, state: tenacity.RetryCallState) -> float:
        backoff = tenacity.wait_random_exponential(multiplier=0.2, max=5)(state)
        return max(0.0, min(backoff, self._deadline - self._clock()))

    def _failed_at(self, exc: BaseException | None) -> str:
        """The address of the request that failed (the node it went to, or where a redirect led), no userinfo."""
        url = _url_of(exc)
        return safe_url(url) if url is not None else self.addr

    def _fail_over(self, what: str, exc: BaseException, tried: set[int], ask_leader: bool) -> bool:
        """Move to the next untried address at once; when the failed node answered (alive but not serving:
        a standby, sealed, mid-election) and `ask_leader`, ask the next who leads. True when it asked."""
        url = _url_of(exc)
        if url is not None and self.session.prefer(url):  # a redirect's target failed: move on from it
            tried.add(self.session.active)
        failed = self._failed_at(exc)
        self.session.advance(skip=tried)
        self._metrics.failover()
        log.warning("vault failover", failed=failed, next=self.addr, request=what, error=describe(exc))
        if ask_leader and isinstance(exc, hvac_errors.VaultError):
            self._ask_leader()
            return True
        return False

    def _ask_leader(self) -> None:
        """Prefer the active node when sys/leader (unauthenticated) names a configured address.

        Its answer is only a hint: an address that is not configured is ignored, and a failure
        leaves the active address as it is.
        """
        self._leader_asked = True
        self._budget_cap = _LEADER_BUDGET
        before = self.session.active
        try:
            self.session.cap = _LEADER_ANSWER
            doc = document(self.client.sys.read_leader_status())
        except Exception as e:
            log.debug("vault sys/leader not answered", addr=self._failed_at(e), error=describe(e))
            doc = None
        finally:
            self._budget_cap = math.inf
        if self.session.active != before:  # sys/leader itself was redirected to another configured address
            log.info("vault active node", addr=self.addr, learned="redirect")
            before = self.session.active
        leader = doc.get("leader_address") if doc is not None else None
        if isinstance(leader, str) and self.session.prefer(leader) and self.session.active != before:
            log.info("vault active node", addr=self.addr, learned="sys/leader")

    def _map_error(self, exc: Exception, what: str, attempts: int, is_login: bool, again: bool) -> SecretInitError:
        reason = describe(exc)
        addr = self._failed_at(exc)
        if isinstance(exc, RedirectRefused):
            return VaultUnavailableError(
                f"vault at {addr}: {what}: {reason}; redirects are followed only to the configured addresses"
            )
        if isinstance(exc, AnswerTooLarge | MalformedAnswer):
            return DataError(f"vault at {addr}: {what}: malformed answer: {reason}")
        if is_transient(exc, idempotent=again):
            return VaultUnavailableError(
                f"vault at {addr} unavailable: {what} failed {attempts} time(s); last error: {reason}"
            )
        if isinstance(exc, hvac_errors.Forbidden | hvac_errors.Unauthorized):
            return PermissionRefusedError(f"vault at {addr}: {what} denied: {reason}")
        if isinstance(exc, hvac_errors.InvalidRequest):
            cls = PermissionRefusedError if is_login else RequestRejected
            return cls(f"vault at {addr}: {what} rejected: {reason}")
        if isinstance(exc, hvac_errors.InvalidPath):
            if is_login:
                return ConfigError(f"vault at {addr}: {what}: no such auth method ({reason}); check auth_mount")
            return SourceError(f"vault at {addr}: {what}: no secret at this path ({reason})")
        if isinstance(exc, requests.exceptions.RequestException | hvac_errors.VaultError):
            return VaultUnavailableError(f"vault at {addr}: {what} failed: {reason}")
        return SecretInitError(f"vault at {addr}: {what} failed: {type(exc).__name__}")


@contextmanager
def _intercepted_if_refused(secret_id_file: str | None) -> Iterator[None]:
    """Vault refuses a wrapping token that is unknown, used or expired: say what that may mean."""
    try:
        yield
    except PermissionRefusedError as e:
        raise PermissionRefusedError(
            f"vault secret_id_file {secret_id_file}: the wrapping token is unknown, already used or expired; it may "
            f"have been intercepted: find out who unwrapped it before issuing another ({e})"
        ) from None


def _url_of(exc: BaseException | None) -> str | None:
    """The URL a failed request went to: requests' exceptions carry the request, hvac's the URL."""
    request = getattr(exc, "request", None)
    url = getattr(request, "url", None) or getattr(exc, "url", None)
    return url if isinstance(url, str) else None


def without_userinfo(url: str) -> str:
    """The URL less any user:password@ (config refuses it; this is so that no log line can carry one)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _session(cfg: VaultConfig, environ: Mapping[str, str], budget: Callable[[], float]) -> VaultSession:
    """A session that reads the environment once, not on every request.

    With trust_env, requests scans the proxy variables and opens ~/.netrc for each request:
    about a quarter of a renewal's CPU (0.6 of 2.3 ms, measured). The environment does not change while we run, so the
    proxies and the CA bundle it names are resolved here, once, as requests would
    (the proxies from os.environ: requests reads nothing else).
    """
    proxies = {addr: requests.utils.get_environ_proxies(addr) for addr in cfg.addrs}
    session = VaultSession(cfg.addrs, budget, proxies)
    session.trust_env = False
    session.verify = cfg.ca_cert or environ.get("REQUESTS_CA_BUNDLE") or environ.get("CURL_CA_BUNDLE") or True
    return session


_OPERATIONS = {
    "sys/leases/renew": "renew_lease",
    "sys/renew": "renew_lease",
    "sys/leases/revoke": "revoke_lease",
    "sys/revoke": "revoke_lease",
    "sys/leases/lookup": "lookup_lease",
    "auth/token/lookup-self": "lookup_token",
    "auth/token/renew-self": "renew_token",
    "auth/token/revoke-self": "revoke_token",
    "sys/wrapping/unwrap": "unwrap",
    "sys/wrapping/lookup": "lookup_wrapping",
    "sys/capabilities-self": "capabilities",
    "sys/leader": "leader",
}


def operation(method: str, url: str) -> str:
    """A request's kind for the duration histogram: a fixed name, never a path or an id."""
    path = urlsplit(url).path.removeprefix("/v1/").rstrip("/")
    if path.startswith("auth/") and path.endswith("/login"):
        return "login"
    for prefix, name in _OPERATIONS.items():
        if path == prefix or path.startswith(prefix + "/"):
            return name
    return {"GET": "read", "POST": "write", "PUT": "write"}.get(method.upper(), "other")


def _outcome_error(state: tenacity.RetryCallState) -> str:
    exc = state.outcome.exception() if state.outcome else None
    return describe(exc) if exc is not None else ""


# -- judging answers: every shape a hostile server can send gets a MalformedAnswer, never a crash --


def document(response: requests.Response) -> dict[str, Any] | None:
    """The JSON object of a 200, None for a 204; an error status raises hvac's exception for it."""
    status = response.status_code
    if status >= 400:
        raise _status_error(response)
    if status == 204:
        return None
    if status != 200:
        raise MalformedAnswer(f"HTTP {status} where 200 or 204 was expected")
    doc = _json(response.content)
    if not isinstance(doc, dict):
        raise MalformedAnswer(f"a JSON {_kind(doc)} where an object was expected")
    return doc


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise MalformedAnswer("the body is not JSON") from None


def _kind(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _status_error(response: requests.Response) -> hvac_errors.VaultError:
    """hvac's exception for an error status, with Vault's `errors` when the body has a list of them."""
    try:
        doc = json.loads(response.content)
    except (ValueError, RecursionError):
        doc = None
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if isinstance(errors, list):
        text = None
        errors = [e if isinstance(e, str) else json.dumps(e)[:_MAX_REASON] for e in errors[:10]]
    else:  # the body is not quoted: whatever answered may have put anything there, a secret included
        text, errors = f"no Vault errors in a {len(response.content)}-byte {_media_type(response)} body", None
    error = hvac_errors.VaultError.from_status(
        response.status_code, text, errors=errors, method=response.request.method, url=response.url
    )
    error.http_status = response.status_code  # hvac keeps no status; failover reads it
    return error


def _media_type(response: requests.Response) -> str:
    match = re.match(r"[\w.+-]+/[\w.+-]+", response.headers.get("Content-Type", ""))
    return match.group(0) if match else "untyped"


def need_object(doc: dict[str, Any] | None) -> dict[str, Any]:
    if doc is None:
        raise MalformedAnswer("HTTP 204 with no body where an answer was expected")
    return doc


def no_answer(doc: dict[str, Any] | None) -> None:
    """A revoke: 204 (or a 200 with any object) is success."""


def field(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key)
    if not isinstance(value, dict):
        raise MalformedAnswer(f"{key} is a {_kind(value)}, not an object")
    return value


def duration(value: Any, name: str) -> float:
    """Seconds: a number from 0 to MAX_DURATION (not a boolean, NaN or infinity)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_DURATION:
        shown = _kind(value) if not isinstance(value, int | float) or isinstance(value, bool) else "out-of-range number"
        raise MalformedAnswer(f"{name} is a {shown}, not a number of seconds from 0 to {MAX_DURATION}")
    return float(value)


def flag(value: Any, name: str) -> bool:
    """A boolean; absent means false."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise MalformedAnswer(f"{name} is a {_kind(value)}, not a boolean")
    return value


def string_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MalformedAnswer(f"{name} is not a list of strings")
    return list(value)


class LoginAnswer(NamedTuple):
    token: str
    ttl: float
    renewable: bool


def login_answer(doc: dict[str, Any] | None) -> LoginAnswer:
    auth = field(need_object(doc), "auth")
    token = auth.get("client_token")
    if not isinstance(token, str) or not token:
        raise MalformedAnswer(f"auth.client_token is a {_kind(token)}, not a token")
    REDACTOR.add(token)  # before anything below could quote it
    return LoginAnswer(
        token, duration(auth.get("lease_duration"), "auth.lease_duration"), flag(auth.get("renewable"), "renewable")
    )


def creation_path_answer(doc: dict[str, Any] | None) -> str:
    """sys/wrapping/lookup: where the wrapping token was made, printable for the log."""
    path = field(need_object(doc), "data").get("creation_path")
    if not isinstance(path, str) or not path:
        raise MalformedAnswer(f"data.creation_path is a {_kind(path)}, not a path")
    return _loggable(path)


def _is_secret_id_path(path: str, mount: str) -> bool:
    """auth/<mount>/role/<name>/secret-id: a wrapped answer of AppRole's secret-id endpoint, under our mount."""
    return re.fullmatch(rf"auth/{re.escape(mount)}/role/[^/]+/secret-id", path) is not None


def unwrapped_secret_id(doc: dict[str, Any] | None) -> str:
    secret_id = field(need_object(doc), "data").get("secret_id")
    if not isinstance(secret_id, str) or not secret_id:
        raise MalformedAnswer(f"data.secret_id is a {_kind(secret_id)}, not a secret_id")
    REDACTOR.add(secret_id)
    return secret_id


def lease_answer(doc: dict[str, Any] | None) -> float:
    return duration(need_object(doc).get("lease_duration"), "lease_duration")


def renew_answer(doc: dict[str, Any] | None) -> float:
    return duration(field(need_object(doc), "auth").get("lease_duration"), "auth.lease_duration")


class LookupAnswer(NamedTuple):
    ttl: float
    renewable: bool
    creation_ttl: float


def lookup_answer(doc: dict[str, Any] | None) -> LookupAnswer:
    data = field(need_object(doc), "data")
    ttl = duration(data.get("ttl", 0), "data.ttl")
    creation_ttl = data.get("creation_ttl") or ttl
    return LookupAnswer(ttl, flag(data.get("renewable"), "data.renewable"), duration(creation_ttl, "data.creation_ttl"))


def parse_response(path: str, response: Mapping[str, Any], now: float, wall: float | None = None) -> VaultSecret:
    """`now`, on the client's clock, is when Vault answered: a lease's TTL runs from then.

    `wall` is given for a write's answer: one with a certificate and its `expiration` (a PKI
    issue) is tracked like a lease that ends at that NotAfter, with or without a Vault lease.
    """
    data = response.get("data")
    if not isinstance(data, dict):
        raise MalformedAnswer("the response has no data object")
    data = _unwrap_kv2(data)
    issued = wall is not None and isinstance(data.get("certificate"), str) and "expiration" in data
    _register_strings(data, public=CERTIFICATE_PUBLIC if issued else frozenset())
    lease_id = _lease_id(response.get("lease_id") or "")
    lease = None
    if lease_id:
        lease = Lease(
            lease_id, duration(response.get("lease_duration"), "lease_duration"),
            flag(response.get("renewable"), "renewable"), now,
        )  # fmt: skip
    if issued:
        assert wall is not None
        lease = certificate_lease(data, lease, now, wall)
    warnings = string_list(response.get("warnings"), "warnings")[:MAX_WARNINGS]
    return VaultSecret(path, data, lease, tuple(_loggable(w) for w in warnings))


def certificate_lease(data: Mapping[str, Any], lease: Lease | None, now: float, wall: float) -> Lease:
    """An issued certificate ends at its `expiration`, and so does its Vault lease if it has one.

    Either way it cannot be renewed: a new certificate is issued instead. Without a lease the
    tracking id is the serial, and nothing is revoked.
    """
    serial = data.get("serial_number")
    if not isinstance(serial, str) or not re.fullmatch(r"[0-9a-fA-F:]{1,128}", serial):
        raise MalformedAnswer("serial_number is not a hexadecimal serial")
    for name in ("issuing_ca", "private_key_type"):
        if not isinstance(data.get(name, ""), str):
            raise MalformedAnswer(f"{name} is a {_kind(data[name])}, not a string")
    string_list(data.get("ca_chain"), "ca_chain")
    expiration = data["expiration"]
    if isinstance(expiration, bool) or not isinstance(expiration, int | float):
        raise MalformedAnswer(f"expiration is a {_kind(expiration)}, not a time in seconds")
    if not 0 < expiration <= MAX_TIMESTAMP:  # compared as given: a 400-digit int never becomes a float
        raise MalformedAnswer("expiration is not a time from 1970 to 9999 in seconds")
    left = expiration - wall
    if left <= 0:
        raise MalformedAnswer("the certificate's expiration has passed already: is this host's clock right?")
    life = min(left, MAX_DURATION)
    if lease is None:
        return Lease(f"certificate {serial}", life, False, now, revocable=False, serial=serial)
    return lease._replace(duration=min(life, lease.duration), renewable=False, serial=serial)


def _lease_id(value: Any) -> str:
    """A lease id is logged, kept in status.json and sent back: short printable ASCII, as Vault's are."""
    if not isinstance(value, str):
        raise MalformedAnswer(f"lease_id is a {_kind(value)}, not a string")
    if len(value) > MAX_LEASE_ID:
        raise MalformedAnswer(f"lease_id is over {MAX_LEASE_ID} characters")
    if not re.fullmatch(r"[\x20-\x7e]*", value):
        raise MalformedAnswer("lease_id has characters outside printable ASCII")
    return value


def _loggable(warning: str) -> str:
    """A warning as a log line may carry it: cut short, control and format characters made '?'."""
    return "".join(c if c.isprintable() else "?" for c in warning[:MAX_WARNING_CHARS])


def _unwrap_kv2(data: dict[str, Any]) -> dict[str, Any]:
    """A KV v2 read answers {"data": {...fields}, "metadata": {"version": N, ...}}."""
    inner, meta = data.get("data"), data.get("metadata")
    if set(data) == {"data", "metadata"} and isinstance(meta, dict) and "version" in meta:
        return inner if isinstance(inner, dict) else {}
    return data


def _register_strings(data: dict[str, Any], public: frozenset[str]) -> None:
    """Every string in the answer but its `public` fields, for redaction; iterative, and refusing
    nesting no secret needs (in every field, public ones included)."""
    pending = [(value, 1, key not in public) for key, value in data.items()]
    while pending:
        item, depth, secret = pending.pop()
        if depth > MAX_NESTING:
            raise MalformedAnswer(f"the data is nested deeper than {MAX_NESTING} levels")
        if isinstance(item, str) and secret:
            REDACTOR.add(item)
        elif isinstance(item, dict):
            pending.extend((v, depth + 1, secret) for v in item.values())
        elif isinstance(item, list):
            pending.extend((v, depth + 1, secret) for v in item)
