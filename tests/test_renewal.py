"""The renewal schedule as pure functions, with a scripted clock and seeded randomness."""

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secret_init.renewal import (
    FAR,
    ROTATION_LEAD,
    ROTATION_LEAD_MIN,
    TTL_GRANULARITY,
    LeaseState,
    after_error,
    after_probe,
    after_renewal,
    after_rotation_failed,
    grace_for,
    new_lease,
    next_wake,
    renewal_time,
    rotate_at,
    rotate_before,
    unprobed_lease,
)


def lease(duration: float = 3, deadline: float = 9, renewable: bool = True, seed: int = 1) -> LeaseState:
    return new_lease("database/creds/app", "lease-1", duration, renewable, 0.0, deadline, random.Random(seed))


def test_renewal_lands_at_about_70_percent() -> None:
    """2/3 of the remaining time plus 1/3 of a 10-20% grace: between 70% and 73.4% of the TTL."""
    for seed in range(50):
        state = lease(duration=100, deadline=1000, seed=seed)
        assert 70.0 <= state.next_renewal <= 73.4


def test_grace_is_10_to_20_percent() -> None:
    rng = random.Random(7)
    graces = [grace_for(60, rng) for _ in range(200)]
    assert min(graces) >= 6 and max(graces) <= 12
    assert max(graces) - min(graces) > 4, "jittered, not constant"


def test_default_rotate_before_is_a_third_of_the_whole_life() -> None:
    """A 12 s max TTL rotates about 4 s before expiry, a 24 h one about 8 h before."""
    assert rotate_before(lease(deadline=12), None) == pytest.approx(4)
    assert rotate_before(lease(duration=3600, deadline=86400), None) == pytest.approx(8 * 3600)
    assert rotate_before(lease(deadline=12), 2.0) == 2.0
    day = lease(duration=3600, deadline=86400)
    assert rotate_at(day, None) == pytest.approx(86400 - 8 * 3600 * (1 + ROTATION_LEAD)), "a fifth early"
    assert rotate_at(lease(deadline=12), None) == pytest.approx(12 - 4 - ROTATION_LEAD_MIN), "at least 1 s early"
    assert rotate_at(lease(duration=1, deadline=2), None) == pytest.approx(0.8), "never in the first 40%"


def test_renewal_never_passes_the_deadline() -> None:
    state = lease(duration=3, deadline=9)
    renewed = after_renewal(state, now=8.0, ttl=3, rng=random.Random(1))
    assert renewed.expires_at == 9
    assert renewed.last_renewal == 8.0


def test_errors_back_off_but_never_past_expiry() -> None:
    state = lease(duration=30, deadline=300)
    rng = random.Random(3)
    delays = []
    for _ in range(8):
        state = after_error(state, now=10.0, rng=rng)
        delays.append(state.next_renewal - 10.0)
    assert delays[0] <= 1.0 and delays[3] > delays[0]
    assert all(10.0 + d <= state.expires_at for d in delays)
    short = after_error(lease(duration=3, deadline=9), now=2.95, rng=random.Random(1))
    assert short.next_renewal == FAR, "no try fits in the last LAST_TRY_MARGIN: rotation takes over"


def test_the_last_second_before_expiry_gets_at_most_two_renewal_tries() -> None:
    """Failures near expiry retry about once a second, never halving the time left (7-10 tries in the last
    0.3 s before)."""
    for seed in range(50):
        rng = random.Random(seed)
        state, now, tries = lease(duration=30, deadline=300), 20.0, []
        while state.next_renewal != FAR:
            tries.append(now)
            state = after_error(state, now=now, rng=rng)
            now = state.next_renewal
        last_second = [t for t in tries if t > state.expires_at - 1.0]
        assert len(last_second) <= 2 and all(t <= state.expires_at - 0.25 for t in tries), tries
        assert all(b - a >= 0.25 for a, b in itertools.pairwise(tries)), tries


def test_a_failed_rotation_near_expiry_is_retried_about_a_second_later_whatever_its_count() -> None:
    """Its own counter: a tenth failure far from expiry backs off long; near or past expiry, about 1 s."""
    far = lease(duration=300, deadline=3000)._replace(rotation_errors=9, rotating=True)
    assert after_rotation_failed(far, now=10.0, rng=random.Random(1)).retry_at - 10.0 >= 15.0
    near = far._replace(expires_at=12.0)
    assert 0.75 <= after_rotation_failed(near, now=10.0, rng=random.Random(1)).retry_at - 10.0 <= 1.25
    past = far._replace(expires_at=5.0, expired=True)
    assert 0.75 <= after_rotation_failed(past, now=10.0, rng=random.Random(1)).retry_at - 10.0 <= 1.25
    done = past._replace(gave_up=True)
    assert after_rotation_failed(done, now=10.0, rng=random.Random(1)).retry_at - 10.0 >= 15.0


def test_renewal_failures_do_not_delay_the_first_rotation_retry() -> None:
    """An outage's eight renewal failures, then the rotation's first: backed off 0.5-1 s, by its own count
    (a shared counter put it 15-30 s late, far from expiry too)."""
    outage = lease(duration=300, deadline=3000)._replace(errors=8, rotating=True)
    retried = after_rotation_failed(outage, now=10.0, rng=random.Random(1))
    assert 0.5 <= retried.retry_at - 10.0 <= 1.0 and retried.rotation_errors == 1 and retried.errors == 8


def test_next_wake_is_the_earliest_duty() -> None:
    state = lease(duration=3, deadline=9)
    assert next_wake(state, None) == pytest.approx(state.next_renewal)
    late = after_renewal(state, now=5.0, ttl=3, rng=random.Random(1))  # expires at 8, rotate at 5.4
    assert next_wake(late, None) == pytest.approx(rotate_at(late, None))


@given(
    duration=st.floats(min_value=1, max_value=86400),
    extra=st.floats(min_value=0, max_value=86400 * 30),
    now_fraction=st.floats(min_value=0, max_value=1),
    seed=st.integers(0, 2**32),
)
def test_schedule_invariants(duration: float, extra: float, now_fraction: float, seed: int) -> None:
    """Whatever the TTLs: renew before expiry, never extend past the deadline, rotate before it."""
    deadline = duration + extra
    rng = random.Random(seed)
    state = new_lease("p", "l", duration, True, 0.0, deadline, rng)
    assert 0 < state.next_renewal < state.expires_at <= deadline
    now = now_fraction * state.expires_at
    renewed = after_renewal(state, now, duration, rng)
    assert renewed.expires_at <= deadline
    assert now <= renewed.next_renewal <= renewed.expires_at
    assert rotate_at(state, None) < deadline
    assert renewal_time(now, 0.0, 0.0) == now


def test_an_unprobed_lease_waits_only_for_its_probe() -> None:
    unprobed = unprobed_lease("p", "l", 30, 0.0, FAR, None, random.Random(1))
    assert not unprobed.probed and unprobed.deadline == 30
    # Provisional deadline 30: rotation could be due at 30 - 10 * 1.2 = 18, before the ~21 s renewal.
    assert next_wake(unprobed, None) == unprobed.next_renewal == pytest.approx(18)
    probed = after_probe(unprobed, 18.0, max_remaining=582, ttl=30, rng=random.Random(1))
    assert probed.probed and probed.issued_at == 0 and probed.expires_at == 48
    assert probed.deadline == 600 - TTL_GRANULARITY, "Vault's whole seconds may be rounded up"
    assert rotate_before(probed, None) == pytest.approx(599 / 3), "a third of the life from issue, not from the probe"


def test_the_probe_is_capped_by_the_token() -> None:
    unprobed = unprobed_lease("p", "l", 30, 0.0, 20.0, None, random.Random(1))
    assert unprobed.deadline == 20 and unprobed.expires_at == 20
    probed = after_probe(unprobed, 5.0, max_remaining=595, ttl=30, rng=random.Random(1))
    assert probed.deadline == 20 and probed.expires_at == 20, "its own token's end, whatever token is current"


@given(
    duration=st.floats(min_value=1, max_value=86400),
    extra=st.floats(min_value=0, max_value=86400 * 30),
    configured=st.none() | st.floats(min_value=0.1, max_value=86400),
    seed=st.integers(0, 2**32),
)
def test_the_probe_comes_before_any_rotation(
    duration: float, extra: float, configured: float | None, seed: int
) -> None:
    """Probing lazily is safe: whatever the max TTL turns out to be, no rotation was due earlier.

    Earlier, that is, than the 1 s the probe's answer is rounded by.
    """
    rng = random.Random(seed)
    unprobed = unprobed_lease("p", "l", duration, 0.0, FAR, configured, rng)
    probe_at = next_wake(unprobed, configured)
    assert 0 < probe_at < unprobed.expires_at
    max_remaining = duration + extra - probe_at
    probed = after_probe(unprobed, probe_at, max_remaining, min(duration, max_remaining), rng)
    assert probe_at <= rotate_at(unprobed, configured) <= rotate_at(probed, configured) + TTL_GRANULARITY + 1e-6
    assert probe_at < probed.expires_at <= probed.deadline
