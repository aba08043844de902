"""Renewer and Supervised decisions on a scripted clock, against a SCRIPTED Vault.

The Vault is scripted on purpose: these tests check decisions (when to probe, renew,
log in again, rotate, back off, give up) in milliseconds, with faults timed to the
instant, which a real server cannot give on demand. The real-service tests
(tests/test_leases.py, tests/test_tls_rotation.py) stay as they are.

Nothing sleeps: the clock is a number; `Renewer.step()` is called by hand, and
`Supervised` runs with `threaded=False` and takes one event at a time (`step(0)`).
The loop runs in sidecar mode (no command), so no process is started.

This file complements tests/test_scripted_clock.py (the same seams): it covers a
configured rotate_before, a refused renewal after the probe, the token's re-login and
its failures, the loop's answer to a refused probe, a token-capped rotation after a
re-login, an outage ridden out with status.json, the retry spacing after expiry, stale
events, SIGTERM with the shutdown's revokes, and the refresh of a static secret.
"""

import itertools
import json
import math
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from secret_init import privileges
from secret_init.config import load_text
from secret_init.errors import PermissionRefusedError, VaultUnavailableError
from secret_init.loop import Supervised
from secret_init.materialize import Materialized, output_files
from secret_init.model import Hidden, Lease, Material
from secret_init.renewal import (
    ERROR_BACKOFF_MAX,
    FAR,
    TTL_GRANULARITY,
    Renewer,
    Rotate,
    TokenState,
    token_action,
    token_failed,
    token_learned,
    token_renewed,
)
from secret_init.sink import Owner, Sink
from secret_init.status import STATUS_DIR, STATUS_FILE
from secret_init.supervisor import SignalEvent
from secret_init.vault import RetiredToken, TokenInfo, VaultClient, VaultSecret

DB = "database/creds/app"
KV = "secret/data/app/config"
NEVER = TokenInfo(0, False, math.inf)  # a token without a TTL (root-like): it never expires


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeVault:
    """The VaultClient methods the renewer and the loop use, answering from scripts.

    Each script is a list consumed front to back: an exception in it is raised, anything
    else returned; a dry script gives the default. Every call is recorded as
    (method, clock time, argument).
    """

    def __init__(self, clock: Clock, token: TokenInfo = NEVER) -> None:
        self.clock = clock
        self.owns_token = False
        self.calls: list[tuple[str, float, Any]] = []
        self.token = token
        self.token_infos: list[Any] = []  # TokenInfo or an exception
        self.token_renewals: list[Any] = []  # ttl or an exception
        self.retired_renewals: list[Any] = []  # ttl or an exception, for tokens a re-login replaced
        self.probes: list[Any] = []  # (max_remaining, ttl) or an exception
        self.renewals: list[Any] = []  # ttl or an exception
        self.reads: list[Any] = []  # an exception, or None for a fresh answer
        self.writes: list[Any] = []  # an exception, a VaultSecret, or None for a fresh certificate
        self.issued = 1  # lease-1 is the one the start made
        self.api_key = "key-1"  # the static secret at KV

    def _answer(self, script: list[Any], default: Any) -> Any:
        answer = script.pop(0) if script else default
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def _record(self, name: str, arg: Any = None) -> None:
        self.calls.append((name, self.clock.now, arg))

    def called(self, name: str) -> list[Any]:  # [(time, argument)]; Any: compared with pytest.approx
        return [(at, arg) for call, at, arg in self.calls if call == name]

    def times(self, name: str) -> list[float]:
        return [at for at, _ in self.called(name)]

    def end_startup(self) -> None:
        self._record("end_startup")

    def token_info(self) -> TokenInfo:
        self._record("lookup")
        return cast(TokenInfo, self._answer(self.token_infos, self.token))

    def renew_token(self, increment: float) -> float:
        self._record("renew_token", increment)
        return float(self._answer(self.token_renewals, increment))

    def login(self) -> None:
        self._record("login")

    def relogin(self) -> RetiredToken | None:
        previous = f"token-{len(self.called('login'))}" if self.owns_token else None
        self.login()
        return RetiredToken(cast(Any, previous), None) if previous else None  # the fake's "client" is a name

    def renew_retired(self, retired: RetiredToken, increment: float) -> float:
        self._record("renew_retired", (retired.client, increment))
        return float(self._answer(self.retired_renewals, increment))

    def revoke_retired(self, retired: RetiredToken) -> None:
        self._record("revoke_retired", retired.client)

    def release(self, retired: RetiredToken) -> None:
        self._record("release", retired.client)

    def probe_lease(self, lease_id: str, duration: float) -> tuple[float, float]:
        self._record("probe", (lease_id, duration))
        max_remaining, ttl = self._answer(self.probes, (1000.0, duration))
        return float(max_remaining), float(ttl)

    def renew_lease(self, lease_id: str, increment: float) -> float:
        self._record("renew", (lease_id, increment))
        return float(self._answer(self.renewals, increment))

    def revoke_lease_quietly(self, lease_id: str) -> bool:
        self._record("revoke", lease_id)
        return True

    def revoke_own_token(self) -> None:
        self._record("revoke_token")

    def write(self, path: str, params: Any, purpose: str, max_size: int = 0) -> VaultSecret:
        """A PKI issue: a new certificate without a Vault lease, or what `writes` scripts."""
        self._record("write", path)
        answer = self._answer(self.writes, None)
        if answer is not None:
            return cast(VaultSecret, answer)
        self.issued += 1
        n = self.issued
        cert = Lease(f"certificate {n:02x}", 10.0, False, self.clock.now, revocable=False, serial=f"{n:02x}")
        fields = {"username": f"user-{n}", "password": f"pw-{n}", "expiration": int(time.time()) + 10}
        return VaultSecret(path, fields, cert)

    def read(self, path: str, purpose: str, max_size: int = 0) -> VaultSecret:
        self._record("read", path)
        if path == KV:
            return VaultSecret(path, {"api_key": self.api_key}, None)
        self._answer(self.reads, None)
        self.issued += 1
        n = self.issued
        return VaultSecret(
            path, {"username": f"user-{n}", "password": f"pw-{n}"}, Lease(f"lease-{n}", 10.0, True, self.clock.now)
        )


# -- the renewer alone ------------------------------------------------------------------


def new_renewer(
    vault: FakeVault, clock: Clock, rotate_before: float | None = None, seed: int = 7
) -> tuple[Renewer, list[object]]:
    posted: list[object] = []
    renewer = Renewer(cast(VaultClient, vault), posted.append, rotate_before, 300.0, clock, random.Random(seed))
    return renewer, posted


def drive(renewer: Renewer, clock: Clock, end: float, stop: Callable[[], bool] = lambda: False) -> None:
    """Step the renewer at each time it asks for, up to `end` or until `stop()`."""
    wake = renewer.step()
    while wake <= end and not stop():
        clock.now = max(clock.now, wake)
        wake = renewer.step()


def test_with_a_configured_rotate_before_the_probe_and_renewals_land_at_70_to_73_percent() -> None:
    """rotate_before = 2s: the probe is the first renewal (70-73.4% of the TTL), then renew_lease every 70-73.4%."""
    for seed in range(5):
        clock = Clock()
        vault = FakeVault(clock)
        renewer, posted = new_renewer(vault, clock, rotate_before=2.0, seed=seed)
        renewer.look_up_token()
        renewer.track(DB, Lease("l1", 30.0, True, 0.0))
        drive(renewer, clock, 150.0)
        [(probed_at, probed)] = vault.called("probe")
        assert probed == ("l1", 30.0) and 21.0 <= probed_at <= 22.02, "70-73.4% of 30 s after issue"
        renewals = vault.called("renew")
        assert len(renewals) >= 5 and {arg for _, arg in renewals} == {("l1", 30.0)}, "asks for its TTL again"
        times = vault.times("probe") + vault.times("renew")
        assert all(21.0 <= b - a <= 22.02 for a, b in itertools.pairwise(times)), times
        assert posted == []


def test_a_refused_renewal_after_the_probe_rotates_once_and_is_not_renewed_again() -> None:
    """renew_lease refused (lease revoked behind our back): one Rotate "renewal refused", no more renewals."""
    clock = Clock()
    vault = FakeVault(clock)
    vault.renewals = [PermissionRefusedError("lease not found")]
    renewer, posted = new_renewer(vault, clock)
    renewer.look_up_token()
    renewer.track(DB, Lease("l1", 30.0, True, 0.0))
    drive(renewer, clock, 500.0)
    assert vault.times("probe") == [pytest.approx(18.0)]
    [(refused_at, _)] = vault.called("renew")
    assert 18.0 + 21.0 <= refused_at <= 18.0 + 22.0
    assert posted == [Rotate(DB, "l1", "renewal refused")]
    assert renewer.snapshot()[DB].rotating and renewer.snapshot()[DB].next_renewal == FAR


def test_leases_wait_for_a_token_lookup_that_failed_at_start_then_are_capped_by_it() -> None:
    """The start's lookup fails (outage): no probe until a lookup answers; then the lease dies with the token."""
    clock = Clock()
    vault = FakeVault(clock)
    vault.token_infos = [VaultUnavailableError("down")] * 3 + [TokenInfo(20.0, True, 25.0)]
    renewer, _ = new_renewer(vault, clock)
    renewer.track(DB, Lease("l1", 30.0, True, 0.0))
    renewer.look_up_token()  # does not raise: retried in the background
    drive(renewer, clock, 100.0, stop=lambda: bool(vault.called("probe")))
    lookups = vault.times("lookup")
    assert len(lookups) == 4 and lookups[:2] == [0.0, 0.0], "the renewer's first step asks again at once"
    assert 0.5 <= lookups[2] - lookups[1] <= 1.0 and 1.0 <= lookups[3] - lookups[2] <= 2.0, lookups
    learned = lookups[-1]
    lease = renewer.snapshot()[DB]
    assert lease.token_deadline == lease.deadline == pytest.approx(learned + 25.0 - TTL_GRANULARITY)
    assert vault.times("probe")[0] > learned, "nothing was probed before the token's limits were known"


def test_a_refused_token_lookup_at_start_ends_the_start() -> None:
    """lookup-self refused by policy: look_up_token raises the refusal (77), it is not retried."""
    clock = Clock()
    vault = FakeVault(clock)
    vault.token_infos = [PermissionRefusedError("permission denied")]
    renewer, _ = new_renewer(vault, clock)
    with pytest.raises(PermissionRefusedError) as raised:
        renewer.look_up_token()
    assert raised.value.exit_code == 77 and len(vault.called("lookup")) == 1


def test_an_owned_token_is_renewed_then_logged_in_again_halfway_to_its_max_ttl() -> None:
    """Owned token, TTL 20 s, max 60 s: renewed at ~70%, re-login at 30 s; leases after it get the new deadline."""
    clock = Clock()
    vault = FakeVault(clock, TokenInfo(20.0, True, 60.0))
    vault.owns_token = True
    renewer, _ = new_renewer(vault, clock)
    renewer.look_up_token()
    renewer.track(DB, Lease("old", 30.0, True, 0.0))
    assert renewer.snapshot()[DB].token_deadline == 60.0 - TTL_GRANULARITY
    drive(renewer, clock, 30.0)
    first_renewal = vault.called("renew_token")[0]
    assert 14.0 <= first_renewal[0] <= 14.67 and first_renewal[1] == 20.0, "2/3 of 20 s plus a third of 2-4 s"
    assert vault.times("login") == [30.0] and vault.times("lookup") == [0.0, 30.0]
    assert renewer.token.next_relogin == 60.0 and renewer.token.deadline == 89.0
    renewer.track("database/creds/other", Lease("new", 30.0, True, 30.0))
    leases = renewer.snapshot()
    assert leases[DB].token_deadline == 59.0, "a lease keeps the deadline of the token that made it"
    assert leases["database/creds/other"].token_deadline == 89.0


def test_a_certificate_without_a_vault_lease_is_not_capped_by_the_token_but_one_with_a_lease_is() -> None:
    """Token max 60 s, certificates of 600 s: the lease-less one rotates by its NotAfter, the leased one by the token.

    Capping the first by the token would rotate it at every re-login instead of once per certificate life.
    """
    clock = Clock()
    vault = FakeVault(clock, TokenInfo(20.0, True, 60.0))
    vault.owns_token = True
    renewer, _ = new_renewer(vault, clock)
    renewer.track("pki/issue/web", Lease("certificate 1a", 600.0, False, 0.0, revocable=False, serial="1a"))
    renewer.track("pki/issue/leased", Lease("pki/issue/leased/x", 600.0, False, 0.0, serial="2b"))
    renewer.look_up_token()  # its limits come after both were tracked, as at a start
    renewer.track("pki/issue/later", Lease("certificate 3c", 600.0, False, 0.0, revocable=False, serial="3c"))
    leases = renewer.snapshot()
    assert leases["pki/issue/web"].deadline == leases["pki/issue/later"].deadline == 600.0
    assert leases["pki/issue/leased"].deadline == 60.0 - TTL_GRANULARITY
    assert not leases["pki/issue/web"].revocable and leases["pki/issue/leased"].revocable


def test_the_token_a_relogin_replaced_is_renewed_until_its_own_deadline_then_let_go() -> None:
    """Vault revokes a token's leases when it expires: the replaced token lives on until its max TTL.

    Token TTL 5 s, max 60 s: re-login at 30 s; the old token would expire at ~35 s without renewals, so it is
    renewed (with its own TTL) until its deadline, 59 s; after that nothing renews it. A failed renewal backs off.
    """
    clock = Clock()
    vault = FakeVault(clock, TokenInfo(5.0, True, 60.0))
    vault.owns_token = True
    vault.retired_renewals = [5.0, VaultUnavailableError("down")] + [5.0] * 100
    renewer, _ = new_renewer(vault, clock)
    renewer.look_up_token()
    drive(renewer, clock, 59.9)  # the next re-login, at 60 s, would retire the second token
    assert vault.times("login") == [30.0]
    renewals = vault.called("renew_retired")
    assert all(token == "token-0" and increment == 5.0 for _, (token, increment) in renewals), renewals
    times = [at for at, _ in renewals]
    assert 30.0 < times[0] <= 35.0, "the first renewal comes before the old token's TTL runs out"
    assert all(b - a < 5.0 for a, b in itertools.pairwise([30.0, *times])), "never a gap of a whole TTL"
    assert 54.0 <= times[-1] < 59.0, "renewed up to its deadline"
    assert any(b - a < 1.0 for a, b in itertools.pairwise(times)), "the failed renewal was retried after a backoff"
    assert renewer.retired == [] and renewer.retired_tokens() == [], "let go at its deadline, 59 s"
    [(released_at, released)] = vault.called("release")
    assert released == "token-0" and 59.0 <= released_at < 59.9, "its certificate copy is closed then"


def test_a_replaced_token_whose_renewal_is_refused_is_let_go_at_once() -> None:
    """A refusal (77) is not retried every backoff until the token expires: the token is released."""
    clock = Clock()
    vault = FakeVault(clock, TokenInfo(5.0, True, 60.0))
    vault.owns_token = True
    vault.retired_renewals = [PermissionRefusedError("permission denied")]
    renewer, _ = new_renewer(vault, clock)
    renewer.look_up_token()
    drive(renewer, clock, 45.0)
    assert len(vault.called("renew_retired")) == 1 and renewer.retired == []
    assert [token for _, token in vault.called("release")] == ["token-0"]


def test_a_replaced_token_that_cannot_be_renewed_is_kept_for_the_exit_revoke() -> None:
    """Not renewable: never renewed, but kept (and so revoked at exit) until it expires, then released."""
    clock = Clock()
    vault = FakeVault(clock, TokenInfo(40.0, False, 40.0))
    vault.owns_token = True
    renewer, _ = new_renewer(vault, clock)
    renewer.look_up_token()
    drive(renewer, clock, 25.0)
    assert vault.times("login") == [20.0] and vault.called("renew_retired") == []
    assert len(renewer.retired_tokens()) == 1 and vault.called("release") == []


def test_a_supplied_token_is_never_kept_as_a_retired_one() -> None:
    """Only a token this process logged in for is replaced by a re-login (a supplied one never is)."""
    clock = Clock()
    vault = FakeVault(clock, TokenInfo(5.0, True, 60.0))
    renewer, _ = new_renewer(vault, clock)
    renewer.look_up_token()
    drive(renewer, clock, 40.0)
    assert vault.times("login") == [] and renewer.retired == [] and vault.called("renew_retired") == []


def test_the_shutdown_revokes_the_replaced_token_too(tmp_path: Path) -> None:
    """SIGTERM after a re-login: the leases, the replaced token and the current token are revoked."""
    scene = Scene(tmp_path, token=TokenInfo(5.0, True, 40.0))
    scene.vault.owns_token = True
    scene.begin()
    scene.run(25.0)
    assert scene.vault.times("login") == [20.0]
    scene.loop.events.put(SignalEvent(signal.SIGTERM))
    scene.loop.step(0)
    scene.loop.finish()
    assert [token for _, token in scene.vault.called("revoke_retired")] == ["token-0"]
    order = [name for name, _, _ in scene.vault.calls if name in ("revoke", "revoke_retired", "revoke_token")]
    assert order[-2:] == ["revoke_retired", "revoke_token"] and "revoke" in order


def test_a_token_that_cannot_be_renewed_backs_off_then_is_reported_expired_once() -> None:
    """Every renew-self fails: retries back off until the TTL runs out, then nothing more is tried."""
    clock = Clock()
    vault = FakeVault(clock, TokenInfo(10.0, True, 100.0))
    vault.token_renewals = [VaultUnavailableError("down")] * 100
    renewer, _ = new_renewer(vault, clock)
    renewer.look_up_token()
    drive(renewer, clock, 200.0)
    attempts = vault.times("renew_token")
    assert 7.0 <= attempts[0] <= 7.34 and all(at < 10.0 for at in attempts), attempts
    assert attempts[1] - attempts[0] <= 1.0 and attempts[-1] - attempts[-2] >= 0.5
    assert renewer.token.next_renewal == FAR and renewer.token.errors == len(attempts)
    assert clock.now < 12.0, "the renewer went quiet right after the expiry"


# -- the token schedule, pure ------------------------------------------------------------


def test_token_learned_renews_at_70_to_73_percent_and_never_renews_an_unrenewable_token() -> None:
    """A renewable token is renewed 70-73.4% into its TTL; an unrenewable owned one only logs in again."""
    for seed in range(20):
        state = token_learned(100.0, TokenInfo(60.0, True, 600.0), False, random.Random(seed))
        assert 142.0 <= state.next_renewal <= 144.04 and state.next_relogin == FAR
        assert state.expires_at == 160.0 and state.deadline == 699.0
    fixed = token_learned(100.0, TokenInfo(60.0, False, 60.0), True, random.Random(1))
    assert fixed.next_renewal == FAR and fixed.next_relogin == 130.0
    assert token_action(fixed, 129.9) is None and token_action(fixed, 130.0) == "relogin"


def test_token_action_relogin_comes_before_renew_and_expiry_is_reported_once() -> None:
    """Both due: relogin wins; a renewal due past expiry is "expired", and with it cleared, nothing."""
    both = TokenState(expires_at=50.0, next_renewal=30.0, next_relogin=30.0)
    assert token_action(both, 30.0) == "relogin"
    assert token_action(both._replace(next_relogin=FAR), 30.0) == "renew"
    assert token_action(both._replace(next_relogin=FAR), 50.0) == "expired"
    assert token_action(both._replace(next_relogin=FAR, next_renewal=FAR), 50.0) is None
    assert token_action(TokenState(known=False, next_renewal=3.0), 2.9) is None


def test_token_renewed_never_extends_past_the_deadline() -> None:
    """A renewal near the max TTL stops at the deadline, and the next renewal comes before it; errors reset."""
    state = TokenState(deadline=100.0, expires_at=95.0, renewable=True, ttl=30.0, errors=3)
    renewed = token_renewed(state, 90.0, 30.0, random.Random(1))
    assert renewed.expires_at == 100.0 and renewed.errors == 0
    assert 90.0 < renewed.next_renewal <= 100.0


def test_token_failed_backs_off_doubling_up_to_30_seconds() -> None:
    """Each failure doubles the wait from 1 s (jittered down to half) up to 30 s; a relogin's moves next_relogin."""
    rng = random.Random(11)
    state = TokenState(expires_at=FAR, renewable=True, ttl=30.0, next_renewal=0.0)
    waits = []
    for _ in range(8):
        state = token_failed(state, "renew", 0.0, rng)
        waits.append(state.next_renewal)
    for errors, wait in enumerate(waits, start=1):
        cap = min(ERROR_BACKOFF_MAX, 2.0 ** (errors - 1))
        assert cap / 2 <= wait <= cap, (errors, wait)
    relogin = token_failed(TokenState(next_relogin=50.0, next_renewal=70.0), "relogin", 50.0, rng)
    assert 50.5 <= relogin.next_relogin <= 51.0 and relogin.next_renewal == 70.0 and relogin.errors == 1


# -- the loop (sidecar mode) with the renewer ---------------------------------------------


class Scene:
    """A sidecar Supervised loop on a scripted clock; its files land in `out`."""

    def __init__(
        self,
        tmp_path: Path,
        extra: str = "",
        static: bool = False,
        token: TokenInfo = NEVER,
        certificate: bool = False,
        stop_timeout: str = "2s",
        vault_extra: str = "",
    ) -> None:
        self.clock = Clock()
        self.vault = FakeVault(self.clock, token)
        self.out = tmp_path / "out"
        params = 'params = { common_name = "x" }\n' if certificate else ""  # DB is then written, like pki/issue/ROLE
        text = (
            f'[output]\ndir = "{self.out}"\nallow_non_tmpfs = true\n'
            f'[vault]\naddr = "http://127.0.0.1:1"\nrefresh_interval = "60s"\n{vault_extra}\n'
            f'[process]\nstop_timeout = "{stop_timeout}"\n{extra}\n'
            f'[[secret]]\nname = "db_user"\nsource = "vault:{DB}#username"\n{params}'
            f'[[secret]]\nname = "db_password"\nsource = "vault:{DB}#password"\n{params}'
        )
        if static:
            text += f'[[secret]]\nname = "api_key"\nsource = "vault:{KV}#api_key"\n'
        self.cfg = load_text(text, "test.toml", {})
        user = privileges.resolve(None)
        sink = Sink(str(self.out), os.getgid(), True)
        sink.prepare()
        lease = Lease("lease-1", 10.0, True, self.clock.now)
        if certificate:
            lease = Lease("certificate 01", 10.0, False, self.clock.now, revocable=False, serial="01")
        values = {"db_user": b"user-1", "db_password": b"pw-1", "api_key": b"key-1"}
        materials = [
            Material(s, Hidden(values[s.name]), lease if s.source.path == DB else None) for s in self.cfg.secrets
        ]
        owners = {s.name: Owner(os.getuid(), os.getgid()) for s in self.cfg.secrets}
        written = sink.write(output_files(materials, owners))  # what the start wrote
        done = Materialized(user, materials, written, sink, owners, cast(VaultClient, self.vault), -1)
        self.loop = Supervised(self.cfg, done, None, {}, clock=self.clock, threaded=False)
        # No child here; waitpid(-1) would reap pytest's own children.
        self.loop.supervisor.reap = lambda: False  # type: ignore[method-assign]

    def begin(self) -> Renewer:
        self.loop.begin()
        assert self.loop.renewer is not None
        self.loop.renewer.rng = random.Random(5)
        return self.loop.renewer

    def run(self, end: float, stop: Callable[[], bool] = lambda: False) -> None:
        """Jump from duty to duty (the renewer's and the loop's), handling every event as it comes."""
        renewer = self.loop.renewer
        assert renewer is not None
        while not stop() and not self.loop.stopping:
            wake = min(renewer.step(), self.clock.now + self.loop._wait_time())
            while not self.loop.events.empty():
                self.loop.step(0)
            if wake > end or stop():
                break
            self.clock.now = max(self.clock.now, wake)
            self.loop.step(0)

    def file(self, name: str) -> str:
        return (self.out / name).read_text()

    def status(self) -> dict[str, Any]:
        return cast(dict[str, Any], json.loads((self.out / STATUS_DIR / STATUS_FILE).read_text()))


# Lease-1 (10 s, issued at 0, default rotate_before): its provisional deadline is 10, so
# the probe comes at the earliest rotation that allows, 10 - (10/3 + 1) = 5.667.
PROBE_AT = 10.0 - (10.0 / 3 + 1.0)


def test_sidecar_rotates_at_once_when_the_probe_is_refused(tmp_path: Path) -> None:
    """Probe refused: the loop re-reads at that instant, rewrites both files, revokes lease-1 stop_timeout later."""
    scene = Scene(tmp_path)
    scene.vault.probes = [PermissionRefusedError("lease not found")]
    renewer = scene.begin()
    scene.run(30.0, stop=lambda: bool(scene.vault.called("revoke")))
    assert scene.vault.called("probe") == [(pytest.approx(PROBE_AT), ("lease-1", 10.0))]
    assert scene.vault.called("read") == [(pytest.approx(PROBE_AT), DB)], "read at the refusal itself"
    assert (scene.file("db_user"), scene.file("db_password")) == ("user-2", "pw-2")
    lease = renewer.snapshot()[DB]
    assert lease.lease_id == "lease-2" and lease.rotated_at == pytest.approx(PROBE_AT)
    assert scene.vault.called("revoke") == [(pytest.approx(PROBE_AT + 2.0), "lease-1")]
    assert scene.vault.called("renew") == [], "a refused lease is never renewed"


def test_a_stale_rotate_for_a_lease_already_rotated_away_is_ignored(tmp_path: Path) -> None:
    """A Rotate naming lease-1 that arrives after lease-2 replaced it: no read, no file written."""
    scene = Scene(tmp_path)
    scene.vault.probes = [PermissionRefusedError("lease not found")]
    scene.begin()
    scene.run(30.0, stop=lambda: bool(scene.vault.called("read")))
    scene.loop.events.put(Rotate(DB, "lease-1", "rotate_before reached"))
    scene.loop.step(0)
    assert len(scene.vault.called("read")) == 1 and scene.file("db_user") == "user-2"


def test_a_lease_capped_by_an_owned_token_rotates_after_the_relogin_onto_the_new_token(tmp_path: Path) -> None:
    """Token max TTL 40 s: re-login at 20 s, rotation at 23.4 s (before 39 s); the new lease dies with the new token."""
    scene = Scene(tmp_path, token=TokenInfo(20.0, True, 40.0))
    scene.vault.owns_token = True
    renewer = scene.begin()
    old = renewer.snapshot()[DB]
    assert old.token_deadline == 39.0 and old.deadline == 10.0, "provisional until the probe"
    scene.run(60.0, stop=lambda: bool(scene.vault.called("revoke")))
    assert scene.vault.times("login") == [20.0]
    # Probed lease-1: deadline 39 (the token's), life 39, rotate_before 13, plus a 2.6 s lead.
    assert scene.vault.called("read") == [(pytest.approx(39.0 - 13.0 * 1.2), DB)]
    new = renewer.snapshot()[DB]
    assert new.lease_id == "lease-2" and new.token_deadline == 20.0 + 40.0 - TTL_GRANULARITY
    assert scene.file("db_password") == "pw-2"
    assert scene.vault.called("revoke") == [(pytest.approx(23.4 + 2.0), "lease-1")]


def test_sidecar_rides_out_a_renewal_outage_without_rotating(tmp_path: Path) -> None:
    """Two renewals fail, the third works: no re-read, no exit, files untouched, status.json shows the renewal."""
    scene = Scene(tmp_path)
    scene.vault.renewals = [VaultUnavailableError("down")] * 2
    renewer = scene.begin()
    scene.run(60.0, stop=lambda: len(scene.vault.called("renew")) >= 4)
    expiry_after_probe = PROBE_AT + 10.0
    attempts = scene.vault.times("renew")
    assert all(at < expiry_after_probe for at in attempts[:3]), "every retry lands before the expiry"
    assert attempts[3] - attempts[2] >= 6.67, "after the recovery, the usual ~70% rule"
    assert scene.vault.called("read") == [] and not scene.loop.stopping and scene.loop.forced_exit is None
    assert scene.file("db_user") == "user-1"
    lease = renewer.snapshot()[DB]
    assert lease.errors == 0 and lease.expires_at == pytest.approx(attempts[3] + 10.0)
    [db_user, _] = scene.status()["secrets"]
    assert db_user["lease_id"] == "lease-1" and db_user["rotating"] is False
    assert db_user["rotate_at"] is not None and db_user["last_renewal"] is not None


def test_on_expiry_keep_retries_the_rotation_about_once_a_second_past_the_expiry(tmp_path: Path) -> None:
    """Vault down past lease-1's expiry: no renewal fits before it, so rotation starts just before it and is
    retried about once a second (the grace); the app keeps running; the fifth read wins."""
    scene = Scene(tmp_path, extra='on_expiry = "keep"')
    scene.vault.probes = [VaultUnavailableError("down")] * 1000
    scene.vault.reads = [VaultUnavailableError("down")] * 4
    renewer = scene.begin()
    scene.run(600.0, stop=lambda: renewer.snapshot()[DB].lease_id != "lease-1")
    reads = scene.vault.times("read")
    assert len(reads) == 5 and 9.0 < reads[0] < 10.0, "rotation starts once no renewal fits before the expiry"
    assert all(0.75 <= b - a <= 1.25 for a, b in itertools.pairwise(reads)), reads
    probes = scene.vault.times("probe")
    assert all(at < 10.0 for at in probes), "an expired lease is not renewed"
    assert sum(at > 9.0 for at in probes) <= 2, f"no burst of renewals at the end: {probes}"
    assert not scene.loop.stopping and scene.loop.forced_exit is None
    assert scene.file("db_user") == "user-2" and renewer.snapshot()[DB].lease_id == "lease-2"


def test_on_expiry_keep_backs_off_again_once_the_grace_is_over(tmp_path: Path) -> None:
    """After expiry_grace, "keep" goes on retrying with the usual backoff (up to 30 s), not once a second."""
    scene = Scene(tmp_path, extra='on_expiry = "keep"\nexpiry_grace = "5s"')
    scene.vault.probes = [VaultUnavailableError("down")] * 1000
    scene.vault.reads = [VaultUnavailableError("down")] * 1000
    renewer = scene.begin()
    scene.run(200.0)
    reads = scene.vault.times("read")
    in_grace = [b - a for a, b in itertools.pairwise(reads) if b <= 15.0]
    after = [b - a for a, b in itertools.pairwise(reads) if a >= 16.0]
    assert in_grace and all(d <= 1.25 for d in in_grace), in_grace
    assert after and max(after) > 10.0 and all(d <= ERROR_BACKOFF_MAX for d in after), after
    assert renewer.snapshot()[DB].gave_up and not scene.loop.stopping


def test_a_failed_re_read_is_retried_about_a_second_later_and_wins(tmp_path: Path) -> None:
    """The rotation's read fails once: retried after a 0.5-1 s backoff; lease-1 revoked only after the success."""
    scene = Scene(tmp_path)
    scene.vault.probes = [(6.0, 6.0)]  # deadline 5.667 + 6 - 1: rotation due at 6.111
    scene.vault.reads = [VaultUnavailableError("down")]
    renewer = scene.begin()
    scene.run(30.0, stop=lambda: bool(scene.vault.called("revoke")))
    first, second = scene.vault.times("read")
    deadline = PROBE_AT + 6.0 - TTL_GRANULARITY
    assert first == pytest.approx(deadline - (deadline / 3 + 1.0))
    assert 0.5 <= second - first <= 1.0
    assert scene.vault.called("revoke") == [(pytest.approx(second + 2.0), "lease-1")]
    assert scene.file("db_password") == "pw-2" and renewer.snapshot()[DB].rotated_at == second


def test_a_written_path_whose_answer_has_no_certificate_or_lease_fails_its_rotation_and_retries(
    tmp_path: Path,
) -> None:
    """A certificate path answered once without an expiration must not drop out of rotation for good."""
    scene = Scene(tmp_path, certificate=True)
    scene.vault.writes = [VaultSecret(DB, {"username": "user-x", "password": "pw-x"}, None)]
    renewer = scene.begin()
    scene.run(30.0, stop=lambda: len(scene.vault.called("write")) >= 2)
    first, second = scene.vault.times("write")
    assert first == pytest.approx(10.0 - (10.0 / 3 + 1.0)), "rotate_before of a 10 s certificate, plus the lead"
    assert 0.5 <= second - first <= 1.0, "retried after the first backoff"
    assert scene.file("db_password") == "pw-2", "the answer without a certificate was never written"
    assert renewer.snapshot()[DB].serial == "02" and not renewer.snapshot()[DB].revocable
    assert scene.vault.called("revoke") == [], "a certificate without a Vault lease is never revoked"
    assert scene.vault.called("read") == [], "a written path is never read"


def test_sigterm_stops_the_sidecar_and_the_shutdown_revokes_every_lease_and_the_token(tmp_path: Path) -> None:
    """SIGTERM: later Rotates are ignored; finish() revokes lease-2 and the pending lease-1, then the token."""
    scene = Scene(tmp_path)
    scene.vault.probes = [PermissionRefusedError("lease not found")]
    scene.begin()
    scene.run(30.0, stop=lambda: bool(scene.vault.called("read")))
    scene.loop.events.put(SignalEvent(signal.SIGTERM))
    scene.loop.events.put(Rotate(DB, "lease-2", "rotate_before reached"))
    scene.loop.step(0)
    scene.loop.step(0)
    assert scene.loop.stopping and len(scene.vault.called("read")) == 1
    scene.loop.finish()
    assert scene.loop.exit_code() == 0
    assert [arg for _, arg in scene.vault.called("revoke")] == ["lease-1", "lease-2"]
    assert scene.vault.calls[-1][0] == "revoke_token"
    assert scene.status()["state"] == "stopped"


def test_a_static_secret_is_read_again_every_refresh_interval_and_rewritten_on_change(tmp_path: Path) -> None:
    """refresh_interval 60 s: re-read at 60 s (unchanged), at 120 s (changed: the file is rewritten)."""
    scene = Scene(tmp_path, static=True)
    scene.begin()
    scene.run(61.0)
    assert [at for at, path in scene.vault.called("read") if path == KV] == [60.0]
    assert scene.file("api_key") == "key-1"
    scene.vault.api_key = "key-2"
    scene.run(121.0)
    assert [at for at, path in scene.vault.called("read") if path == KV] == [60.0, 120.0]
    assert scene.file("api_key") == "key-2" and scene.file("db_user") == "user-1"


# -- found while writing these: bugs in secret_init (strict xfail: fixing one fails here) --


def test_failed_renewals_try_once_more_before_expiry_not_dozens_of_times() -> None:
    """after_error's docstring: "try once more shortly before expiry". Not 48 tries in the last second."""
    clock = Clock()
    vault = FakeVault(clock)
    vault.probes = [VaultUnavailableError("connection refused")] * 1000
    renewer, _ = new_renewer(vault, clock, rotate_before=2.0)
    renewer.look_up_token()
    renewer.track(DB, Lease("l1", 30.0, True, 0.0))
    drive(renewer, clock, 60.0)
    assert sum(1 for at in vault.times("probe") if at >= 29.0) <= 2


def test_a_relogin_whose_lookup_fails_still_learns_the_new_tokens_limits() -> None:
    """Login works, the lookup after it hits an outage: the new token's max TTL must be learned later."""
    clock = Clock()
    vault = FakeVault(clock, TokenInfo(20.0, True, 60.0))
    vault.owns_token = True
    vault.token_infos = [TokenInfo(20.0, True, 60.0), VaultUnavailableError("down")]
    renewer, _ = new_renewer(vault, clock)
    renewer.look_up_token()
    drive(renewer, clock, 120.0)
    assert vault.times("login")[0] == 30.0
    assert renewer.token.deadline < FAR and len(vault.times("login")) >= 2


def test_a_signalled_app_keeps_its_old_lease_renewed_until_the_delayed_revoke(tmp_path: Path) -> None:
    """Signal mode (the sidecar's app is signalled too): lease-1 stays renewed after the rotation, until its
    revoke stop_timeout later, and is not renewed after it (it used to die at its expiry, 2 s after the signal)."""
    scene = Scene(tmp_path, stop_timeout="8s")
    scene.vault.probes = [(30.0, 10.0)]  # deadline PROBE_AT + 29: rotation due at about 20.8
    renewer = scene.begin()
    scene.run(60.0, stop=lambda: bool(scene.vault.called("revoke")))
    rotated = renewer.snapshot()[DB].rotated_at
    assert rotated is not None and scene.file("db_user") == "user-2"
    ((revoked_at, revoked),) = scene.vault.called("revoke")
    assert revoked == "lease-1" and revoked_at == pytest.approx(rotated + 8.0)
    held = [at for at, (lease_id, _) in scene.vault.called("renew") if lease_id == "lease-1" and at > rotated]
    assert held and all(at < revoked_at for at in held), "renewed while held, and not after its revoke"
    scene.run(revoked_at + 30.0)
    assert not [at for at, (lease_id, _) in scene.vault.called("renew") if lease_id == "lease-1" and at > revoked_at]


def test_a_held_lease_past_its_expiry_is_not_revoked(tmp_path: Path) -> None:
    """rotate_before = 1s: lease-1 reaches its max TTL (2 s after the rotation) before its revoke (8 s after):
    Vault has dropped it, so no revoke is sent (OpenBao answers 204 for an unknown lease: "revoked" would lie)."""
    scene = Scene(tmp_path, extra='rotate_before = "1s"', stop_timeout="8s")
    scene.vault.probes = [(30.0, 10.0)]
    renewer = scene.begin()
    scene.run(60.0, stop=lambda: renewer.snapshot()[DB].lease_id != "lease-1")
    rotated = renewer.snapshot()[DB].rotated_at
    assert rotated is not None
    scene.run(rotated + 9.0)
    assert not scene.loop.pending_revokes, "the revoke came due"
    assert "lease-1" not in [arg for _, arg in scene.vault.called("revoke")]
    scene.loop.finish()
    assert "lease-1" not in [arg for _, arg in scene.vault.called("revoke")]


def test_revoke_on_exit_false_leaves_the_token_and_the_current_lease_but_revokes_a_rotated_away_one(
    tmp_path: Path,
) -> None:
    """The token's leases live while it does: revoking it would revoke them, whatever revoke_on_exit said."""
    scene = Scene(tmp_path, vault_extra="revoke_on_exit = false", stop_timeout="8s")
    scene.vault.owns_token = True
    scene.vault.probes = [PermissionRefusedError("lease not found")]  # rotates at once; lease-1 pending
    scene.begin()
    scene.run(30.0, stop=lambda: bool(scene.vault.called("read")))
    scene.loop.finish()
    assert [arg for _, arg in scene.vault.called("revoke")] == ["lease-1"], "the old one goes, lease-2 stays"
    assert not scene.vault.called("revoke_token")


def test_a_rotation_backing_off_is_retried_at_once_when_vault_answers_a_renewal(tmp_path: Path) -> None:
    """on_expiry = "keep" past its grace backs off up to 30 s; but each successful token renewal (Vault serves
    again; here the database is what fails) pulls the next retry in (it waited 22 s with Vault back, before)."""
    scene = Scene(tmp_path, extra='on_expiry = "keep"\nexpiry_grace = "5s"', token=TokenInfo(6.0, True, 10_000.0))
    scene.vault.probes = [VaultUnavailableError("down")] * 1000
    scene.vault.reads = [VaultUnavailableError("database down")] * 1000
    renewer = scene.begin()
    scene.run(120.0)
    reads, renewals = scene.vault.times("read"), scene.vault.times("renew_token")
    after = [(a, b) for a, b in itertools.pairwise(reads) if a >= 20.0]
    assert renewer.snapshot()[DB].gave_up and renewals and after
    for a, b in after:  # the next read comes within about a second of the first token renewal after `a`
        renewal = next((r for r in renewals if r > a), None)
        assert renewal is None or b <= renewal + 1.0, (a, b, renewal)


def test_a_rotation_failing_before_expiry_keeps_its_backoff_while_vault_answers(tmp_path: Path) -> None:
    """Only an expired lease's rotation is pulled in by a successful renewal: one failing for another reason
    (here every re-read; in life, files that cannot be written) keeps backing off, since each try issues
    new credentials."""
    scene = Scene(tmp_path, token=TokenInfo(6.0, True, 10_000.0))
    scene.vault.probes = [(60.0, 60.0)]  # deadline PROBE_AT + 59: rotation due at about 39, expiry at about 64
    scene.vault.reads = [VaultUnavailableError("down")] * 1000
    scene.begin()
    scene.run(60.0)
    reads = scene.vault.times("read")
    assert reads and reads[0] > 30.0 and len(scene.vault.times("renew_token")) >= 5
    assert max(b - a for a, b in itertools.pairwise(reads)) > 6.0, f"pulled in at every token renewal: {reads}"
