"""The Prometheus exporter: the one owner of the registry and of the scrape listener.

Made only when `[metrics] listen` is set (secret_init.metrics.open_recorder). Its thread
serves prometheus-client's own exposition and never takes a lock the loop holds for long:
counters and the histogram have their own tiny locks, and the lease gauges are read from an
immutable snapshot that the loop replaces whole. One connection is served at a time and cut
CLIENT_TIMEOUT after it connected: a client that connects and sends nothing delays other
scrapes, never a renewal or rotation. Labels are paths and operation names only, never a secret, token or
lease id.
"""

import contextlib
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import prometheus_client as prom
from prometheus_client.core import GaugeMetricFamily

from secret_init.config import Listen
from secret_init.metrics import LeaseTimes, Recorder, bind_error

# A scrape's connection is cut this long after it connected, however its client sends.
CLIENT_TIMEOUT = 5.0


class Metrics(Recorder):
    """The metrics of one process, served on `listen` from the moment it is made."""

    def __init__(self, listen: Listen) -> None:
        prom.disable_created_metrics()  # type: ignore[no-untyped-call] # no *_created series: nothing alerts on them
        self.registry = prom.CollectorRegistry()
        self._renewals = prom.Counter(
            "secret_init_renewals", "Lease and token renewals, by result.", ["result"], registry=self.registry
        )
        self._rotations = prom.Counter(
            "secret_init_rotations",
            "Rotations (issue, write, on_rotate), by result.",
            ["result"],
            registry=self.registry,
        )
        for counter in (self._renewals, self._rotations):
            for result in ("ok", "error"):
                counter.labels(result)  # both series exist from the start, so rate() and increase() see the first one
        self._restarts = prom.Counter(
            "secret_init_app_restarts", "Restarts of the app for new credentials.", registry=self.registry
        )
        self._failovers = prom.Counter(
            "secret_init_vault_failovers",
            "Requests moved on to the next Vault address: the one tried could not serve them.",
            registry=self.registry,
        )
        self._requests = prom.Histogram(
            "secret_init_vault_request_duration_seconds",
            "Vault HTTP requests, answered or failed, by operation.",
            ["operation"],
            registry=self.registry,
        )
        prom.ProcessCollector(registry=self.registry)
        self._snapshot: tuple[Mapping[str, LeaseTimes], float | None] = ({}, None)
        self.registry.register(_LeaseGauges(self))
        self._server = _bind(listen, prom.make_wsgi_app(self.registry))
        self._thread = threading.Thread(target=self._server.serve_forever, name="secret-init-metrics", daemon=True)
        self._thread.start()

    def vault_request(self, operation: str, seconds: float) -> None:
        self._requests.labels(operation).observe(seconds)

    def renewal(self, ok: bool) -> None:
        self._renewals.labels("ok" if ok else "error").inc()

    def rotation(self, ok: bool) -> None:
        self._rotations.labels("ok" if ok else "error").inc()

    def app_restart(self) -> None:
        self._restarts.inc()

    def failover(self) -> None:
        self._failovers.inc()

    def publish(self, leases: Mapping[str, LeaseTimes], token_expiry: float | None) -> None:
        self._snapshot = (dict(leases), token_expiry)  # replaced whole: the scrape thread reads it unlocked

    def snapshot(self) -> tuple[Mapping[str, LeaseTimes], float | None]:
        return self._snapshot

    def close(self) -> None:
        """Stop serving: the scrape in progress, if any, is cut rather than waited for."""
        serving = self._server.serving
        if serving is not None:
            serving.cut()
        self._server.shutdown()
        self._server.server_close()


# Each LeaseTimes field, as the gauge that shows it.
_LEASE_GAUGES = (
    ("issued", "secret_init_lease_issued_timestamp_seconds", "When each lease or certificate was issued."),
    (
        "renewed",
        "secret_init_lease_renewed_timestamp_seconds",
        "When each lease was last renewed (or issued): what gave it its current expiry.",
    ),
    ("expiry", "secret_init_lease_expiry_timestamp_seconds", "When each lease or certificate expires unless renewed."),
    (
        "deadline",
        "secret_init_lease_deadline_timestamp_seconds",
        "The latest each lease or certificate can live (its max TTL, or NotAfter).",
    ),
    ("rotation_due", "secret_init_rotation_due_timestamp_seconds", "When each lease or certificate is due to rotate."),
)


class _LeaseGauges:
    """The timestamp gauges, built at each scrape from the last published snapshot."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        leases, token_expiry = self.metrics.snapshot()
        families = {field: GaugeMetricFamily(name, text, labels=["path"]) for field, name, text in _LEASE_GAUGES}
        for path, times in sorted(leases.items()):
            for name, family in families.items():
                value = getattr(times, name)
                if value is not None:
                    family.add_metric([path], value)
        yield from families.values()
        token = GaugeMetricFamily("secret_init_token_expiry_timestamp_seconds", "When the Vault token expires.")
        if token_expiry is not None:
            token.add_metric([], token_expiry)
        yield token


class _Handler(WSGIRequestHandler):
    """One scrape, cut off CLIENT_TIMEOUT after it connected however it drips: the per-read
    timeout alone would let a byte every few seconds hold the one serving thread, and with
    it the shutdown at exit."""

    timeout = CLIENT_TIMEOUT

    def handle(self) -> None:
        cutoff = threading.Timer(CLIENT_TIMEOUT, self.cut)
        cutoff.start()
        assert isinstance(self.server, _Server)
        self.server.serving = self
        try:
            super().handle()
        finally:
            self.server.serving = None
            cutoff.cancel()

    def get_stderr(self) -> Any:
        """Where wsgiref writes the traceback of an app error (prometheus-client raises on an odd Accept
        header, say): nowhere. Any client may cause one; its 500 says enough, our log stays JSON."""
        return _Discard()

    def cut(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)  # the blocked read or write returns at once

    def log_message(self, format: str, *args: Any) -> None:
        """No access log: secret-init's stderr is for its own events."""


class _Discard:
    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


class _Server(WSGIServer):
    serving: _Handler | None = None  # the connection being served, for close() to cut

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look the address up in DNS (getfqdn): not needed, and it may hang.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])
        self.setup_environ()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out or hung up: its problem, not a traceback on our stderr."""


class _Server6(_Server):
    address_family = socket.AF_INET6


def _bind(listen: Listen, app: Callable[..., Any]) -> _Server:
    cls = _Server6 if ":" in listen.host else _Server
    try:
        server = cls((listen.host, listen.port), _Handler)
    except OSError as e:
        raise bind_error(listen, e) from None
    server.set_app(app)
    return server
