"""What is measured: the `Recorder` that the renewer, the loop and the Vault transport report to.

Without `[metrics]` it is `NO_METRICS`, which records nothing, so prometheus-client is never
imported. With it, `open_recorder` makes the exporter (secret_init/exporter.py), which binds
the listen address before anything is read from Vault and serves from its own thread.
"""

import errno
from collections.abc import Mapping
from typing import NamedTuple

import structlog

from secret_init.config import Config, Listen
from secret_init.errors import ConfigError, ExitCode, SecretInitError


class LeaseTimes(NamedTuple):
    """One tracked lease or certificate, in Unix seconds, as the gauges show it."""

    issued: float
    renewed: float  # its last renewal, or its issue: what gave it its current expiry
    expiry: float
    deadline: float | None  # None while its max TTL is not known (it is provisional until then)
    rotation_due: float | None  # None while its max TTL is not known


class Recorder:
    """What the renewer, the loop and the Vault client report. This one records nothing."""

    def vault_request(self, operation: str, seconds: float) -> None:
        """One HTTP request to Vault, answered or not, by operation (never by path)."""

    def failover(self) -> None:
        """A request moved on from a Vault address that could not serve it to the next one."""

    def renewal(self, ok: bool) -> None:
        """A lease or token renewal (a max-TTL probe counts as one)."""

    def rotation(self, ok: bool) -> None:
        """A rotation: new credentials issued and written, or a failure to."""

    def app_restart(self) -> None:
        """The app was restarted for new credentials."""

    def publish(self, leases: Mapping[str, LeaseTimes], token_expiry: float | None) -> None:
        """The leases now tracked, by path, and the token's expiry (None: unknown or never)."""

    def close(self) -> None:
        """Stop serving and free the port."""


NO_METRICS = Recorder()


def open_recorder(cfg: Config) -> Recorder:
    """The exporter when [metrics] listen is set, bound and serving; else NO_METRICS."""
    if cfg.metrics.listen is None:
        return NO_METRICS
    from secret_init.exporter import Metrics

    metrics = Metrics(cfg.metrics.listen)
    structlog.get_logger().info("metrics served", listen=str(cfg.metrics.listen))
    return metrics


def bind_error(listen: Listen, error: OSError) -> SecretInitError:
    """The start-up error for a listen address that cannot be bound (the exporter and `check` alike)."""
    where = f"[metrics] listen {listen}"
    if error.errno == errno.EADDRINUSE:
        return SecretInitError(f"{where}: address already in use", ExitCode.CANT_CREATE)
    if error.errno == errno.EACCES:
        return SecretInitError(f"{where}: {error.strerror} (a port under 1024 needs root)", ExitCode.NO_PERMISSION)
    return ConfigError(f"{where}: {error.strerror}")  # not an address of this host, no IPv6, ...
