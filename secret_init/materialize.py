"""Materializing: who the app is, then read every source, then write every file.

Shared by the one-shot flow (app.py), the resident loop (loop.py) and `check`.
"""

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple

import structlog

from secret_init import interrupt, privileges
from secret_init.config import Config, SecretSpec
from secret_init.errors import PermissionRefusedError
from secret_init.metrics import NO_METRICS, Recorder
from secret_init.model import Material
from secret_init.privileges import AppUser
from secret_init.sink import OutputFile, Owner, Sink, WriteResult
from secret_init.sources import read_all
from secret_init.sources.files import FileSource
from secret_init.sources.vault import VaultSource

if TYPE_CHECKING:
    from secret_init.vault import VaultClient

log = structlog.get_logger()


class Materialized(NamedTuple):
    """What materialize() made."""

    user: AppUser
    materials: list[Material]
    written: list[WriteResult]
    sink: Sink
    owners: dict[str, Owner]
    client: "VaultClient | None"  # kept only when the caller asked for it
    owner_lock: int  # held open for as long as this process owns the dir

    @property
    def leased(self) -> bool:
        return any(m.lease for m in self.materials)


def materialize(
    cfg: Config, environ: Mapping[str, str], for_app: bool, keep_client: bool = False, metrics: Recorder = NO_METRICS
) -> Materialized:
    """Read every secret, then write them all; nothing is written if any read fails."""
    user = app_user(cfg, for_app)
    owners = {s.name: file_owner(s, user) for s in cfg.secrets}
    sink = Sink(cfg.output.dir, user.gid, cfg.output.allow_non_tmpfs)
    sink.check_filesystem()
    sink.prepare()
    owner_lock = sink.claim()  # before any lease exists: one output dir, one lease owner
    files = FileSource(cfg.swarm_dir, cfg.output.max_secret_size)
    vault = VaultSource(lambda: vault_login(cfg, environ, metrics), cfg.output.max_secret_size)
    try:
        # Local files first: cheap, and a mistake there is reported even when Vault is down.
        reading = read_all(cfg.secrets, [(("swarm", "file"), files), (("vault",), vault)])
        reading.raise_first()
        written = sink.write(output_files(reading.materials, owners))
    except BaseException:
        discard(vault)  # with a supplied token its leases would outlive us
        raise
    done = Materialized(user, reading.materials, written, sink, owners, vault.client, owner_lock)
    if vault.client is None or keep_client:
        return done
    if certificates := sorted({m.spec.source.path for m in reading.materials if m.lease and m.lease.serial}):
        log.warning("issued certificates are not rotated after render; run or sidecar rotates them", paths=certificates)
    if leased := sorted(set(vault.issued)):  # they die with the token: it must outlive us
        log.warning("leased secrets are not renewed after render; they expire with their TTL", leases=leased)
    else:
        vault.client.revoke_own_token()
    return done._replace(client=None)


@contextmanager
def revoked_on_failure(done: Materialized) -> Iterator[None]:
    """Until the caller hands `done` on: whatever ends the start revokes its leases and our token."""
    try:
        yield
    except BaseException:
        if done.client is not None:
            revoke_all(done.client, [m.lease.lease_id for m in done.materials if m.lease and m.lease.revocable])
        raise


def discard(vault: VaultSource) -> None:
    """Revoke what a failed start made: every lease issued, and a token we logged in for."""
    if vault.client is not None:
        revoke_all(vault.client, vault.issued)


def revoke_all(client: "VaultClient", lease_ids: Iterable[str]) -> None:
    """Each lease (best effort, once), then the token if we logged in for it. Stop signals
    during a start only note themselves (secret_init.interrupt), so nothing cuts this short."""
    for lease_id in sorted(set(lease_ids)):
        client.revoke_lease_quietly(lease_id)
    client.revoke_own_token()


def vault_login(cfg: Config, environ: Mapping[str, str], metrics: Recorder = NO_METRICS) -> "VaultClient":
    from secret_init.vault import VaultClient

    client = VaultClient(cfg.vault, environ, sleep=interrupt.sleep, metrics=metrics)  # a stop ends a retry wait
    client.login()
    return client


def output_files(materials: list[Material], owners: Mapping[str, Owner]) -> list[OutputFile]:
    return [OutputFile(m.spec.name, m.value, m.spec.mode, owners[m.spec.name]) for m in materials]


def app_user(cfg: Config, for_app: bool) -> AppUser:
    """Who the app runs as and who owns its files; refuses root unless allowed."""
    if not privileges.is_root():
        current = privileges.resolve(None)
        if cfg.output.user is not None and privileges.resolve(cfg.output.user).uid != current.uid:
            raise PermissionRefusedError(
                f"running as uid {current.uid} without root: cannot become {cfg.output.user!r}; "
                "unset [output] user or start secret-init as root"
            )
        return current
    user = privileges.resolve(cfg.output.user)
    if for_app and user.uid == 0 and not cfg.process.allow_root:
        raise PermissionRefusedError(
            "refusing to run the app as root: set [output] user, or [process] allow_root = true"
        )
    return user


def file_owner(spec: SecretSpec, app: AppUser) -> Owner:
    if spec.user is None:
        return Owner(app.uid, app.gid)
    user = privileges.resolve(spec.user)
    if not privileges.is_root() and user.uid != os.geteuid():
        raise PermissionRefusedError(f"secret {spec.name!r}: cannot give the file to {spec.user!r} without root")
    return Owner(user.uid, user.gid)
