"""Renewal: a pure schedule, and the thread that follows it.

The schedule is Vault's lifetime-watcher rule. After each renewal it sleeps 2/3 of the
remaining time plus 1/3 of a random 10-20% grace. On errors it backs off with jitter, but
never past the deadline. A lease's deadline is min(its max TTL, its token's max TTL),
because a lease dies with the token that created it. Vault does not report a max TTL:
the thread learns it with a probe at the lease's first renewal, so tracking a lease
costs no Vault call. When less than `rotate_before` is
left, or renewal is refused, the thread reports "rotate this path". It never writes files
or touches processes: the one loop in app.py decides what happens.
"""

import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import structlog

from secret_init.errors import SecretInitError

if TYPE_CHECKING:
    from secret_init.vault import VaultClient

log = structlog.get_logger()

FAR = math.inf
ERROR_BACKOFF_START = 1.0
ERROR_BACKOFF_MAX = 30.0
# A rotation starts this fraction of rotate_before early, but at least ROTATION_LEAD_MIN
# seconds, so that the restart itself (read, write, stop, start) still lands
# rotate_before ahead of the deadline.
ROTATION_LEAD = 0.2
ROTATION_LEAD_MIN = 1.0
# Vault reports TTLs in whole seconds, and a capped one may be rounded up (seen: 8 s
# reported with 7.8 s left). A max TTL learned from a probe is taken this much shorter
# (a tiny one, by half).
TTL_GRANULARITY = 1.0


# -- the pure schedule ------------------------------------------------------------------


@dataclass(frozen=True)
class LeaseState:
    """Everything the schedule knows about one lease. Times are on the injected clock."""

    path: str
    lease_id: str
    duration: float  # the lease's TTL as issued; renewals ask for this much again
    renewable: bool
    issued_at: float
    expires_at: float  # the current expiry; renewals move it, up to the deadline
    deadline: float  # min(max TTL, token max TTL): nothing extends a lease past this
    grace: float
    next_renewal: float
    errors: int = 0
    rotating: bool = False  # a "rotate" event is out; not reported again until retry_at
    retry_at: float = FAR
    last_renewal: float | None = None
    expired: bool = False  # the loop saw it expire and acted on_expiry
    # False until the max-TTL probe: the deadline is then provisional (issue + TTL).
    probed: bool = True
    token_deadline: float = FAR  # of the token that created it: a later login does not extend it

    @property
    def lifetime(self) -> float:
        return self.deadline - self.issued_at


def grace_for(duration: float, rng: random.Random) -> float:
    """A random 10-20% of the lease duration, as Vault's lifetime watcher uses."""
    return duration * (0.1 + 0.1 * rng.random())


def new_lease(
    path: str,
    lease_id: str,
    duration: float,
    renewable: bool,
    now: float,
    deadline: float,
    rng: random.Random,
) -> LeaseState:
    expires = min(now + duration, deadline)
    grace = grace_for(duration, rng)
    return LeaseState(
        path, lease_id, duration, renewable, now, expires, deadline, grace, renewal_time(now, expires - now, grace)
    )


def unprobed_lease(
    path: str,
    lease_id: str,
    duration: float,
    issued_at: float,
    token_deadline: float,
    configured: float | None,
    rng: random.Random,
) -> LeaseState:
    """A renewable lease whose max TTL is not known yet.

    Its deadline is provisionally issue + TTL, the least it can be. The probe is due at
    its first renewal, or at the earliest rotation that provisional deadline allows:
    a later deadline only moves rotation later, so the probe is never too late.
    """
    lease = new_lease(path, lease_id, duration, True, issued_at, min(issued_at + duration, token_deadline), rng)
    probe_at = min(lease.next_renewal, rotate_at(lease, configured))
    return replace(lease, probed=False, next_renewal=probe_at, token_deadline=token_deadline)


def after_probe(lease: LeaseState, now: float, max_remaining: float, ttl: float, rng: random.Random) -> LeaseState:
    """The probe, sent at `now`, renewed the lease to `ttl` and found its max TTL `max_remaining` away.

    The lease's life still starts at its issue: rotate_before is a share of all of it.
    """
    deadline = min(now + max_remaining - min(TTL_GRANULARITY, max_remaining / 2), lease.token_deadline)
    return after_renewal(replace(lease, deadline=deadline, probed=True), now, ttl, rng)


def renewal_time(now: float, remaining: float, grace: float) -> float:
    """When to renew next: 2/3 of the remaining time plus 1/3 of the grace, but before expiry."""
    remaining = max(0.0, remaining)
    return now + min(remaining, remaining * 2 / 3 + grace / 3)


def rotate_before(lease: LeaseState, configured: float | None) -> float:
    """How long before the deadline to rotate: configured, or 1/3 of the lease's whole life.

    Never more than half the life: a larger value would rotate every new lease at once.
    """
    wanted = configured if configured is not None else lease.lifetime / 3
    return min(wanted, lease.lifetime / 2)


def rotate_at(lease: LeaseState, configured: float | None) -> float:
    """rotate_before plus the lead, but never in the first 40% of the life (no rotation storms)."""
    before = rotate_before(lease, configured)
    early = before + max(before * ROTATION_LEAD, ROTATION_LEAD_MIN)
    return lease.deadline - min(early, lease.lifetime * 0.6)


def after_renewal(lease: LeaseState, now: float, ttl: float, rng: random.Random) -> LeaseState:
    expires = min(now + ttl, lease.deadline)
    grace = grace_for(lease.duration, rng)
    return replace(
        lease,
        expires_at=expires,
        grace=grace,
        next_renewal=renewal_time(now, expires - now, grace),
        errors=0,
        last_renewal=now,
    )


def _backoff(errors: int, rng: random.Random) -> float:
    """1 s doubling to 30 s, jittered down to half."""
    return float(min(ERROR_BACKOFF_MAX, ERROR_BACKOFF_START * 2.0 ** (errors - 1)) * (0.5 + rng.random() / 2))


def after_error(lease: LeaseState, now: float, rng: random.Random) -> LeaseState:
    """Back off with jitter, but try once more shortly before expiry rather than after it."""
    errors = lease.errors + 1
    retry = now + _backoff(errors, rng)
    last_chance = lease.expires_at - min(1.0, (lease.expires_at - now) / 2)
    if now < last_chance < retry:
        retry = last_chance
    return replace(lease, errors=errors, next_renewal=retry)


def next_wake(lease: LeaseState, configured: float | None) -> float:
    """The next moment this lease needs the renewer (expiry itself is the loop's to watch).

    An unprobed lease has no rotation time yet: its probe comes first (see unprobed_lease).
    """
    times = []
    if lease.rotating:
        times.append(lease.retry_at)
    elif lease.probed:
        times.append(rotate_at(lease, configured))
    if lease.renewable and lease.next_renewal < lease.expires_at:
        times.append(lease.next_renewal)
    return min(times, default=FAR)


# -- the thread -----------------------------------------------------------------------


@dataclass(frozen=True)
class Rotate:
    path: str
    lease_id: str  # the lease this is about; stale once the path has a newer one
    reason: str


@dataclass(frozen=True)
class Refresh:
    path: str


@dataclass
class TokenState:
    issued_at: float = 0.0
    deadline: float = FAR  # its max TTL; FAR for a token that never expires
    expires_at: float = FAR
    renewable: bool = False
    ttl: float = 0.0  # what each renewal asks for
    next_renewal: float = FAR
    # AppRole: log in again halfway to the deadline, so that every lease made with this
    # token (rotated 1/3 of its life before the deadline) is rotated with the next token.
    next_relogin: float = FAR
    errors: int = 0

    def next_action(self) -> float:
        return min(self.next_renewal, self.next_relogin)


@dataclass
class _Shared:
    leases: dict[str, LeaseState] = field(default_factory=dict)
    refresh: dict[str, float] = field(default_factory=dict)  # path -> next refresh time


class Renewer(threading.Thread):
    """Keeps leases and the token alive; posts Rotate, Expired and Refresh events."""

    def __init__(
        self,
        client: "VaultClient",
        post: Callable[[object], None],
        rotate_before: float | None,
        refresh_interval: float,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(name="secret-init-renewer", daemon=True)
        self.client = client
        self.post = post
        self.configured_rotate_before = rotate_before
        self.refresh_interval = refresh_interval
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self.token = TokenState()
        self._state = _Shared()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._token_unknown = False  # the first lookup failed: the thread retries it first

    # -- called from the main loop ---------------------------------------------------------

    def track(self, path: str, lease_id: str, duration: float, renewable: bool, issued_at: float) -> None:
        """Follow a new lease. No Vault call here: the thread probes its max TTL later."""
        token_deadline = self.token.deadline
        if renewable:
            lease = unprobed_lease(
                path, lease_id, duration, issued_at, token_deadline, self.configured_rotate_before, self.rng
            )
        else:  # it can only expire: its TTL is its whole life
            deadline = min(issued_at + duration, token_deadline)
            lease = new_lease(path, lease_id, duration, False, issued_at, deadline, self.rng)
        with self._lock:
            self._state.leases[path] = lease
        self._wake.set()
        now = self.clock()
        log.info("lease tracked", path=path, lease_id=lease_id, ttl=round(lease.expires_at - now, 1))

    def watch_static(self, path: str) -> None:
        with self._lock:
            self._state.refresh[path] = self.clock() + self.refresh_interval
        self._wake.set()

    def refreshed(self, path: str) -> None:
        self.watch_static(path)

    def rotation_failed(self, path: str) -> None:
        """Try rotating again after a backoff; the lease keeps its expiry."""
        now = self.clock()
        with self._lock:
            lease = self._state.leases.get(path)
            if lease is not None:
                errors = lease.errors + 1
                self._state.leases[path] = replace(lease, errors=errors, retry_at=now + _backoff(errors, self.rng))
        self._wake.set()

    def expire(self, path: str, lease_id: str) -> bool:
        """Mark the lease expired; True the first time, so on_expiry is applied once."""
        with self._lock:
            lease = self._state.leases.get(path)
            if lease is None or lease.lease_id != lease_id or lease.expired:
                return False
            self._state.leases[path] = replace(lease, expired=True, rotating=True)
            return True

    def forget(self, path: str) -> None:
        with self._lock:
            self._state.leases.pop(path, None)
            self._state.refresh.pop(path, None)

    def snapshot(self) -> dict[str, LeaseState]:
        with self._lock:
            return dict(self._state.leases)

    def stop(self, timeout: float) -> None:
        """Stop and wait for the thread, so nothing renews or logs in behind the shutdown."""
        self._stopping = True
        self._wake.set()
        if self.is_alive():
            self.join(timeout)

    # -- the thread ---------------------------------------------------------------------

    def learn_token(self) -> None:
        """Learn the current token's deadline; called before the first lease is tracked."""
        now = self.clock()
        info = self.client.token_info()
        self.token = TokenState(
            issued_at=now,
            deadline=now + info.max_remaining - TTL_GRANULARITY,
            expires_at=now + info.ttl,
            renewable=info.renewable,
            ttl=info.ttl,
            next_renewal=renewal_time(now, info.ttl, grace_for(info.ttl, self.rng)) if info.renewable else FAR,
            next_relogin=now + info.max_remaining / 2 if self.client.owns_token else FAR,
        )
        log.info(
            "token tracked",
            ttl=info.ttl,
            renewable=info.renewable,
            max_remaining=None if info.max_remaining == FAR else round(info.max_remaining, 1),
        )

    def look_up_token(self) -> None:
        """Learn the token's limits before the first lease is tracked.

        If Vault does not answer now (the app is already running), the thread keeps
        asking before it tends anything, and then caps the leases tracked meanwhile.
        A refusal (a policy without lookup-self, say) will not pass: it ends the start.
        """
        try:
            self.learn_token()
        except SecretInitError as e:
            if e.exit_code != 69:
                raise
            log.warning("could not look up the vault token; retrying in the background", error=str(e))
            self._token_unknown = True

    def _learn_token_late(self) -> bool:
        try:
            self.learn_token()
        except SecretInitError as e:
            self.token.errors += 1
            log.warning("vault token lookup failed, retrying", error=str(e))
            return False
        deadline = self.token.deadline
        with self._lock:  # every lease so far was made with this, the first, token
            for path, lease in self._state.leases.items():
                capped = min(lease.deadline, deadline)
                self._state.leases[path] = replace(
                    lease, token_deadline=min(lease.token_deadline, deadline), deadline=capped,
                    expires_at=min(lease.expires_at, capped),
                )  # fmt: skip
        self._token_unknown = False
        return True

    def run(self) -> None:
        while not self._stopping:
            if self._token_unknown and not self._learn_token_late():
                self._wake.wait(timeout=_backoff(self.token.errors, self.rng))
                self._wake.clear()
                continue
            try:
                self._tend_all(self.clock())
                wake = self._next_wake()
            except Exception as e:  # a bug must not end renewal silently
                log.error("renewer error", error=f"{type(e).__name__}: {e}")
                wake = self.clock() + ERROR_BACKOFF_START
            self._wake.wait(timeout=max(0.0, min(wake - self.clock(), 60.0)))
            self._wake.clear()

    def _tend_all(self, now: float) -> None:
        self._tend_token(now)
        for path in list(self.snapshot()):
            self._tend_lease(path, now)
        self._tend_refresh(now)

    def _next_wake(self) -> float:
        times = [self.token.next_action()]
        with self._lock:
            times += [next_wake(lease, self.configured_rotate_before) for lease in self._state.leases.values()]
            times += list(self._state.refresh.values())
        return min(times)

    def _tend_lease(self, path: str, now: float) -> None:
        with self._lock:
            lease = self._state.leases.get(path)
        if lease is None:
            return
        if lease.rotating:
            if now >= lease.retry_at:
                self._modify(lease, lambda s: replace(s, retry_at=FAR))
                self.post(Rotate(path, lease.lease_id, "retry after a failed rotation"))
        elif lease.probed and now >= rotate_at(lease, self.configured_rotate_before):
            self._modify(lease, lambda s: replace(s, rotating=True, retry_at=FAR))
            self.post(Rotate(path, lease.lease_id, "rotate_before reached"))
        # Renew even while a rotation is pending: it keeps the old credentials alive
        # up to the deadline if the rotation has to wait for Vault.
        if now >= lease.expires_at:
            # Too late to renew; the loop applies on_expiry. Stop waking for it.
            self._modify(lease, lambda s: replace(s, next_renewal=FAR))
        elif lease.renewable and now >= lease.next_renewal and lease.probed:
            self._renew(lease)
        elif lease.renewable and now >= lease.next_renewal:
            self._probe(lease)  # the first renewal learns the max TTL too

    def _probe(self, lease: LeaseState) -> None:
        """Learn the max TTL. The probe's renew-back is the lease's first renewal."""
        sent = self.clock()
        try:
            max_remaining, ttl = self.client.probe_lease(lease.lease_id, lease.duration)
        except SecretInitError as e:
            self._renewal_failed(lease, e)
            return
        probed = self._modify(lease, lambda s: after_probe(s, sent, max_remaining, ttl, self.rng))
        now = self.clock()
        if probed is not None:
            log.info(
                "lease max TTL learned",
                path=lease.path,
                lease_id=lease.lease_id,
                ttl=ttl,
                deadline_in=round(probed.deadline - now, 1),
                rotate_before=round(rotate_before(probed, self.configured_rotate_before), 1),
            )

    def _renew(self, lease: LeaseState) -> None:
        try:
            ttl = self.client.renew_lease(lease.lease_id, lease.duration)
        except SecretInitError as e:
            self._renewal_failed(lease, e)
            return
        now = self.clock()
        if self._modify(lease, lambda s: after_renewal(s, now, ttl, self.rng)):
            log.info("lease renewed", lease_id=lease.lease_id, ttl=ttl)

    def _renewal_failed(self, lease: LeaseState, error: SecretInitError) -> None:
        if error.exit_code == 69:  # Vault unreachable: keep trying until the deadline
            log.warning("lease renewal failed, retrying", lease_id=lease.lease_id, error=str(error))
            self._modify(lease, lambda s: after_error(s, self.clock(), self.rng))
            return
        # Refused (revoked, or expired): rotate, once. A lease rotated away meanwhile is left alone.
        marked: list[bool] = []

        def mark(state: LeaseState) -> LeaseState:
            if state.rotating:
                return state
            marked.append(True)
            return replace(state, rotating=True, retry_at=FAR, probed=True)

        if self._modify(lease, mark) and marked:
            log.warning("lease renewal refused; rotating", lease_id=lease.lease_id, error=str(error))
            self.post(Rotate(lease.path, lease.lease_id, "renewal refused"))

    def _modify(self, seen: LeaseState, change: Callable[[LeaseState], LeaseState]) -> LeaseState | None:
        """Apply `change` to the current state of the lease `seen` was a snapshot of.

        None when that lease is no longer tracked (rotated away meanwhile): nothing changes.
        """
        with self._lock:
            current = self._state.leases.get(seen.path)
            if current is None or current.lease_id != seen.lease_id:
                return None
            changed = self._state.leases[seen.path] = change(current)
            return changed

    def _tend_token(self, now: float) -> None:
        token = self.token
        if now >= token.next_relogin:
            self._relogin(now)
            return
        if now < token.next_renewal:
            return
        if now >= token.expires_at:
            token.next_renewal = FAR  # expired: only a re-login can help now
            log.error("vault token expired")
            return
        try:
            ttl = self.client.renew_token(token.ttl)
        except SecretInitError as e:
            token.errors += 1
            token.next_renewal = now + _backoff(token.errors, self.rng)
            log.warning("token renewal failed", error=str(e))
            return
        now = self.clock()
        token.errors = 0
        token.expires_at = min(now + ttl, token.deadline)
        token.next_renewal = renewal_time(now, token.expires_at - now, grace_for(ttl, self.rng))
        log.info("token renewed", ttl=ttl)

    def _relogin(self, now: float) -> None:
        token = self.token
        try:
            self.client.login()
        except SecretInitError as e:
            token.errors += 1
            token.next_relogin = now + _backoff(token.errors, self.rng)
            log.warning("token re-login failed", error=str(e))
            return
        log.info("token re-login", reason="halfway to the token's max TTL")
        try:
            self.learn_token()
        except SecretInitError as e:
            # Logged in, but the new token's limits are unknown: renew it, never log in again for this.
            self.token = TokenState(issued_at=now, renewable=True, ttl=token.ttl, next_renewal=now + 1)
            log.warning("could not look up the new token", error=str(e))

    def _tend_refresh(self, now: float) -> None:
        with self._lock:
            due = [path for path, at in self._state.refresh.items() if now >= at]
            for path in due:
                self._state.refresh[path] = FAR  # until the loop reports it refreshed
        for path in due:
            self.post(Refresh(path))
