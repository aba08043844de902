"""The renewer's and the loop's decisions, driven by a scripted clock and a SCRIPTED Vault.

The Vault here is a fake on purpose: these tests check decisions (when to renew, probe,
rotate, back off, give up) in milliseconds, with answers a real server cannot give on
demand (an outage that lasts exactly until expiry, a refused probe). The same flows run
against a real OpenBao and PostgreSQL, in real time, in test_leases.py and test_tls_rotation.py.
Nothing sleeps: the clock is a number, the renewer is stepped by hand (`Renewer.step`),
and the loop takes one event at a time (`Supervised.step(0)`). The clock, the scripted
Vault and the sidecar scene are test_schedule.py's, which tests more of the same.
"""

import itertools
import random
from pathlib import Path

import pytest

from secret_init.errors import PermissionRefusedError, VaultUnavailableError
from secret_init.model import Lease
from secret_init.renewal import (
    FAR,
    TTL_GRANULARITY,
    Rotate,
    TokenState,
    rotate_at,
    token_action,
    token_failed,
    token_learned,
    token_renewed,
)
from secret_init.vault import TokenInfo
from tests.test_schedule import DB, Clock, FakeVault, Scene, drive, new_renewer

# -- the renewer alone ---------------------------------------------------------------------


def test_renewals_land_at_the_lifetime_watcher_point() -> None:
    """After the probe, each renewal comes at 2/3 of the remaining TTL plus a third of a 10-20% grace."""
    clock = Clock()
    vault = FakeVault(clock)
    r, posted = new_renewer(vault, clock)
    r.look_up_token()
    r.track(DB, Lease("l1", 30.0, True, 0.0))
    drive(r, clock, 200.0)
    probes, renewals = vault.called("probe"), vault.called("renew")
    assert [at for at, _ in probes] == [pytest.approx(18.0)], "probed at the earliest rotation 30 s could allow"
    # The probe renewed back to 30 s, and every renewal asks for 30 s again.
    times = [probes[0][0]] + [at for at, _ in renewals]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) >= 5
    assert all(21.0 <= gap <= 22.0 for gap in gaps), gaps  # 2/3 of 30 + (3..6)/3
    assert posted == [], "a 1000 s max TTL is far off: no rotation yet"


def test_a_capped_ttl_rotates_before_the_deadline() -> None:
    """The probe finds the max TTL 30 s away: Rotate is posted at rotate_at, before that deadline."""
    clock = Clock()
    vault = FakeVault(clock)
    vault.probes = [(30.0, 30.0)]
    r, posted = new_renewer(vault, clock)
    r.look_up_token()
    r.track(DB, Lease("l1", 30.0, True, 0.0))
    drive(r, clock, 100.0, stop=lambda: bool(posted))
    lease = r.snapshot()[DB]
    assert lease.deadline == pytest.approx(18.0 + 30.0 - TTL_GRANULARITY)
    assert posted == [Rotate(DB, "l1", "rotate_before reached")]
    assert clock.now == pytest.approx(rotate_at(lease, None)) and clock.now < lease.deadline


def test_the_tokens_max_ttl_is_the_leases_deadline() -> None:
    """A token with 40 s to its max TTL: a lease it made dies with it, so it rotates before the token's end."""
    clock = Clock()
    vault = FakeVault(clock, TokenInfo(ttl=20.0, renewable=True, max_remaining=40.0))
    r, posted = new_renewer(vault, clock)
    r.track(DB, Lease("l1", 30.0, True, 0.0))
    r.look_up_token()  # as the loop does: track, then learn the token and cap
    drive(r, clock, 100.0, stop=lambda: bool(posted))
    lease = r.snapshot()[DB]
    token_end = 40.0 - TTL_GRANULARITY
    assert lease.token_deadline == lease.deadline == pytest.approx(token_end)
    assert posted and isinstance(posted[0], Rotate) and clock.now < token_end - 10, "well before the token's end"
    assert vault.called("renew_token"), "the token itself is renewed meanwhile"


def test_a_refused_probe_rotates_at_once_and_only_once() -> None:
    """Vault refuses the probe (the lease was revoked): one Rotate, "renewal refused", not repeated."""
    clock = Clock()
    vault = FakeVault(clock)
    vault.probes = [PermissionRefusedError("lease not found")]
    r, posted = new_renewer(vault, clock)
    r.look_up_token()
    r.track(DB, Lease("l1", 30.0, True, 0.0))
    drive(r, clock, 29.0)
    assert posted == [Rotate(DB, "l1", "renewal refused")]
    assert len(vault.called("probe")) == 1 and vault.called("renew") == []


def test_an_outage_backs_off_within_expiry_then_recovers() -> None:
    """Renewals fail three times (Vault down): retries back off, never past expiry, then the schedule resumes."""
    clock = Clock()
    vault = FakeVault(clock)
    r, posted = new_renewer(vault, clock)
    r.look_up_token()
    r.track(DB, Lease("l1", 30.0, True, 0.0))
    drive(r, clock, 18.0)  # the probe
    expiry = r.snapshot()[DB].expires_at
    vault.renewals = [VaultUnavailableError("down")] * 3
    drive(r, clock, 200.0, stop=lambda: len(vault.called("renew")) >= 5)
    attempts = [at for at, _ in vault.called("renew")]
    failures, recovered = attempts[:3], attempts[3]
    assert all(at < expiry for at in attempts[:4]), "every retry lands before the old expiry"
    assert failures[1] - failures[0] <= failures[2] - failures[1] + 1.0, "backing off"
    assert r.snapshot()[DB].errors == 0, "a success clears the errors"
    assert 21.0 <= attempts[4] - recovered <= 22.0, "then renewals follow the usual rule"
    assert posted == []


def test_token_schedule_is_a_pure_function_of_its_state() -> None:
    """Renew at ~2/3 of the TTL, log in again halfway to the max TTL (owned tokens), back off, expire once."""
    rng = random.Random(3)
    owned = token_learned(0.0, TokenInfo(ttl=30.0, renewable=True, max_remaining=120.0), True, rng)
    assert owned.deadline == 120.0 - TTL_GRANULARITY and owned.next_relogin == 60.0
    assert 21.0 <= owned.next_renewal <= 22.0
    assert token_action(owned, 10.0) is None and token_action(owned, owned.next_renewal) == "renew"
    assert token_action(owned, 60.0) == "relogin"
    supplied = token_learned(0.0, TokenInfo(ttl=30.0, renewable=True, max_remaining=120.0), False, rng)
    assert supplied.next_relogin == FAR, "a supplied token is never replaced by a login"
    renewed = token_renewed(owned, 21.5, 30.0, rng)
    assert renewed.expires_at == 51.5 and 21.5 + 21.0 <= renewed.next_renewal <= 21.5 + 22.0
    failed = token_failed(owned, "renew", 21.5, rng)
    assert failed.errors == 1 and 22.0 <= failed.next_renewal <= 22.5, "1 s, jittered down to half"
    assert token_failed(owned, "relogin", 60.0, rng).next_relogin > 60.0
    late = TokenState(expires_at=10.0, next_renewal=9.0)
    assert token_action(late, 11.0) == "expired"
    assert token_action(late._replace(next_renewal=FAR), 11.0) is None, "reported once"
    assert token_action(TokenState(known=False, next_renewal=5.0), 5.0) == "lookup"


# -- the loop with the renewer -----------------------------------------------------------------


@pytest.fixture
def scene(tmp_path: Path) -> Scene:
    return Scene(tmp_path)


def test_a_capped_lease_is_rotated_files_rewritten_and_the_old_lease_revoked(scene: Scene) -> None:
    """Probe finds a 6 s max TTL: the loop reads again, rewrites both files, tracks the new lease, revokes the old."""
    scene.vault.probes = [(6.0, 6.0)]
    renewer = scene.begin()
    scene.run(30.0, stop=lambda: bool(scene.vault.called("revoke")))
    [read_at] = scene.vault.times("read")
    assert (scene.file("db_user"), scene.file("db_password")) == ("user-2", "pw-2")
    assert renewer.snapshot()[DB].lease_id == "lease-2"
    assert renewer.snapshot()[DB].rotated_at == read_at
    revoked_at, revoked = scene.vault.called("revoke")[0]
    assert revoked == "lease-1" and revoked_at == pytest.approx(read_at + 2.0), "a sidecar's app gets stop_timeout"
    probed_at = scene.vault.called("probe")[0][0]
    assert read_at < probed_at + 6.0 - TTL_GRANULARITY, "rotated before the old lease's deadline"


def test_an_outage_until_expiry_stops_with_75_after_the_grace(scene: Scene) -> None:
    """Every renewal and read fails: rotation is retried about once a second for expiry_grace (30 s by
    default) past the expiry, then on_expiry = "stop" ends the loop with 75."""
    scene.vault.probes = [VaultUnavailableError("down")] * 100
    scene.vault.renewals = [VaultUnavailableError("down")] * 100
    scene.vault.reads = [VaultUnavailableError("down")] * 100
    scene.begin()
    scene.run(120.0)
    assert scene.loop.stopping and scene.loop.forced_exit == 75
    assert scene.clock.now == pytest.approx(10.0 + 30.0), "acted on when the grace ran out"
    reads = [at for at, _ in scene.vault.called("read")]
    assert len(reads) >= 25 and all(0.75 <= b - a <= 1.25 for a, b in itertools.pairwise(reads)), reads
    assert scene.file("db_user") == "user-1", "nothing new was written"


def test_expiry_grace_zero_stops_at_the_expiry_itself(tmp_path: Path) -> None:
    """expiry_grace = 0: the old behaviour, on_expiry at the expiry."""
    scene = Scene(tmp_path, extra='expiry_grace = "0s"')
    scene.vault.probes = [VaultUnavailableError("down")] * 100
    scene.vault.renewals = [VaultUnavailableError("down")] * 100
    scene.vault.reads = [VaultUnavailableError("down")] * 100
    scene.begin()
    scene.run(60.0)
    assert scene.loop.forced_exit == 75 and scene.clock.now == pytest.approx(10.0)


def test_vault_back_within_the_grace_rotates_and_the_app_stays(scene: Scene) -> None:
    """Vault answers 6 s after the expiry: the next retry (about a second later at most) rotates; no stop."""
    scene.vault.probes = [VaultUnavailableError("down")] * 100
    scene.vault.renewals = [VaultUnavailableError("down")] * 100
    scene.vault.reads = [VaultUnavailableError("down")] * 7
    renewer = scene.begin()
    scene.run(60.0, stop=lambda: renewer.snapshot()[DB].lease_id != "lease-1")
    assert scene.loop.forced_exit is None and not scene.loop.stopping
    assert 15.0 < scene.clock.now < 18.0 and scene.file("db_user") == "user-2"


def test_an_outage_until_expiry_keeps_running_with_keep(tmp_path: Path) -> None:
    """on_expiry = "keep": the loop keeps running past expiry and goes on trying to rotate, then succeeds."""
    scene = Scene(tmp_path, extra='on_expiry = "keep"')
    scene.vault.probes = [VaultUnavailableError("down")] * 100
    scene.vault.renewals = [VaultUnavailableError("down")] * 100
    scene.vault.reads = [VaultUnavailableError("down")] * 3
    renewer = scene.begin()
    scene.run(120.0, stop=lambda: renewer.snapshot()[DB].lease_id != "lease-1")
    assert not scene.loop.stopping and scene.loop.forced_exit is None
    assert scene.clock.now > 10.0, "past the old lease's expiry"
    assert len(scene.vault.called("read")) == 4 and scene.file("db_password") == "pw-2", "the fourth read won"


def test_a_rotation_whose_read_fails_is_retried_then_succeeds(scene: Scene) -> None:
    """The re-read fails once (Vault down): the rotation backs off, is posted again, and the second read wins."""
    scene.vault.probes = [(6.0, 6.0)]
    scene.vault.reads = [VaultUnavailableError("down")]
    events: list[object] = []
    renewer = scene.begin()
    original_post = renewer.post

    def post(event: object) -> None:
        events.append(event)
        original_post(event)

    renewer.post = post
    scene.run(30.0, stop=lambda: renewer.snapshot()[DB].lease_id != "lease-1")
    assert [e.reason for e in events if isinstance(e, Rotate)] == [
        "rotate_before reached",
        "retry after a failed rotation",
    ]
    assert scene.file("db_user") == "user-2" and renewer.snapshot()[DB].lease_id == "lease-2"
