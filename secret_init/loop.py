"""The one loop of a resident secret-init: events in, decisions out.

Signals (from the supervisor's handlers) and Rotate / Refresh (from the renewer thread)
arrive on one queue. Only this loop acts on them. Each rotation runs in order:
1. read the path again;
2. write the changed files;
3. restart or signal the app;
4. only then revoke the old lease.
The renewer owns the lease state: this loop tells it of new leases and reads snapshots.
Decisions use one monotonic clock; wall time is only written for people (status.json).
"""

import gc
import math
import os
import signal
import time
from collections.abc import Callable, Mapping
from queue import Empty, SimpleQueue

import structlog

from secret_init import interrupt, privileges, status
from secret_init.config import Config
from secret_init.errors import ExitCode, SecretInitError
from secret_init.materialize import Materialized, materialize, output_files, revoked_on_failure
from secret_init.metrics import NO_METRICS, LeaseTimes, Recorder
from secret_init.model import Material
from secret_init.renewal import Refresh, Renewer, Rotate, rotate_at
from secret_init.sink import Owner
from secret_init.sources.vault import VaultSource
from secret_init.supervisor import SignalEvent, Supervisor, exit_code

log = structlog.get_logger()

TICK = 1.0  # reap and refresh status.json at least this often


def sidecar(cfg: Config, environ: Mapping[str, str], metrics: Recorder = NO_METRICS) -> int:
    """Materialize, then stay: the same renewal, rotation and refresh, with no child."""
    done = materialize(cfg, environ, for_app=False, keep_client=True, metrics=metrics)
    with revoked_on_failure(done):  # until the loop owns the leases
        supervised = Supervised(cfg, done, None, {}, metrics=metrics)
    return supervised.run()


class Supervised:
    def __init__(
        self,
        cfg: Config,
        done: Materialized,
        command: list[str] | None,
        env: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
        threaded: bool = True,  # False: the caller steps the renewer (scripted-clock tests)
        metrics: Recorder = NO_METRICS,
    ) -> None:
        """`command` None is the sidecar: no child; SIGTERM or SIGINT ends it."""
        self.cfg = cfg
        self.done = done
        self.command = command
        self.env = env
        self.clock = clock
        self.threaded = threaded
        self.metrics = metrics
        self.events: SimpleQueue[object] = SimpleQueue()
        self.supervisor = Supervisor(self.events, clock)
        self.client = done.client
        self.renewer: Renewer | None = None
        self.forced_exit: int | None = None
        # Old leases to revoke later (due time, lease id): the app was signalled, not restarted. The renewer
        # holds (renews) each until then. Due at inf: a revoke that failed, tried again at exit.
        self.pending_revokes: list[tuple[float, str]] = []
        self.revoke_expiry: dict[str, float] = {}  # for a failed revoke of a held lease: its last known expiry
        self.stopping = False
        # A forwarded SIGTERM/SIGINT: until this time the app may exit; rotations wait meanwhile.
        self.grace_until: float | None = None
        self.deferred: list[Rotate | Refresh] = []
        self.started = False  # the app runs and the renewer follows every lease
        self._last_status: dict[str, object] = {}

    @property
    def app_user(self) -> privileges.AppUser | None:
        return self.done.user if privileges.is_root() else None

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        try:
            self.supervisor.install()  # inside: a stop signal until then ends the start, and finish() revokes
            interrupt.checkpoint()  # one that arrived before our handlers took over
            privileges.set_no_new_privs()  # inherited by the app
            self.begin()
            while self._running():
                self.step(self._wait_time())
        finally:
            self.finish()
            self.supervisor.uninstall()
        return self.exit_code()

    def begin(self) -> None:
        # The app first: its credentials are fresh, and learning the token's max TTL (a
        # few Vault calls) need not delay it. Everything this process will ever import
        # is imported by now (this module's imports): nothing is imported as root later.
        if self.command is not None:
            self.supervisor.start(self.command, self.env, self.app_user)
        self._start_renewer()
        self.started = True
        _stay_resident()
        self._write_status()

    def step(self, wait: float) -> None:
        """Take one event (or none, after `wait` seconds), then the timed duties."""
        try:
            event = self.events.get(timeout=wait) if wait > 0 else self.events.get_nowait()
        except Empty:
            self.supervisor.reap()  # a lost SIGCHLD must not leave a zombie
        else:
            self._handle(event)
        self._end_grace_if_declined()
        self._check_expiry()
        self._revoke_due()
        self._write_status()

    def finish(self) -> None:
        if self.supervisor.pid is not None:
            if self.supervisor.exit_status is None:  # leaving on an error: the app goes too
                self.supervisor.stop_app(self.cfg.process.stop_signal, self.cfg.process.stop_timeout)
            self.supervisor.stop_leftovers(self.cfg.process.stop_timeout)
        self._shutdown_vault()
        self._write_status(state="stopped")
        self.metrics.close()

    def exit_code(self) -> int:
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
        if isinstance(event, SignalEvent):
            if event.signum == signal.SIGCHLD:
                self.supervisor.reap()
                return
            if event.signum in (signal.SIGTERM, signal.SIGINT):
                self.stopping = True
                if self.command is not None and self.forced_exit is None:
                    self.grace_until = self.clock() + self.cfg.process.stop_timeout
            if self.command is not None:
                self.supervisor.forward(event.signum)
        elif self.stopping:
            if self.grace_until is not None and isinstance(event, Rotate | Refresh):
                self.deferred.append(event)  # done if the app turns out to stay
            return  # no rotation starts while the app is being stopped
        elif isinstance(event, Refresh):
            self._refresh(event.path)
        elif isinstance(event, Rotate) and not self._current(event.path, event.lease_id):
            log.debug("event for a lease already rotated away", path=event.path, lease_id=event.lease_id)
        elif isinstance(event, Rotate):
            self._rotate(event.path, event.lease_id, event.reason)

    def _end_grace_if_declined(self) -> None:
        """The app outlived a forwarded SIGTERM/SIGINT by stop_timeout: it declined the stop.

        Shells and REPLs ignore SIGINT. Stopping would be our decision, not theirs: the
        duties resume at once, deferred rotations and on_expiry included.
        """
        if self.grace_until is None or self.clock() < self.grace_until:
            return
        self.grace_until = None
        self.supervisor.reap()
        if self.supervisor.exit_status is not None:
            return  # it did stop: the loop ends
        log.warning("the app is still running after stop_timeout; it declined the stop, duties resume",
                    pid=self.supervisor.pid, stop_timeout=self.cfg.process.stop_timeout)  # fmt: skip
        self.stopping = False
        self.supervisor.stop_declined()
        deferred, self.deferred = self.deferred, []
        for event in deferred:
            self._handle(event)

    def _current(self, path: str, lease_id: str) -> bool:
        lease = self.renewer.snapshot().get(path) if self.renewer else None
        return lease is not None and lease.lease_id == lease_id

    def _wait_time(self) -> float:
        """Until the next tick, the next delayed revoke, or the next lease expiry."""
        now = self.clock()
        times = [now + TICK]
        times += [due for due, _ in self.pending_revokes]
        if self.grace_until is not None:
            times.append(self.grace_until)
        if self.renewer is not None:
            grace = self.cfg.process.expiry_grace
            for lease in self.renewer.snapshot().values():
                if not lease.expired:
                    times.append(lease.expires_at)
                elif not lease.gave_up:
                    times.append(lease.expires_at + grace)
        return max(0.0, min(times) - now)

    def _check_expiry(self) -> None:
        """A lease past its expiry without a rotation: rotation is retried about once a second for
        expiry_grace (the renewer's schedule), then on_expiry is applied, once per lease."""
        if self.renewer is None or self.stopping:
            return
        now, grace = self.clock(), self.cfg.process.expiry_grace
        for path, lease in self.renewer.snapshot().items():
            if now < lease.expires_at:
                continue
            if self.renewer.expire(path, lease.lease_id):
                log.error("lease expired before it could be rotated; retrying rotation about once a second",
                          path=path, lease_id=lease.lease_id, expiry_grace=grace)  # fmt: skip
            if now >= lease.expires_at + grace and self.renewer.give_up(path, lease.lease_id):
                self._expired(path)

    def _revoke_due(self) -> None:
        now = self.clock()
        for item in [p for p in self.pending_revokes if p[0] <= now]:
            self.pending_revokes.remove(item)
            self._revoke(item[1], self.renewer.release(item[1]) if self.renewer is not None else None)

    # -- vault ------------------------------------------------------------------------------

    def _start_renewer(self) -> None:
        if self.client is None:
            return
        self.client.end_startup()
        self.renewer = Renewer(
            self.client, self.events.put, self.cfg.process.rotate_before, self.cfg.vault.refresh_interval, self.clock,
            metrics=self.metrics,
        )  # fmt: skip
        leased = {m.spec.source.path: m.lease for m in self.done.materials if m.lease}
        for path, lease in leased.items():
            self.renewer.track(path, lease)  # first: if the lookup fails, shutdown revokes them
        for path in self.cfg.vault_paths:
            if path not in leased and path not in self.cfg.written_paths:
                self.renewer.watch_static(path)
        self.renewer.look_up_token()
        if self.threaded:
            self.renewer.start()

    def _read(self, path: str, why: str) -> list[Material] | None:
        client = self.client
        assert client is not None
        source = VaultSource(lambda: client, self.cfg.output.max_secret_size)  # one per read: `issued` is its
        reading = source.read([s for s in self.cfg.vault_specs if s.source.path == path])
        if reading.failures:
            for lease_id in source.issued:  # unusable: do not leave credentials alive
                self._revoke(lease_id)
            log.warning("vault read failed", path=path, purpose=why, error=str(reading.failures[0][1]))
            return None
        return reading.materials

    def _rotate(self, path: str, old_lease_id: str, reason: str) -> None:
        assert self.renewer is not None and self.client is not None
        old = self.renewer.snapshot().get(path)
        revocable = old is None or old.revocable  # a certificate without a Vault lease has nothing to revoke
        fresh = self._read(path, "rotation")
        if fresh is None:
            self.metrics.rotation(ok=False)
            self.renewer.rotation_failed(path)
            return
        new = fresh[0].lease
        if new is None and path in self.cfg.written_paths:
            # It issued a certificate or a lease before: an answer without one would end its rotation for good.
            log.error("rotation got no certificate or lease", path=path)
            self.metrics.rotation(ok=False)
            self.renewer.rotation_failed(path)
            return
        try:
            changed = self._write(fresh)
        except SecretInitError as e:
            log.error("rotation could not write files", path=path, error=str(e))
            if new is not None and new.revocable:
                self._revoke(new.lease_id)
            self.metrics.rotation(ok=False)
            self.renewer.rotation_failed(path)
            return
        previous = None
        if new is not None:
            previous = self.renewer.track(path, new, rotated_at=self.clock())
        else:
            self.renewer.forget(path)
        log.info(
            "lease rotated", path=path, reason=reason, old_lease=old_lease_id, new_lease=new.lease_id if new else None
        )
        restarted = self._apply_on_rotate() if changed else False
        self.metrics.rotation(ok=True)
        if not revocable:
            return
        if restarted:  # the old app is gone: nothing uses the old credentials
            known = previous is not None and previous.lease_id == old_lease_id
            self._revoke(old_lease_id, previous.expires_at if previous is not None and known else None)
            return
        # Signalled, or a sidecar's app: it has stop_timeout to switch, and the old lease is renewed meanwhile.
        if previous is not None and previous.lease_id == old_lease_id:
            self.renewer.hold(previous)
        self.pending_revokes.append((self.clock() + self.cfg.process.stop_timeout, old_lease_id))

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
        self.renewer.watch_static(path)

    def _write(self, fresh: list[Material]) -> bool:
        written = self.done.sink.write(output_files(fresh, self.done.owners))
        return any(w.changed for w in written)

    def _revoke(self, lease_id: str, expires_at: float | None = None) -> None:
        """Revoke a lease that may still be alive; `expires_at` known and past: Vault has dropped it already
        (and answers a revoke of an unknown lease as it answers a real one, so no "lease revoked" is logged)."""
        assert self.client is not None
        if expires_at is not None and self.clock() >= expires_at:
            log.info("lease already expired; nothing to revoke", lease_id=lease_id)
            return
        if not self.client.revoke_lease_quietly(lease_id):
            self.pending_revokes.append((math.inf, lease_id))  # tried again on exit
            if expires_at is not None:
                self.revoke_expiry[lease_id] = expires_at

    def _expired(self, path: str) -> None:
        grace = self.cfg.process.expiry_grace
        if self.cfg.process.on_expiry == "keep":  # rotation goes on being retried, with the usual backoff
            log.error("credentials expired; on_expiry = keep, so the app keeps running", path=path, expiry_grace=grace)
            return
        log.error("credentials expired; stopping the app (on_expiry = stop)", path=path, expiry_grace=grace)
        self.forced_exit = int(ExitCode.TEMPFAIL)
        self.stopping = True
        if self.command is not None:
            self.supervisor.stop_app(self.cfg.process.stop_signal, self.cfg.process.stop_timeout)

    def _shutdown_vault(self) -> None:
        # Until the renewer tracks them, the start's own leases are only in `done` (alive: just issued).
        current: dict[str, float | None] = {
            m.lease.lease_id: None for m in self.done.materials if m.lease and m.lease.revocable
        }
        if self.renewer is not None:
            # A renewer mid-request may be trying every address in turn, and may ask sys/leader (2 s) once.
            addresses = len(self.cfg.vault.addrs)
            self.renewer.stop(timeout=(self.cfg.vault.request_timeout * addresses + 2) * 3)
            leases = self.renewer.snapshot().values()
            current = {lease.lease_id: lease.expires_at for lease in leases if lease.revocable}
        # Rotated away: nothing uses them after the app, so they go even with revoke_on_exit = false.
        old = {lease_id: self._release(lease_id) for _, lease_id in self.pending_revokes}
        self.pending_revokes.clear()
        if self.client is None:
            return
        keep = self.started and not self.cfg.vault.revoke_on_exit  # a start that did not complete leaves none
        for lease_id, expires_at in sorted((old if keep else old | current).items()):
            self._revoke(lease_id, expires_at)
        retired = self.renewer.retired_tokens() if self.renewer is not None else []
        if keep:  # a token's leases live while it does: it expires by itself, and only this process held it
            for token in retired:  # a lease not yet rotated off it may still be in use
                self.client.release(token)
            log.info("vault token and leases left to expire (revoke_on_exit = false)", leases=len(current))
            return
        for token in retired:
            self.client.revoke_retired(token)
        self.client.revoke_own_token()

    def _release(self, lease_id: str) -> float | None:
        """A pending revoke's lease: no longer held by the renewer; its last known expiry."""
        held = self.renewer.release(lease_id) if self.renewer is not None else None
        return held if held is not None else self.revoke_expiry.pop(lease_id, None)

    # -- the app ------------------------------------------------------------------------------

    def _apply_on_rotate(self) -> bool:
        """Restart or signal the app; True when it was restarted."""
        if self.command is None:
            if self.cfg.sidecar.notify_pidfile is not None:
                app_uid = self.done.user.uid if self.cfg.output.user is not None else None
                self.supervisor.notify(self.cfg.sidecar.notify_pidfile, self.cfg.sidecar.notify_signal, app_uid)
            return False
        action = self.cfg.process.on_rotate
        self.supervisor.reap()  # an app that already exited is not brought back
        if action == "none" or self.supervisor.pid is None or self.supervisor.exit_status is not None:
            return False
        if action == "signal":
            # The app alone: a reload signal is its to pass on, not its children's to die of.
            self.supervisor.signal_app(self.cfg.process.rotate_signal)
            return False
        stop_signal, stop_timeout = self.cfg.process.stop_signal, self.cfg.process.stop_timeout
        restarted = self.supervisor.restart(self.command, self.env, self.app_user, stop_signal, stop_timeout)
        if restarted:
            self.metrics.app_restart()
        return restarted

    # -- status ---------------------------------------------------------------------------

    def _write_status(self, state: str = "running") -> None:
        wall = time.time() - self.clock()  # monotonic to wall, for people only
        views = {}
        times = {}
        if self.renewer is not None:
            for path, lease in self.renewer.snapshot().items():
                due = rotate_at(lease, self.cfg.process.rotate_before) + wall if lease.probed else None
                renewed = lease.last_renewal if lease.last_renewal is not None else lease.issued_at
                deadline = lease.deadline + wall if lease.probed else None  # provisional until the probe
                times[path] = LeaseTimes(lease.issued_at + wall, renewed + wall, lease.expires_at + wall, deadline, due)
                views[path] = status.LeaseView(
                    lease_id=lease.lease_id,
                    expires_at=lease.expires_at + wall,
                    deadline=lease.deadline + wall,
                    # Unprobed: its deadline is provisional, and its probe comes first.
                    rotate_at=due,
                    last_renewal=lease.last_renewal + wall if lease.last_renewal is not None else None,
                    last_rotation=lease.rotated_at + wall if lease.rotated_at is not None else None,
                    rotating=lease.rotating,
                    revocable=lease.revocable,
                    serial=lease.serial,
                )
        token = self.renewer.token if self.renewer is not None else None
        expires = token is not None and token.known and token.ttl > 0  # a TTL of 0: a token that never expires
        self.metrics.publish(times, token.expires_at + wall if token is not None and expires else None)
        doc = status.build(self.cfg, views, os.getpid(), self.supervisor.pid, time.time(), state)
        # Rewrite only on change; updated_at alone does not count.
        key = {k: v for k, v in doc.items() if k != "updated_at"}
        if key == self._last_status:
            return
        self._last_status = key
        owner = Owner(os.geteuid(), self.done.user.gid if privileges.is_root() else os.getegid())
        try:
            self.done.sink.write_status(status.STATUS_FILE, status.encode(doc), owner)
        except SecretInitError as e:
            log.warning("status.json could not be written", error=str(e))


def _stay_resident() -> None:
    """Collect garbage again: cli.main paused it for the start-up, and this process stays.

    One full collection first: start-up garbage can hold secret values, from a failed
    request's traceback say. Then the survivors (modules, mostly) are frozen, so that
    no later collection scans them.
    """
    gc.collect()
    gc.freeze()
    gc.enable()
