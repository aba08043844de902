"""The HTTP transport under hvac: a requests session that does not trust the server.

- Several addresses (an HA cluster's nodes): hvac builds every URL on the first one, and the
  session aims each request at the active one instead. Moving on is the client's decision
  (vault.py), made per request; the session only holds which address is active.
- Redirects are followed only to a configured address's scheme, host and port (a Vault
  standby sends clients to the active node that way); any other target is refused before
  anything is sent to it: requests would carry X-Vault-Token and a 307's login body along.
  A redirect that ends at another configured address makes that one the active address.
- Every request, redirects included, ends within its budget: a timer shuts down the socket
  in use when the budget runs out, because the read timeout bounds each recv, not the
  request, and a server sending a byte a second would hold the start (and the client lock).
  Before a socket exists, the budget is the connect timeout (per address); a DNS lookup is
  not bounded by it.
- An answer is read up to a byte cap before anything parses it; a Content-Length over the
  cap is refused without reading.

Only public extension points are used: Session.request, the response hook (requests runs it
before following a redirect), HTTPAdapter.send/init_poolmanager/proxy_manager_for, a
PoolManager's pool_classes_by_scheme and a pool's ConnectionCls.
"""

import contextlib
import io
import re
import socket
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests
import requests.adapters
import urllib3
import urllib3.connection
import urllib3.exceptions

_DEFAULT_PORTS = {"http": 80, "https": 443}
_CHUNK = 64 * 1024
MAX_REDIRECTS = 5


class RedirectRefused(Exception):
    """A redirect to another scheme, host or port than the configured addresses."""

    def __init__(self, target: str) -> None:
        super().__init__(f"refused a redirect to {target}")
        self.target = target


class AnswerTooLarge(Exception):
    def __init__(self, cap: int) -> None:
        super().__init__(f"the answer is over {cap} bytes")
        self.cap = cap


def origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of a URL, the default port filled in; None when it has no usable one."""
    try:
        parts = urlsplit(url)
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:  # a port that is not a number, or out of range
        return None
    if not host or scheme not in _DEFAULT_PORTS:
        return None
    return scheme, host, port or _DEFAULT_PORTS[scheme]


def never_connected(exc: BaseException) -> bool:
    """Refused, unreachable or timed out while connecting: the request never left this host."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    if not isinstance(exc, requests.exceptions.ConnectionError):
        return False
    reason = exc.args[0] if exc.args else None
    reason = getattr(reason, "reason", reason)  # urllib3's MaxRetryError wraps the cause
    return isinstance(reason, urllib3.exceptions.NewConnectionError | urllib3.exceptions.ConnectTimeoutError)


def safe_url(url: str) -> str:
    """scheme://host:port of a URL, never its userinfo, path or query (a hostile Location may carry any)."""
    where = origin(url)
    if where is None:
        return "an address that is not http(s)://host[:port]"
    scheme, host, port = where
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


class _Watch(threading.local):
    deadline: "Deadline | None" = None


_WATCH = _Watch()  # the deadline of the request this thread is making, if any


class Deadline:
    """Shuts down the sockets of the connections a request uses once `seconds` have passed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.passed = False
        self._connections: list[urllib3.connection.HTTPConnection] = []
        self._lock = threading.Lock()
        self._armed = True
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> "Deadline":
        _WATCH.deadline = self
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        _WATCH.deadline = None
        with self._lock:
            self._armed = False
            self._connections.clear()
        self._timer.cancel()

    def watch(self, connection: urllib3.connection.HTTPConnection) -> None:
        with self._lock:
            if self._armed:
                self._connections.append(connection)
                return
        _shut(connection)  # made after the deadline passed

    def _expire(self) -> None:
        with self._lock:
            if not self._armed:
                return
            self.passed, self._armed = True, False
            connections = list(self._connections)
        for connection in connections:
            _shut(connection)


def _shut(connection: urllib3.connection.HTTPConnection) -> None:
    """shutdown() wakes a recv blocked in another thread at once; close() would not."""
    sock = connection.sock
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed
            sock.shutdown(socket.SHUT_RDWR)


def _watched(connection: urllib3.connection.HTTPConnection) -> None:
    deadline = _WATCH.deadline
    if deadline is not None:
        deadline.watch(connection)


class _HTTPConnection(urllib3.connection.HTTPConnection):
    def connect(self) -> None:
        _watched(self)
        super().connect()

    def request(self, *args: Any, **kwargs: Any) -> None:
        _watched(self)  # a pooled connection is reused without connect()
        super().request(*args, **kwargs)


class _HTTPSConnection(urllib3.connection.HTTPSConnection):
    def connect(self) -> None:
        _watched(self)
        super().connect()

    def request(self, *args: Any, **kwargs: Any) -> None:
        _watched(self)
        super().request(*args, **kwargs)


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def _watch_pools(manager: urllib3.PoolManager) -> None:
    manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


class _CappedAdapter(requests.adapters.HTTPAdapter):
    """Reads each answer itself, up to `cap` bytes, with connections the deadline can find."""

    def __init__(self) -> None:
        self.cap = 1024 * 1024
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        _watch_pools(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if isinstance(manager, urllib3.PoolManager):
            _watch_pools(manager)
        return manager

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs["stream"] = True
        response = super().send(request, *args, **kwargs)
        try:
            body = _read_capped(response, self.cap)
        except BaseException:
            response.close()  # drops the connection: the rest of the answer is unread
            raise
        response.raw = io.BytesIO(body)  # what requests and hvac read from now on
        return response


def _declared_over(declared: str, cap: int) -> bool:
    """A Content-Length of ASCII digits over the cap; anything else urllib3 drops and the body is read, capped."""
    digits = declared.strip().lstrip("0")
    if not re.fullmatch(r"[0-9]*", digits):  # not isdigit(): '²' passes it and int() refuses it
        return False
    return len(digits) > len(str(cap)) or int(digits or "0") > cap  # int() refuses over 4300 digits


def _read_capped(response: requests.Response, cap: int) -> bytes:
    if _declared_over(response.headers.get("Content-Length", ""), cap):
        raise AnswerTooLarge(cap)
    raw = response.raw
    chunks, total = [], 0
    try:
        for chunk in raw.stream(_CHUNK, decode_content=True):
            total += len(chunk)
            if total > cap:
                raise AnswerTooLarge(cap)
            chunks.append(chunk)
    except urllib3.exceptions.ReadTimeoutError as e:
        raise requests.exceptions.ReadTimeout(str(e)) from None
    except urllib3.exceptions.DecodeError as e:
        raise requests.exceptions.ContentDecodingError(str(e)) from None
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise requests.exceptions.ChunkedEncodingError(str(e)) from None
    raw.release_conn()
    return b"".join(chunks)


class VaultSession(requests.Session):
    """The session hvac sends through: see the module docstring.

    `budget()` says how many seconds the next request may take in total; `cap` is the most
    bytes its answer may have (set per request by the caller, who holds the client's lock).
    """

    def __init__(
        self,
        addrs: Sequence[str],
        budget: Callable[[], float],
        proxies: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        super().__init__()
        homes = [origin(addr) for addr in addrs]
        if not homes or None in homes:
            raise ValueError("each Vault address must be http(s)://host[:port]")
        self.addrs = tuple(addr.rstrip("/") for addr in addrs)
        self.homes = tuple(home for home in homes if home is not None)
        self.active = 0  # the index of the address requests go to
        self.proxies_of = dict(proxies or {})  # per address: NO_PROXY may spare some nodes and not others
        self.budget = budget
        # Told of every request, answered or not: (method, url, seconds). Set by the client for metrics.
        self.observe: Callable[[str, str, float], None] | None = None
        self.max_redirects = MAX_REDIRECTS
        self.headers["Accept-Encoding"] = "identity"  # what is counted is what is parsed
        self.hooks["response"].append(self._refuse_foreign_redirect)
        self.adapter = _CappedAdapter()
        self.mount("https://", self.adapter)
        self.mount("http://", self.adapter)

    @property
    def current(self) -> str:
        """The active address, as configured (scheme://host[:port])."""
        return self.addrs[self.active]

    def advance(self, skip: Collection[int] = ()) -> str:
        """Make the next address not in `skip` active (after the last, the first again); that address.
        When every address is in `skip`, simply the next one."""
        for step in range(1, len(self.addrs) + 1):
            candidate = (self.active + step) % len(self.addrs)
            if candidate not in skip or step == len(self.addrs):
                self.active = candidate
                break
        return self.current

    def prefer(self, url: str) -> bool:
        """Make the configured address `url` is on the active one; False when it is none of them."""
        where = origin(url)
        if where not in self.homes:
            return False
        self.active = self.homes.index(where)
        return True

    def aimed(self, url: str) -> str:
        """`url` on a configured address, moved to the active one; any other URL as it is."""
        where = origin(url)
        if where is None or where not in self.homes or where == self.homes[self.active]:
            return url
        base = urlsplit(self.current)
        return urlunsplit(urlsplit(url)._replace(scheme=base.scheme, netloc=base.netloc))

    @property
    def cap(self) -> int:
        return self.adapter.cap

    @cap.setter
    def cap(self, value: int) -> None:
        self.adapter.cap = value

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        started = time.monotonic()
        url = self.aimed(url.decode() if isinstance(url, bytes) else url)
        try:
            response = self._request(method, url, *args, **kwargs)
        finally:
            if self.observe is not None:
                self.observe(str(method), url, time.monotonic() - started)
        if response.history:  # redirected, to a configured address (any other was refused): it is the active one
            self.prefer(response.url)
        return response

    def _request(self, method: str | bytes, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        seconds = max(self.budget(), 0.001)
        kwargs["timeout"] = seconds  # each connect and recv, below the whole-request deadline
        if not kwargs.get("proxies"):  # hvac passes None: the environment's, resolved once per address
            kwargs["proxies"] = dict(self.proxies_of.get(self.current, {}))
        with Deadline(seconds) as deadline:
            try:
                response = super().request(method, url, *args, **kwargs)
            except (requests.exceptions.RequestException, OSError) as e:
                if not deadline.passed:
                    raise
                request = getattr(e, "request", None)  # names the node that really failed (a redirect's target)
                if never_connected(e):  # nothing was sent: safe to send anywhere else
                    raise requests.exceptions.ConnectTimeout(
                        f"no connection within {seconds:g} s", request=request
                    ) from None
                raise requests.exceptions.ReadTimeout(
                    f"no whole answer within {seconds:g} s", request=request
                ) from None
        if deadline.passed:  # cut short, the answer may still parse: headers end at EOF, for one
            raise requests.exceptions.ReadTimeout(f"no whole answer within {seconds:g} s", request=response.request)
        return response

    def _refuse_foreign_redirect(self, response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        """Runs before requests follows a redirect: anywhere but a configured address is refused before it is sent."""
        try:
            target = self.get_redirect_target(response)
            url = None if target is None else urljoin(response.url, target)
        except ValueError:  # a Location that is not UTF-8, or an unclosed [IPv6 bracket
            response.close()
            raise RedirectRefused(safe_url("")) from None
        if url is not None and origin(url) not in self.homes:
            response.close()
            raise RedirectRefused(safe_url(url))
        return response
