"""Renewal: a pure schedule, and the thread that follows it.

The schedule is Vault's lifetime-watcher rule. After each renewal it sleeps 2/3 of the
remaining time plus 1/3 of a random 10-20% grace. On errors it backs off with jitter, but
never past the deadline. A lease's deadline is min(its max TTL, its token's max TTL),
because a lease dies with the token that created it. Vault does not report a max TTL:
the thread learns it with a probe at the lease's first renewal, so tracking a lease
costs no Vault call. When less than `rotate_before` is
left, or renewal is refused, the thread reports "rotate this path". It never writes files
or touches processes: the one loop in loop.py decides what happens.

Retries never overshoot an expiry: within URGENT of it (or past it, during on_expiry's
grace) a failed renewal or rotation is tried again about once a second, with jitter, so new
credentials arrive a second or two after any Vault node answers again. Renewals and
rotations count their failures apart: an outage's renewal failures do not delay the first
rotation retry after it.

The renewer is the one owner of lease state; the loop gets snapshots and tells it of new
leases. After a rotation that signalled the app, the loop hands it the old lease to hold:
held leases are renewed until the loop revokes them. Every decision is a pure function of
(state, now, rng) below; the thread only carries them out. The token follows the same rule.
"""

import math
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import structlog

from secret_init.errors import RequestRejected, SecretInitError
from secret_init.metrics import NO_METRICS, Recorder

if TYPE_CHECKING:
    from secret_init.model import Lease
    from secret_init.vault import RetiredToken, TokenInfo, VaultClient

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
# Near an expiry, retries come about this often (jittered by a quarter either way).
SOON = 1.0
# A retry this close to expiry (or a backoff reaching past it) switches to retrying SOON.
URGENT = 1.0
# The last renewal try is at least this long before expiry, and this long after the one before.
LAST_TRY_MARGIN = 0.25


# -- the pure schedule ------------------------------------------------------------------


class LeaseState(NamedTuple):
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
    rotated_at: float | None = None  # when the rotation that brought this lease finished
    revocable: bool = True  # False for an issued certificate without a Vault lease (lease_id is its serial)
    serial: str | None = None  # an issued certificate's
    rotation_errors: int = 0  # failed rotations in a row (`errors` counts failed renewals)
    gave_up: bool = False  # expired, and expiry_grace passed: on_expiry was applied

    @property
    def lifetime(self) -> float:
        return self.deadline - self.issued_at


def grace_for(duration: float, rng: random.Random) -> float:
    """A random 10-20% of the lease duration, as Vault's lifetime watcher uses."""
    return duration * (0.1 + 0.1 * rng.random())


def new_lease(
    path: str, lease_id: str, duration: float, renewable: bool, now: float, deadline: float, rng: random.Random
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
    return lease._replace(probed=False, next_renewal=probe_at, token_deadline=token_deadline)


def after_probe(lease: LeaseState, now: float, max_remaining: float, ttl: float, rng: random.Random) -> LeaseState:
    """The probe, sent at `now`, renewed the lease to `ttl` and found its max TTL `max_remaining` away.

    The lease's life still starts at its issue: rotate_before is a share of all of it.
    """
    deadline = min(now + max_remaining - min(TTL_GRANULARITY, max_remaining / 2), lease.token_deadline)
    return after_renewal(lease._replace(deadline=deadline, probed=True), now, ttl, rng)


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
    return lease._replace(
        expires_at=expires,
        grace=grace,
        next_renewal=renewal_time(now, expires - now, grace),
        errors=0,
        last_renewal=now,
    )


def _backoff(errors: int, rng: random.Random) -> float:
    """1 s doubling to 30 s, jittered down to half."""
    return float(min(ERROR_BACKOFF_MAX, ERROR_BACKOFF_START * 2.0 ** (errors - 1)) * (0.5 + rng.random() / 2))


def _soon(rng: random.Random) -> float:
    """About SOON seconds, jittered by a quarter either way: many instances do not retry in step."""
    return SOON * (0.75 + rng.random() / 2)


def after_error(lease: LeaseState, now: float, rng: random.Random) -> LeaseState:
    """Back off with jitter; near expiry, try about once a second, the last try just before it.

    No try is sent in the last LAST_TRY_MARGIN, nor closer than that to the one before: once
    no try fits, next_renewal is FAR and rotation takes over (see renewal_gave_out).
    """
    errors = lease.errors + 1
    retry = now + _backoff(errors, rng)
    if retry > lease.expires_at - URGENT:
        retry = min(now + _soon(rng), lease.expires_at - LAST_TRY_MARGIN)
        if retry < now + LAST_TRY_MARGIN:
            retry = FAR
    return lease._replace(errors=errors, next_renewal=retry)


def renewal_gave_out(lease: LeaseState) -> tuple[LeaseState, bool]:
    """No renewal try fits before expiry any more: rotate now, unless a rotation is already out."""
    if lease.next_renewal != FAR or lease.rotating or not lease.renewable:
        return lease, False
    return lease._replace(rotating=True, retry_at=FAR), True


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


class LeaseDecision(NamedTuple):
    """What tending one lease at `now` means: its new state, a rotation to report, a Vault call."""

    state: LeaseState
    rotate: str | None = None  # the reason, when a Rotate event is due
    call: str | None = None  # "renew" or "probe"


def decide_lease(lease: LeaseState, now: float, configured: float | None) -> LeaseDecision:
    rotate = None
    if lease.rotating:
        if now >= lease.retry_at:
            lease, rotate = lease._replace(retry_at=FAR), "retry after a failed rotation"
    elif lease.probed and now >= rotate_at(lease, configured):
        lease, rotate = lease._replace(rotating=True, retry_at=FAR), "rotate_before reached"
    # Renew even while a rotation is pending: it keeps the old credentials alive up to
    # the deadline if the rotation has to wait for Vault.
    if now >= lease.expires_at:
        # Too late to renew; the loop applies on_expiry. Stop waking for it.
        return LeaseDecision(lease._replace(next_renewal=FAR), rotate)
    if lease.renewable and now >= lease.next_renewal:
        return LeaseDecision(lease, rotate, "renew" if lease.probed else "probe")  # a probe renews too
    return LeaseDecision(lease, rotate)


def after_refusal(lease: LeaseState) -> tuple[LeaseState, bool]:
    """Vault refused a renewal (revoked, expired): rotate, unless a rotation is already out.

    Either way it is not renewed again: Vault would only refuse once more.
    """
    if lease.rotating:
        return lease._replace(next_renewal=FAR), False
    return lease._replace(rotating=True, retry_at=FAR, probed=True, next_renewal=FAR), True


def after_rotation_failed(lease: LeaseState, now: float, rng: random.Random) -> LeaseState:
    """Try rotating again after a backoff; near or past expiry (until on_expiry acts), about once a second."""
    errors = lease.rotation_errors + 1
    delay = _backoff(errors, rng)
    if not lease.gave_up and now + delay > lease.expires_at - URGENT:
        delay = min(delay, _soon(rng))
    return lease._replace(rotation_errors=errors, retry_at=now + delay)


def after_expiry(lease: LeaseState, now: float) -> LeaseState:
    """It expired unrotated: rotate at once, unless a rotation is out or due (the grace starts now)."""
    if lease.rotating:
        return lease._replace(expired=True)
    return lease._replace(expired=True, rotating=True, retry_at=now)


def retry_now(lease: LeaseState, now: float, rng: random.Random) -> LeaseState:
    """Vault answered another request: an expired lease's rotation waiting out a backoff (`keep` past its
    grace) is tried again about now. Only an expired one: a rotation that fails for another reason (files
    that cannot be written) keeps its backoff, since each try issues new credentials."""
    if not (lease.expired and lease.rotating) or lease.retry_at == FAR or lease.retry_at <= now + SOON:
        return lease
    return lease._replace(retry_at=now + _soon(rng) / 4)


def held_renewal(lease: LeaseState, now: float) -> bool:
    """A held lease (the app may still use it) is due for renewal."""
    return lease.renewable and lease.next_renewal <= now < lease.expires_at


def capped_by_token(lease: LeaseState, token_deadline: float, configured: float | None) -> LeaseState:
    """A lease tracked before its token's limits were known: it dies with that token.

    An unprobed lease's probe moves up to its earliest possible rotation, as in unprobed_lease.
    """
    deadline = min(lease.deadline, token_deadline)
    capped = lease._replace(
        token_deadline=min(lease.token_deadline, token_deadline),
        deadline=deadline,
        expires_at=min(lease.expires_at, deadline),
    )
    if capped.probed:
        return capped
    return capped._replace(next_renewal=min(capped.next_renewal, rotate_at(capped, configured)))


# -- the token's pure schedule -----------------------------------------------------------


class TokenState(NamedTuple):
    known: bool = True  # False until a lookup-self has answered
    deadline: float = FAR  # its max TTL; FAR for a token that never expires
    expires_at: float = FAR
    renewable: bool = False
    ttl: float = 0.0  # what each renewal asks for
    next_renewal: float = FAR  # also the next lookup while not `known`
    # Log in again halfway to the deadline, so that every lease made with this token
    # (rotated 1/3 of its life before the deadline) is rotated with the next token.
    next_relogin: float = FAR
    errors: int = 0

    @property
    def next_action(self) -> float:
        return min(self.next_renewal, self.next_relogin)


def token_unknown(now: float) -> TokenState:
    return TokenState(known=False, next_renewal=now)


def token_learned(now: float, info: "TokenInfo", owned: bool, rng: random.Random) -> TokenState:
    """The token as lookup-self (and its max-TTL probe) described it at `now`."""
    return TokenState(
        deadline=now + info.max_remaining - TTL_GRANULARITY,
        expires_at=now + info.ttl,
        renewable=info.renewable,
        ttl=info.ttl,
        next_renewal=renewal_time(now, info.ttl, grace_for(info.ttl, rng)) if info.renewable else FAR,
        next_relogin=now + info.max_remaining / 2 if owned else FAR,
    )


def token_action(token: TokenState, now: float) -> str | None:
    """What the token needs now: lookup, relogin, renew, expired (reported once) or None."""
    if not token.known:
        return "lookup" if now >= token.next_renewal else None
    if now >= token.next_relogin:
        return "relogin"
    if now < token.next_renewal:
        return None
    return "expired" if now >= token.expires_at else "renew"


def token_renewed(token: TokenState, now: float, ttl: float, rng: random.Random) -> TokenState:
    expires = min(now + ttl, token.deadline)
    return token._replace(
        errors=0, expires_at=expires, next_renewal=renewal_time(now, expires - now, grace_for(ttl, rng))
    )


def token_failed(token: TokenState, action: str, now: float, rng: random.Random) -> TokenState:
    """Back off the failed action: a lookup or renewal, or a re-login. A renewal near expiry: about once a second."""
    errors = token.errors + 1
    retry = now + _backoff(errors, rng)
    if action == "relogin":
        if now >= token.expires_at:  # no token at all: every rotation waits on this one
            retry = now + _soon(rng)
        return token._replace(errors=errors, next_relogin=retry)
    if action == "renew" and retry > token.expires_at - URGENT:
        retry = min(retry, now + _soon(rng))
    return token._replace(errors=errors, next_renewal=retry)


# -- the thread -----------------------------------------------------------------------


class Rotate(NamedTuple):
    path: str
    lease_id: str  # the lease this is about; stale once the path has a newer one
    reason: str


class Refresh(NamedTuple):
    path: str


R = TypeVar("R")


class Renewer(threading.Thread):
    """Keeps leases and the token alive; posts Rotate and Refresh events. Owns all lease state."""

    def __init__(
        self,
        client: "VaultClient",
        post: Callable[[object], None],
        rotate_before: float | None,
        refresh_interval: float,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        metrics: Recorder = NO_METRICS,
    ) -> None:
        super().__init__(name="secret-init-renewer", daemon=True)
        self.metrics = metrics
        self.client = client
        self.post = post
        self.configured_rotate_before = rotate_before
        self.refresh_interval = refresh_interval
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self.token = TokenState()  # the thread's alone, once it runs
        # Tokens a re-login replaced: Vault revokes a token's leases when it expires, so each is
        # renewed until its own deadline, by which its leases were rotated onto a newer token.
        self.retired: list[tuple[RetiredToken, TokenState]] = []
        self._leases: dict[str, LeaseState] = {}
        self._held: dict[str, LeaseState] = {}  # lease id -> a rotated-away lease the app may still use
        self._refresh: dict[str, float] = {}  # path -> next refresh time
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False

    # -- called from the main loop ---------------------------------------------------------

    def track(self, path: str, lease: "Lease", rotated_at: float | None = None) -> LeaseState | None:
        """Follow a new lease for `path`; the state of the one it replaces. No Vault call: the thread probes later."""
        # A certificate without a Vault lease does not die with the token that issued it.
        token_deadline = self.token.deadline if lease.revocable else FAR
        if lease.renewable:
            state = unprobed_lease(
                path, lease.lease_id, lease.duration, lease.issued_at, token_deadline,
                self.configured_rotate_before, self.rng,
            )  # fmt: skip
        else:  # it can only expire: its TTL is its whole life
            deadline = min(lease.issued_at + lease.duration, token_deadline)
            state = new_lease(path, lease.lease_id, lease.duration, False, lease.issued_at, deadline, self.rng)
        state = state._replace(
            token_deadline=token_deadline, rotated_at=rotated_at, revocable=lease.revocable, serial=lease.serial
        )
        with self._lock:
            replaced = self._leases.get(path)
            self._leases[path] = state
        self._wake.set()
        log.info("lease tracked", path=path, lease_id=lease.lease_id, ttl=round(state.expires_at - self.clock(), 1))
        return replaced

    def hold(self, lease: LeaseState) -> None:
        """Keep renewing a rotated-away lease the app may still use, until release(): a signalled app
        switches to the new credentials in its own time."""
        held = lease._replace(rotating=False, retry_at=FAR)
        if not lease.renewable:  # it only expires (a certificate's lease): nothing to wake for
            held = held._replace(next_renewal=FAR)
        with self._lock:
            self._held[lease.lease_id] = held
        self._wake.set()

    def release(self, lease_id: str) -> float | None:
        """Stop holding a lease (it is about to be revoked); its expiry, when it was held."""
        with self._lock:
            held = self._held.pop(lease_id, None)
        return held.expires_at if held is not None else None

    def watch_static(self, path: str) -> None:
        """Re-read `path` every refresh_interval (a static secret that may change); also after each refresh."""
        with self._lock:
            self._refresh[path] = self.clock() + self.refresh_interval
        self._wake.set()

    def rotation_failed(self, path: str) -> None:
        now = self.clock()
        with self._lock:
            lease = self._leases.get(path)
            if lease is not None:
                lease = self._leases[path] = after_rotation_failed(lease, now, self.rng)
        self._wake.set()
        if lease is not None:
            log.warning(
                "rotation failed, retrying",
                path=path,
                lease_id=lease.lease_id,
                failures=lease.rotation_errors,
                retry_in=round(lease.retry_at - now, 2),
            )

    def expire(self, path: str, lease_id: str) -> bool:
        """Mark the lease expired and rotate it at once; True the first time (its expiry_grace starts)."""
        now = self.clock()
        with self._lock:
            lease = self._leases.get(path)
            # Re-checked here: a renewal may have answered since the loop's snapshot.
            if lease is None or lease.lease_id != lease_id or lease.expired or now < lease.expires_at:
                return False
            self._leases[path] = after_expiry(lease, now)
        self._wake.set()
        return True

    def give_up(self, path: str, lease_id: str) -> bool:
        """Its expiry_grace passed unrotated; True the first time, so on_expiry is applied once."""
        with self._lock:
            lease = self._leases.get(path)
            if lease is None or lease.lease_id != lease_id or lease.gave_up:
                return False
            self._leases[path] = lease._replace(gave_up=True)
            return True

    def forget(self, path: str) -> None:
        with self._lock:
            self._leases.pop(path, None)

    def snapshot(self) -> dict[str, LeaseState]:
        with self._lock:
            return dict(self._leases)

    def stop(self, timeout: float) -> None:
        """Stop and wait for the thread, so nothing renews or logs in behind the shutdown."""
        self._stopping = True
        self._wake.set()
        if self.is_alive():
            self.join(timeout)

    # -- before the thread starts ---------------------------------------------------------

    def look_up_token(self) -> None:
        """Learn the token's limits, and cap the leases tracked so far (all made with this token).

        If Vault does not answer now (the app is already running), the thread keeps
        asking before it tends anything. A refusal (a policy without lookup-self, say)
        will not pass: it ends the start.
        """
        try:
            self._learn_token()
            self._cap_leases_by_token()
        except SecretInitError as e:
            if e.exit_code != 69:
                raise
            log.warning("could not look up the vault token; retrying in the background", error=str(e))
            self.token = token_unknown(self.clock())

    # -- the thread ---------------------------------------------------------------------

    def run(self) -> None:
        while not self._stopping:
            try:
                wake = self.step()
            except Exception as e:  # a bug must not end renewal silently
                log.error("renewer error", error=f"{type(e).__name__}: {e}")
                wake = self.clock() + ERROR_BACKOFF_START
            self._wake.wait(timeout=max(0.0, min(wake - self.clock(), 60.0)))
            self._wake.clear()

    def step(self) -> float:
        """Do what is due now; the time of the next duty. The thread's body, and the tests' handle."""
        now = self.clock()
        self._tend_token(now)
        self._tend_retired(now)
        retired_times = [state.next_renewal for _, state in self.retired]
        if not self.token.known:  # leases wait for the token's limits: they cap every deadline
            return min([self.token.next_action, *retired_times])
        for path in list(self.snapshot()):
            self._tend_lease(path, now)
        self._tend_held(now)
        self._tend_refresh(now)
        times = [self.token.next_action, *retired_times]
        with self._lock:
            times += [next_wake(lease, self.configured_rotate_before) for lease in self._leases.values()]
            times += [held.next_renewal for held in self._held.values() if held_renewal(held, held.next_renewal)]
            times += list(self._refresh.values())
        return min(times)

    def _tend_lease(self, path: str, now: float) -> None:
        with self._lock:
            seen = self._leases.get(path)
        if seen is None:
            return

        def decide(state: LeaseState) -> tuple[LeaseState, LeaseDecision]:
            decision = decide_lease(state, now, self.configured_rotate_before)
            return decision.state, decision

        decision = self._update(seen, decide)
        if decision is None:
            return
        if decision.rotate is not None:
            self.post(Rotate(path, seen.lease_id, decision.rotate))
        if decision.call == "probe":
            self._probe(decision.state)
        elif decision.call == "renew":
            self._renew(decision.state)

    def _probe(self, lease: LeaseState) -> None:
        """Learn the max TTL. The probe's renew-back is the lease's first renewal."""
        sent = self.clock()
        try:
            max_remaining, ttl = self.client.probe_lease(lease.lease_id, lease.duration)
        except SecretInitError as e:
            self._renewal_failed(lease, e)
            return
        self.metrics.renewal(ok=True)
        self._vault_answered()

        def probed_state(state: LeaseState) -> tuple[LeaseState, LeaseState]:
            probed = after_probe(state, sent, max_remaining, ttl, self.rng)
            return probed, probed

        probed = self._update(lease, probed_state)
        if probed is not None:
            log.info(
                "lease max TTL learned",
                path=lease.path,
                lease_id=lease.lease_id,
                ttl=ttl,
                deadline_in=round(probed.deadline - self.clock(), 1),
                rotate_before=round(rotate_before(probed, self.configured_rotate_before), 1),
            )

    def _renew(self, lease: LeaseState) -> None:
        try:
            ttl = self.client.renew_lease(lease.lease_id, lease.duration)
        except SecretInitError as e:
            self._renewal_failed(lease, e)
            return
        self.metrics.renewal(ok=True)
        self._vault_answered()
        now = self.clock()
        if self._update(lease, lambda s: (after_renewal(s, now, ttl, self.rng), True)):
            log.info("lease renewed", lease_id=lease.lease_id, ttl=ttl)

    def _renewal_failed(self, lease: LeaseState, error: SecretInitError) -> None:
        self.metrics.renewal(ok=False)
        if error.exit_code == 69:  # Vault unreachable: keep trying until the expiry
            now = self.clock()

            def retried(state: LeaseState) -> tuple[LeaseState, tuple[LeaseState, bool]]:
                state, rotate = renewal_gave_out(after_error(state, now, self.rng))
                return state, (state, rotate)

            outcome = self._update(lease, retried)
            if outcome is None:
                return
            state, rotate = outcome
            retry_in = None if state.next_renewal == FAR else round(state.next_renewal - now, 2)
            log.warning("lease renewal failed, retrying", lease_id=lease.lease_id, error=str(error),
                        retry_in=retry_in, expires_in=round(state.expires_at - now, 2))  # fmt: skip
            if rotate:
                log.warning("no renewal fits before expiry; rotating", path=lease.path, lease_id=lease.lease_id)
                self.post(Rotate(lease.path, lease.lease_id, "renewal failed near expiry"))
        elif self._update(lease, after_refusal):  # a lease rotated away meanwhile is left alone
            log.warning("lease renewal refused; rotating", lease_id=lease.lease_id, error=str(error))
            self.post(Rotate(lease.path, lease.lease_id, "renewal refused"))

    def _vault_answered(self) -> None:
        """A renewal went through: Vault serves again, so expired leases' rotations backing off (`keep` past its
        grace, up to 30 s) are tried again at once rather than at their backoff's end."""
        now = self.clock()
        with self._lock:
            for path, lease in self._leases.items():
                self._leases[path] = retry_now(lease, now, self.rng)

    def _update(self, seen: LeaseState, change: Callable[[LeaseState], tuple[LeaseState, R]]) -> R | None:
        """Apply `change` to the current state of the lease `seen` was a snapshot of; its result.

        None when that lease is no longer tracked (rotated away meanwhile): nothing changes.
        """
        with self._lock:
            current = self._leases.get(seen.path)
            if current is None or current.lease_id != seen.lease_id:
                return None
            self._leases[seen.path], result = change(current)
            return result

    # -- the token ------------------------------------------------------------------------

    def _tend_token(self, now: float) -> None:
        action = token_action(self.token, now)
        if action is None:
            return
        if action == "expired":
            # Its leases die with it: each is rotated now (the loop sees them expired), onto a new token when
            # secret-init logged in for this one (at once, then about once a second); a supplied one cannot be.
            relogin = now if self.client.owns_token else FAR
            self.token = self.token._replace(next_renewal=FAR, next_relogin=relogin)
            with self._lock:
                for path, lease in self._leases.items():
                    if lease.revocable and lease.expires_at > self.token.expires_at:
                        self._leases[path] = lease._replace(expires_at=self.token.expires_at, next_renewal=FAR)
            log.error("vault token expired", relogin=self.client.owns_token)
            return
        try:
            if action == "lookup":
                self._learn_token()
                self._cap_leases_by_token()
            elif action == "relogin":
                self._relogin(now, "the token expired" if now >= self.token.expires_at else "halfway to its max TTL")
            else:
                ttl = self.client.renew_token(self.token.ttl)
                self.token = token_renewed(self.token, self.clock(), ttl, self.rng)
                self.metrics.renewal(ok=True)
                self._vault_answered()
                log.info("token renewed", ttl=ttl)
        except SecretInitError as e:
            if action == "renew":
                self.metrics.renewal(ok=False)
            self.token = token_failed(self.token, action, now, self.rng)
            retry = self.token.next_relogin if action == "relogin" else self.token.next_renewal
            log.warning("vault token request failed, retrying", action=action, error=str(e),
                        retry_in=round(retry - now, 2))  # fmt: skip

    def _learn_token(self) -> None:
        now = self.clock()
        info = self.client.token_info()
        self.token = token_learned(now, info, self.client.owns_token, self.rng)
        log.info(
            "token tracked",
            ttl=info.ttl,
            renewable=info.renewable,
            max_remaining=None if info.max_remaining == FAR else round(info.max_remaining, 1),
        )

    def _cap_leases_by_token(self) -> None:
        with self._lock:  # every lease so far was made with this, the first, token
            for path, lease in self._leases.items():
                if lease.revocable:  # a certificate without a Vault lease outlives the token
                    self._leases[path] = capped_by_token(lease, self.token.deadline, self.configured_rotate_before)

    def _relogin(self, now: float, reason: str) -> None:
        previous, state = self.client.relogin(), self.token
        log.info("token re-login", reason=reason)
        if previous is None:
            return
        if state.known and now < min(state.deadline, state.expires_at):
            self.retired.append((previous, state))  # renewed if it can be; revoked at exit either way
        else:
            self.client.release(previous)
        try:
            self._learn_token()
        except SecretInitError as e:
            # Its limits unknown: look it up again after a backoff, as at the start.
            self.token = token_failed(token_unknown(now), "lookup", now, self.rng)
            log.warning("could not look up the new token", error=str(e))

    def _tend_retired(self, now: float) -> None:
        """Renew each replaced token on its own schedule until its deadline; then it is let go."""
        kept = []
        for retired, state in self.retired:
            if now >= min(state.deadline, state.expires_at):
                self.client.release(retired)  # gone: at its max TTL, or expired after failed renewals
                continue
            if now >= state.next_renewal:
                try:
                    ttl = self.client.renew_retired(retired, state.ttl)
                    state = token_renewed(state, self.clock(), ttl, self.rng)
                    self.metrics.renewal(ok=True)
                    log.debug("previous token renewed", ttl=ttl)
                except SecretInitError as e:
                    self.metrics.renewal(ok=False)
                    if e.exit_code != 69:  # refused: no retry mends that; its leases are rotated or die with it
                        log.warning("previous vault token renewal refused; letting it go", error=str(e))
                        self.client.release(retired)
                        continue
                    state = token_failed(state, "renew", now, self.rng)
                    log.warning("previous vault token renewal failed, retrying", error=str(e),
                                retry_in=round(state.next_renewal - now, 2))  # fmt: skip
            kept.append((retired, state))
        self.retired = kept

    def retired_tokens(self) -> list["RetiredToken"]:
        """For the shutdown's revokes, once the thread has stopped."""
        return [retired for retired, state in self.retired if self.clock() < min(state.deadline, state.expires_at)]

    def _tend_held(self, now: float) -> None:
        """Renew each held lease on its own schedule; one past its expiry is renewed no more (nothing renews it
        back), but kept until release(): its expiry tells the loop not to revoke it."""
        with self._lock:
            expired = [i for i, held in self._held.items() if now >= held.expires_at and held.next_renewal != FAR]
            for lease_id in expired:
                self._held[lease_id] = self._held[lease_id]._replace(next_renewal=FAR)
            due = [held for held in self._held.values() if held_renewal(held, now)]
        for lease_id in expired:
            log.info("previous lease expired before its revoke", lease_id=lease_id)
        for held in due:
            try:
                ttl = self.client.renew_lease(held.lease_id, held.duration)
            except SecretInitError as e:
                self.metrics.renewal(ok=False)
                if e.exit_code != 69:  # refused: renewed no more; "lease not found" (a 400): gone, so not revoked
                    gone = isinstance(e, RequestRejected)
                    with self._lock:
                        if held.lease_id in self._held:
                            end = self.clock() if gone else held.expires_at
                            self._held[held.lease_id] = held._replace(next_renewal=FAR, expires_at=end)
                    log.warning("previous lease renewal refused", lease_id=held.lease_id, error=str(e))
                    continue
                state = after_error(held, self.clock(), self.rng)
                retry_in = None if state.next_renewal == FAR else round(state.next_renewal - now, 2)
                log.warning("previous lease renewal failed, retrying", lease_id=held.lease_id, error=str(e),
                            retry_in=retry_in)  # fmt: skip
            else:
                self.metrics.renewal(ok=True)
                state = after_renewal(held, self.clock(), ttl, self.rng)
                log.info("previous lease renewed", lease_id=held.lease_id, ttl=ttl)
            with self._lock:
                if held.lease_id in self._held:  # not released meanwhile
                    self._held[held.lease_id] = state

    def _tend_refresh(self, now: float) -> None:
        with self._lock:
            due = [path for path, at in self._refresh.items() if now >= at]
            for path in due:
                self._refresh[path] = FAR  # until the loop reports it refreshed
        for path in due:
            self.post(Refresh(path))
