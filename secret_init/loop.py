"""The one loop of a resident secret-init: events in, decisions out.

Signals (from the supervisor's handlers) and Rotate / Refresh / Expired (from the renewer
thread) arrive on one queue. Only this loop acts on them. Each rotation runs in order:
1. read the path again;
2. write the changed files;
3. restart or signal the app;
4. only then revoke the old lease.
"""

import gc
import os
import signal
import time
from collections.abc import Mapping
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING

import structlog

from secret_init import privileges
from secret_init.app import Materialized, output_files
from secret_init.config import Config
from secret_init.errors import ExitCode, SecretInitError
from secret_init.model import Lease, Material
from secret_init.sink import Owner
from secret_init.supervisor import SignalEvent, Supervisor, exit_code

if TYPE_CHECKING:
    from secret_init.renewal import Renewer
    from secret_init.vault import VaultClient

log = structlog.get_logger()

TICK = 1.0  # reap and refresh status.json at least this often


class Supervised:
    def __init__(self, cfg: Config, done: Materialized, command: list[str] | None, env: Mapping[str, str]) -> None:
        """`command` None is the sidecar: no child; SIGTERM or SIGINT ends it."""
        self.cfg = cfg
        self.done = done
        self.command = command
        self.env = env
        self.events: SimpleQueue[object] = SimpleQueue()
        self.supervisor = Supervisor(self.events)
        self.client: VaultClient | None = done.client
        self.renewer: Renewer | None = None
        self.leases: dict[str, Lease] = {m.spec.source.path: m.lease for m in done.materials if m.lease}
        self.created: set[str] = set(lease.lease_id for lease in self.leases.values())
        self.last_rotation: dict[str, float] = {}
        self.forced_exit: int | None = None
        # Old leases to revoke later: the app was signalled, not restarted, and needs time.
        self.pending_revokes: list[tuple[float, str]] = []
        self.stopping = False
        self._last_status: dict[str, object] = {}

    @property
    def app_user(self) -> privileges.AppUser | None:
        return self.done.user if privileges.is_root() else None

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        self.supervisor.install()
        privileges.set_no_new_privs()  # inherited by the app
        try:
            # The app first: its credentials are fresh, and learning the token's max TTL
            # (a few Vault calls) and importing the renewal code need not delay it.
            if self.command is not None:
                self.supervisor.start(self.command, self.env, self.app_user)
            self._start_renewer()
            _stay_resident()
            self._write_status()
            while self._running():
                try:
                    event = self.events.get(timeout=self._wait_time())
                except Empty:
                    self.supervisor.reap()  # a lost SIGCHLD must not leave a zombie
                else:
                    self._handle(event)
                self._check_expiry()
                self._revoke_due()
                self._write_status()
        finally:
            if self.supervisor.pid is not None:
                if self.supervisor.exit_status is None:  # leaving on an error: the app goes too
                    self.supervisor.stop_app(self.cfg.process.stop_signal, self.cfg.process.stop_timeout)
                self.supervisor.stop_leftovers(self.cfg.process.stop_timeout)
            self._shutdown_vault()
            self._write_status(state="stopped")
        if self.forced_exit is not None:
            code = self.forced_exit
        else:
            code = exit_code(self.supervisor.exit_status) if self.supervisor.exit_status is not None else 0
        log.info("supervisor exiting", exit_code=code)
        return code

    def _running(self) -> bool:
        if self.command is None:
            return not self.stopping
        return self.supervisor.exit_status is None

    def _handle(self, event: object) -> None:
        from secret_init.renewal import Refresh, Rotate

        if isinstance(event, SignalEvent):
            if event.signum == signal.SIGCHLD:
                self.supervisor.reap()
                return
            if event.signum in (signal.SIGTERM, signal.SIGINT):
                self.stopping = True
            if self.command is not None:
                self.supervisor.forward(event.signum)
        elif self.stopping:
            return  # no rotation starts once the app is being stopped
        elif isinstance(event, Refresh):
            self._refresh(event.path)
        elif isinstance(event, Rotate) and not self._current(event.path, event.lease_id):
            log.debug("event for a lease already rotated away", path=event.path, lease_id=event.lease_id)
        elif isinstance(event, Rotate):
            self._rotate(event.path, event.reason)

    def _current(self, path: str, lease_id: str) -> bool:
        lease = self.leases.get(path)
        return lease is not None and lease.lease_id == lease_id

    def _wait_time(self) -> float:
        """Until the next tick, the next delayed revoke, or the next lease expiry."""
        times = [time.monotonic() + TICK]
        times += [due for due, _ in self.pending_revokes]
        if self.renewer is not None:
            times += [s.expires_at for s in self.renewer.snapshot().values() if not s.expired]
        return max(0.0, min(times) - time.monotonic())

    def _check_expiry(self) -> None:
        """A lease past its expiry without a rotation: apply on_expiry, once per lease."""
        if self.renewer is None or self.stopping:
            return
        now = time.monotonic()
        for path, lease in self.renewer.snapshot().items():
            if now >= lease.expires_at and self.renewer.expire(path, lease.lease_id):
                log.error("lease expired before it could be rotated", path=path, lease_id=lease.lease_id)
                self._expired(path)

    def _revoke_due(self) -> None:
        now = time.monotonic()
        for item in [p for p in self.pending_revokes if p[0] <= now]:
            self.pending_revokes.remove(item)
            self._revoke(item[1])

    # -- vault ------------------------------------------------------------------------------

    def _start_renewer(self) -> None:
        if self.client is None:
            return
        from secret_init.renewal import Renewer

        self.client.end_startup()
        self.renewer = Renewer(
            self.client,
            self.events.put,
            self.cfg.process.rotate_before,
            self.cfg.vault.refresh_interval,
        )
        self.renewer.look_up_token()
        for path, lease in self.leases.items():
            self.renewer.track(path, lease.lease_id, lease.duration, lease.renewable, lease.issued_at)
        for path in self._vault_paths():
            if path not in self.leases:
                self.renewer.watch_static(path)
        self.renewer.start()

    def _vault_paths(self) -> list[str]:
        return sorted({s.source.path for s in self.cfg.secrets if s.source.kind == "vault"})

    def _read(self, path: str, why: str) -> list[Material] | None:
        from secret_init.sources.vault import read_vault

        assert self.client is not None
        specs = [s for s in self.cfg.secrets if s.source.kind == "vault" and s.source.path == path]
        try:
            return read_vault(self.client, specs, self.cfg.output.max_secret_size)
        except SecretInitError as e:
            log.warning("vault read failed", path=path, purpose=why, error=str(e))
            return None

    def _rotate(self, path: str, reason: str) -> None:
        assert self.renewer is not None and self.client is not None
        old = self.leases.get(path)
        fresh = self._read(path, "rotation")
        if fresh is None:
            self.renewer.rotation_failed(path)
            return
        new = fresh[0].lease
        try:
            changed = self._write(fresh)
        except SecretInitError as e:
            log.error("rotation could not write files", path=path, error=str(e))
            if new is not None:
                self._revoke(new.lease_id)
            self.renewer.rotation_failed(path)
            return
        if new is not None:
            self.leases[path] = new
            self.created.add(new.lease_id)
            self.renewer.track(path, new.lease_id, new.duration, new.renewable, new.issued_at)
        else:
            self.leases.pop(path, None)
            self.renewer.forget(path)
        self.last_rotation[path] = time.time()
        log.info(
            "lease rotated",
            path=path,
            reason=reason,
            old_lease=old.lease_id if old else None,
            new_lease=new.lease_id if new else None,
        )
        restarted = self._apply_on_rotate() if changed else False
        if old is not None:
            if restarted:  # the old app is gone: nothing uses the old credentials
                self._revoke(old.lease_id)
            else:  # signalled, or a sidecar's app: give it stop_timeout to switch
                self.pending_revokes.append((time.monotonic() + self.cfg.process.stop_timeout, old.lease_id))

    def _refresh(self, path: str) -> None:
        assert self.renewer is not None
        fresh = self._read(path, "refresh")
        if fresh is not None:
            try:
                if self._write(fresh):
                    log.info("secret changed in vault", path=path)
                    self._apply_on_rotate()
            except SecretInitError as e:
                log.error("refresh could not write files", path=path, error=str(e))
        self.renewer.refreshed(path)

    def _write(self, fresh: list[Material]) -> bool:
        written = self.done.sink.write(output_files(fresh, self.done.owners))
        return any(w.changed for w in written)

    def _revoke(self, lease_id: str) -> None:
        assert self.client is not None
        try:
            self.client.revoke_lease(lease_id)
            self.created.discard(lease_id)
        except SecretInitError as e:
            log.warning("lease revoke failed; it expires by itself", lease_id=lease_id, error=str(e))

    def _expired(self, path: str) -> None:
        if self.cfg.process.on_expiry == "keep":
            log.error("credentials expired; on_expiry = keep, so the app keeps running", path=path)
            if self.renewer is not None:
                self.renewer.rotation_failed(path)  # and rotation keeps being tried
            return
        log.error("credentials expired; stopping the app (on_expiry = stop)", path=path)
        self.forced_exit = int(ExitCode.TEMPFAIL)
        self.stopping = True
        if self.command is not None:
            self.supervisor.stop_app(self.cfg.process.stop_signal, self.cfg.process.stop_timeout)

    def _shutdown_vault(self) -> None:
        if self.renewer is not None:
            self.renewer.stop(timeout=self.cfg.vault.request_timeout * 3)
        self.pending_revokes.clear()  # still in self.created: revoked below
        if self.client is None:
            return
        if self.cfg.vault.revoke_on_exit:
            for lease_id in sorted(self.created):
                self._revoke(lease_id)
        self.client.revoke_own_token()

    # -- the app ------------------------------------------------------------------------------

    def _apply_on_rotate(self) -> bool:
        """Restart or signal the app; True when it was restarted."""
        if self.command is None:
            self._notify_sidecar_app()
            return False
        action = self.cfg.process.on_rotate
        self.supervisor.reap()  # an app that already exited is not brought back
        if action == "none" or self.supervisor.pid is None or self.supervisor.exit_status is not None:
            return False
        if action == "signal":
            # The app alone: a reload signal is its to pass on, not its children's to die of.
            self.supervisor.signal_app(self.cfg.process.rotate_signal)
            return False
        old_pid = self.supervisor.pid
        self.supervisor.stop_app(self.cfg.process.stop_signal, self.cfg.process.stop_timeout)
        self.supervisor.stop_leftovers(self.cfg.process.stop_timeout)
        new_pid = self.supervisor.start(self.command, self.env, self.app_user)
        log.info("app restarted", old_pid=old_pid, new_pid=new_pid)
        return True

    def _notify_sidecar_app(self) -> None:
        """Signal the app in another container that shares our PID namespace, if configured."""
        pidfile = self.cfg.sidecar.notify_pidfile
        if pidfile is None:
            return
        try:
            with open(pidfile, "rb") as f:
                pid = int(f.read(32).strip())
            os.kill(pid, self.cfg.sidecar.notify_signal)
            log.info("app notified", pid=pid, signal=signal.Signals(self.cfg.sidecar.notify_signal).name)
        except (OSError, ValueError) as e:
            log.warning("could not notify the app", pidfile=pidfile, error=str(e))

    # -- status ---------------------------------------------------------------------------

    def _write_status(self, state: str = "running") -> None:
        from secret_init import status
        from secret_init.renewal import rotate_at

        wall = time.time() - time.monotonic()
        views = {}
        if self.renewer is not None:
            for path, lease in self.renewer.snapshot().items():
                views[path] = status.LeaseView(
                    lease_id=lease.lease_id,
                    expires_at=lease.expires_at + wall,
                    deadline=lease.deadline + wall,
                    # Unprobed: its deadline is provisional, and its probe comes first.
                    rotate_at=rotate_at(lease, self.cfg.process.rotate_before) + wall if lease.probed else None,
                    last_renewal=lease.last_renewal + wall if lease.last_renewal is not None else None,
                    rotating=lease.rotating,
                )
        doc = status.build(self.cfg, views, self.last_rotation, os.getpid(), self.supervisor.pid, time.time(), state)
        # Rewrite only on change; updated_at alone does not count.
        key = {k: v for k, v in doc.items() if k != "updated_at"}
        if key == self._last_status:
            return
        self._last_status = key
        data = status.encode(doc)
        owner = Owner(os.geteuid(), self.done.user.gid if privileges.is_root() else os.getegid())
        try:
            self.done.sink.write_status(status.STATUS_FILE, data, owner)
        except SecretInitError as e:
            log.warning("status.json could not be written", error=str(e))


def _stay_resident() -> None:
    """Collect garbage again: cli.main paused it for the start-up, and this process stays.

    Once the app runs, not before. One full collection first (~20 ms): start-up garbage
    can hold secret values, from a failed request's traceback say. Then the survivors,
    ~45,000 objects (modules, mostly), are frozen: no later collection scans them.
    """
    gc.collect()
    gc.freeze()
    gc.enable()
