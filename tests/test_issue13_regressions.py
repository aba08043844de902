"""Regression tests for the defects the review of issue 13 found (fixed in commit cc71ba9, "review fixes").

Each test fails on the commit before the fix and passes after it. Three kinds of servers appear:

- The REAL OpenBao (the session's `bao` dev server) wherever a request is meant to succeed.
- LABELLED STAND-INS (`StandIn` from tests/test_failover.py, and `Forwarder` below), plain HTTP servers on
  127.0.0.1 that record every request. They inject what a real OpenBao cannot produce on demand: an HTTP
  proxy (no proxy server is installed here; `Forwarder` passes each request to the real OpenBao), a
  node answering 503 "sealed", a 307 to a chosen node, a node that takes a request and never answers, a
  stale `leader_address` in sys/leader. A "refused" address is a port bound and closed again (a real
  refusal); a "blackhole" is a real listener whose accept queue is full, so the kernel drops the SYNs
  (a powered-off host, as the client sees it).
- A SCRIPTED Vault (`FakeVault` and `Scene` from tests/test_schedule.py, on purpose): the renewer's and
  the loop's decisions on a scripted clock, with outages timed to the instant, which a real server cannot
  give. Nothing sleeps there; the times asserted are scripted times.

Every credential is generated here (or by the real OpenBao) and registered for the session's leak hunt;
each CLI run's output is searched for them.
"""

import collections
import contextlib
import itertools
import random
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import pytest

from secret_init.config import VaultConfig
from secret_init.errors import PermissionRefusedError, SecretInitError, VaultUnavailableError
from secret_init.model import Lease
from secret_init.renewal import FAR, TokenState, token_failed
from secret_init.vault import RetiredToken, TokenInfo, VaultClient
from tests import test_failover
from tests.conftest import (
    Bao,
    QuietHandler,
    assert_no_leak,
    base_env,
    needs_root,
    random_secret,
    register_secret,
    run_cli,
    serve_http,
    stop_http,
    write_config,
)
from tests.test_failover import (
    HANG,
    LEADER,
    LOGIN,
    Answer,
    Respond,
    Seen,
    StandIn,
    config_error,
    errors,
    kv_secret,
    leader,
    logins_since,
    redirect,
    refused_addr,
    render,
)
from tests.test_schedule import DB, Clock, FakeVault, Scene, drive, new_renewer

SEALED = errors(503, "Vault is sealed")
stand_in = test_failover.stand_in  # test_failover's fixture: pytest finds it in this module's namespace


# -- labelled stand-ins ------------------------------------------------------------------------


class Forwarder:
    """A LABELLED STAND-IN in front of the REAL OpenBao at `upstream`: every request is recorded, then
    answered by `lie` when it returns an answer, else forwarded to OpenBao and its answer passed back.

    As an HTTP proxy (`HTTP_PROXY`), requests arrive in absolute form (`GET http://host:port/v1/...`):
    only those for `serves` are forwarded; any other target gets a 502, so a request the proxy should
    never have seen cannot succeed through it.
    """

    def __init__(self, upstream: str, lie: Respond = lambda seen: None, serves: str | None = None) -> None:
        self.seen: list[Seen] = []
        where = urlsplit(upstream)
        host, port = where.hostname or "127.0.0.1", where.port or 80
        forwarder = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                seen = Seen(self.command, self.path, dict(self.headers), body)
                forwarder.seen.append(seen)
                self.close_connection = True
                answer = lie(seen)
                path = self.path
                if answer is None and path.startswith("http://"):  # a proxy's request line names its target
                    target = urlsplit(path)
                    path = target.path + (f"?{target.query}" if target.query else "")
                    if target.netloc != serves:
                        answer = Answer(502, b"not a target of this proxy")
                if answer is None:
                    upstream_conn = HTTPConnection(host, port, timeout=10)
                    headers = {k: v for k, v in self.headers.items() if not k.lower().startswith("proxy-")}
                    upstream_conn.request(self.command, path, body, headers)
                    response = upstream_conn.getresponse()
                    kept = ("content-type",)
                    answer = Answer(
                        response.status,
                        response.read(),
                        tuple(f"{k}: {v}" for k, v in response.getheaders() if k.lower() in kept),
                    )
                    upstream_conn.close()
                head = [f"HTTP/1.1 {answer.status} X", *answer.headers, f"Content-Length: {len(answer.body)}"]
                self.wfile.write(("\r\n".join([*head, "Connection: close"]) + "\r\n\r\n").encode() + answer.body)

            do_GET = do_POST = do_PUT = do_DELETE = _any

        self.server, self.addr = serve_http(Handler)

    def kinds(self) -> list[str]:
        return [s.kind for s in self.seen]


@pytest.fixture
def forwarder() -> Iterator[Callable[..., Forwarder]]:
    made: list[Forwarder] = []

    def make(upstream: str, lie: Respond = lambda seen: None, serves: str | None = None) -> Forwarder:
        made.append(Forwarder(upstream, lie, serves))
        return made[-1]

    yield make
    for server in made:
        stop_http(server.server)


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A real listener whose accept queue is full: the kernel drops further SYNs, so a connection to it
    neither succeeds nor is refused, as with a powered-off host. Its address."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # the handshake goes on in the kernel
            filler.connect(listener.getsockname())
        fillers.append(filler)
    time.sleep(0.2)  # the handshakes that fit complete; the queue is full from here
    with socket.socket() as check:  # the fault is in place: a connect times out, it is not refused
        check.settimeout(0.3)
        with pytest.raises(TimeoutError):
            check.connect(listener.getsockname())
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    for filler in fillers:
        filler.close()
    listener.close()


# -- a `secret-init render` against a list of addresses -----------------------------------------


# -- 1. HTTP_PROXY and NO_PROXY ---------------------------------------------------------------------


@needs_root
@pytest.mark.hostile("faults")
def test_http_proxy_is_used_for_an_address_and_no_proxy_spares_another(
    bao: Bao, forwarder: Callable[..., Forwarder], tmpfs: Path, workdir: Path
) -> None:
    """[a refused 127.0.0.1 port, http://vault.invalid:8200] with HTTP_PROXY and NO_PROXY=127.0.0.1.

    vault.invalid resolves nowhere: only the proxy (a recording stand-in forwarding to the real OpenBao)
    can reach it. The refused address is in NO_PROXY, so it is tried directly (refused for real) and the
    proxy never hears of it. Before the fix hvac's `proxies=None` replaced the environment's proxies:
    vault.invalid was looked up in DNS and the run ended 69.
    """
    kv = kv_secret(bao)
    invalid = "http://vault.invalid:8200"
    refused = refused_addr()
    proxy = forwarder(bao.addr, serves="vault.invalid:8200")
    run = render(
        bao, kv, workdir, tmpfs / "out", [refused, invalid], auth="approle", request="1s",
        env={"HTTP_PROXY": proxy.addr, "NO_PROXY": "127.0.0.1"},
    )  # fmt: skip
    assert run.code == 0, run.stderr
    assert run.failovers() == [(refused, invalid)], run.stderr
    assert "refused" in run.logged("vault failover")[0]["error"].lower(), "tried directly, not through the proxy"
    assert [e["addr"] for e in run.logged("vault login")] == [invalid]
    targets = {urlsplit(s.path).netloc for s in proxy.seen}
    assert targets == {"vault.invalid:8200"}, f"the proxy saw {targets}: NO_PROXY ignored for {refused}"
    kinds = [f"{s.method} {urlsplit(s.path).path}" for s in proxy.seen]
    assert LOGIN in kinds and f"GET /v1/{kv.path}" in kinds, kinds


# -- 2. a login fails over from a node that drops SYNs -------------------------------------------------


@needs_root
@pytest.mark.hostile("faults")
def test_a_login_fails_over_from_a_node_that_never_completes_the_connection(
    bao: Bao, blackhole: str, tmpfs: Path, workdir: Path
) -> None:
    """[blackhole, real OpenBao], AppRole: the login's connection is never made, so nothing was sent and
    it may go to the next node. Before the fix the whole-request timer turned the connect timeout into a
    read timeout (a login that may have been served is not resent) and the run ended 69."""
    kv = kv_secret(bao)
    before = len(bao.audit_entries())
    run = render(bao, kv, workdir, tmpfs / "out", [blackhole, bao.addr], auth="approle", request="1s")
    assert run.code == 0, run.stderr
    failovers = run.logged("vault failover")
    assert run.failovers() == [(blackhole, bao.addr)], run.stderr
    assert "login" in failovers[0]["request"] and "timed out" in failovers[0]["error"], failovers
    assert [e["addr"] for e in run.logged("vault login")] == [bao.addr]
    assert logins_since(bao, before) == 1, "one login, on the real node"


# -- 3. the token expired during an outage, Vault back a second later ------------------------------------


def test_a_relogin_after_the_tokens_expiry_is_retried_about_once_a_second() -> None:
    """Pure: a failed re-login once the token has expired is retried 0.75-1.25 s later, whatever the
    failures before it (an outage's token renewals share the counter). Before the fix it backed off up
    to 30 s. A re-login before the expiry (halfway to the max TTL) still backs off."""
    for seed in range(20):
        rng = random.Random(seed)
        for errors_before in range(9, -1, -1):  # many first: the old backoff shows at once
            expired = TokenState(expires_at=20.0, renewable=True, ttl=20.0, deadline=1000.0, errors=errors_before)
            for now in (20.0, 21.3, 45.0):
                failed = token_failed(expired._replace(next_renewal=FAR, next_relogin=now), "relogin", now, rng)
                assert 0.75 <= failed.next_relogin - now <= 1.25, (seed, errors_before, now, failed)
    alive = TokenState(expires_at=20.0, renewable=True, ttl=20.0, deadline=1000.0, errors=5, next_relogin=10.0)
    assert token_failed(alive, "relogin", 10.0, random.Random(1)).next_relogin - 10.0 >= 8.0


class OutageVault(FakeVault):
    """test_schedule's SCRIPTED Vault (a fake on purpose: outages timed to the scripted instant), down
    during `down` = [start, end): token renewals, re-logins, lease probes and renewals and reads raise
    VaultUnavailableError (recorded as "<call> failed").
    It also keeps the token's expiry as Vault would: a read with an expired token is refused (403)."""

    def __init__(self, clock: Clock, token: TokenInfo, down: tuple[float, float]) -> None:
        super().__init__(clock, token)
        self.owns_token = True
        self.down = down
        self.token_expires = clock.now + token.ttl

    def _outage(self, name: str) -> None:
        if self.down[0] <= self.clock.now < self.down[1]:
            self._record(f"{name} failed")
            raise VaultUnavailableError("vault unavailable (scripted outage)")

    def renew_token(self, increment: float) -> float:
        self._outage("renew_token")
        if self.clock.now >= self.token_expires:
            raise PermissionRefusedError("permission denied (the token expired)")
        ttl = super().renew_token(increment)
        self.token_expires = self.clock.now + ttl
        return ttl

    def relogin(self) -> RetiredToken | None:
        self._outage("relogin")
        previous = super().relogin()
        self.token_expires = self.clock.now + self.token.ttl
        return previous

    def probe_lease(self, lease_id: str, duration: float) -> tuple[float, float]:
        self._outage("probe")
        return super().probe_lease(lease_id, duration)

    def renew_lease(self, lease_id: str, increment: float) -> float:
        self._outage("renew")
        return super().renew_lease(lease_id, increment)

    def read(self, path: str, purpose: str, max_size: int = 0) -> Any:
        self._outage("read")
        if self.clock.now >= self.token_expires:
            self._record("read refused")
            raise PermissionRefusedError("permission denied (the token expired)")
        return super().read(path, purpose, max_size)


PERIODIC = TokenInfo(ttl=20.0, renewable=True, max_remaining=10_000.0)  # an AppRole token: 20 s, renewable


def outage_scene(tmp_path: Path, down: tuple[float, float], lease_ttl: float = 10.0) -> tuple[Scene, OutageVault]:
    """A sidecar Scene on an owned 20 s token whose Vault is down during `down`; lease-1 lasts `lease_ttl`."""
    scene = Scene(tmp_path, token=PERIODIC)
    vault = OutageVault(scene.clock, PERIODIC, down)
    scene.vault = vault
    scene.loop.client = cast(VaultClient, vault)
    materials = scene.loop.done.materials
    materials[:] = [m._replace(lease=Lease("lease-1", lease_ttl, True, 0.0)) if m.lease else m for m in materials]
    return scene, vault


def test_vault_back_a_second_after_the_tokens_expiry_is_used_within_the_grace(tmp_path: Path) -> None:
    """Vault down from 5 s to 21.5 s: the token (20 s) expires at 20, lease-1 (10 s) at 10, and its
    expiry_grace (30 s) runs to 40. The re-login is retried about once a second from the expiry, so one
    succeeds by ~22.75 s and the rotation follows: no exit 75. Before the fix the re-login backed off with
    the outage's shared error count and came after the grace (or at ~38 s): exit 75 with Vault back."""
    scene, vault = outage_scene(tmp_path, down=(5.0, 21.5))
    renewer = scene.begin()
    scene.run(80.0, stop=lambda: renewer.snapshot()[DB].lease_id != "lease-1")
    logins = vault.times("login")
    assert scene.loop.forced_exit is None, f"exit {scene.loop.forced_exit} at {scene.clock.now:.1f} s; logins {logins}"
    assert logins and 21.5 <= logins[0] <= 22.75, f"Vault was back at 21.5 s; re-logins at {logins}"
    tries = [t for t in vault.times("relogin failed") if t >= 20.0]
    assert tries, "the re-login was tried between the expiry and Vault's return"
    gaps = [round(b - a, 2) for a, b in itertools.pairwise([*tries, logins[0]])]
    assert all(0.75 <= gap <= 1.25 for gap in gaps), gaps
    assert renewer.snapshot()[DB].lease_id != "lease-1" and scene.file("db_user") != "user-1"


# -- 4. an expired token's leases are rotated right after the re-login -------------------------------------


def test_the_leases_of_an_expired_token_are_rotated_right_after_the_relogin(tmp_path: Path) -> None:
    """A 1 h lease on a 20 s token; Vault down from 5 s to 26 s, so the token expires at 20 and Vault
    revokes its leases. The lease is treated as expired with it: rotated within ~2 s of the re-login
    (~26 s). Before the fix nothing happened until the lease's own next renewal, ~40 min later."""
    scene, vault = outage_scene(tmp_path, down=(5.0, 26.0), lease_ttl=3600.0)
    renewer = scene.begin()
    scene.run(300.0, stop=lambda: renewer.snapshot()[DB].lease_id != "lease-1")
    logins = vault.times("login")
    assert logins and 26.0 <= logins[0] <= 27.5, f"Vault was back at 26 s; re-logins at {logins}"
    login = logins[0]
    assert renewer.snapshot()[DB].lease_id != "lease-1", f"lease-1 still current at {scene.clock.now:.1f} s"
    rotated = renewer.snapshot()[DB].rotated_at
    assert rotated is not None and login <= rotated <= login + 2.5, (login, rotated)
    assert scene.loop.forced_exit is None and scene.file("db_password") != "pw-1"


# -- 5. a held lease that cannot be renewed does not spin the renewer ---------------------------------


def test_a_held_lease_that_cannot_be_renewed_never_asks_for_a_wake_in_the_past() -> None:
    """A revocable lease that is not renewable (a certificate issued with a Vault lease), rotated late and
    held in signal mode: before the fix its past renewal time was the renewer's next wake, so step()
    returned at once again and again: a busy loop until the revoke."""
    clock = Clock()
    vault = FakeVault(clock)
    renewer, _posted = new_renewer(vault, clock)
    renewer.look_up_token()
    renewer.track(DB, Lease("pki/issue/web/one", 60.0, False, 0.0))
    clock.now = 50.0  # a late rotation (after an outage, say)
    old = renewer.track(DB, Lease("pki/issue/web/two", 60.0, False, 50.0))
    assert old is not None and old.next_renewal < 50.0 < old.expires_at
    renewer.hold(old)
    for _ in range(20):
        wake = renewer.step()
        assert wake > clock.now, f"next wake {wake} at {clock.now}: the renewer would spin"
        clock.now = min(wake, clock.now + 0.5)
    assert not [name for name, _, _ in vault.calls if name in ("renew", "probe")], "nothing to renew"


# -- 6. a redirect's target that hangs is the node failed over from ---------------------------------------


@needs_root
@pytest.mark.hostile("faults")
def test_a_redirect_target_that_hangs_is_named_and_left_for_the_next_address(
    bao: Bao, stand_in: Callable[[Respond], StandIn], tmpfs: Path, workdir: Path
) -> None:
    """[A, B, C = real OpenBao]: A (stand-in) redirects the read to B (stand-in, configured), which takes it
    and never answers. The failover names B as failed and C as next; B and A get no second try. Before the
    fix the timeout carried no request, so A was named, and the round went on to B again."""
    kv = kv_secret(bao)
    b = stand_in(lambda seen: HANG)
    a = stand_in(lambda seen: SEALED if seen.kind == LEADER else redirect(b.addr)(seen))
    run = render(bao, kv, workdir, tmpfs / "out", [a.addr, b.addr, bao.addr], auth="token", request="1s")
    assert run.code == 0, run.stderr
    assert run.failovers() == [(b.addr, bao.addr)], run.stderr
    failover = run.logged("vault failover")[0]
    assert "timed out" in failover["error"] and kv.path in failover["request"], failover
    read = f"GET /v1/{kv.path}"
    assert a.kinds() == [LEADER, read] and b.kinds() == [read], (a.kinds(), b.kinds())
    assert run.logged("vault request failed, retrying") == [], "one round"


# -- 7. a stale sys/leader hint does not end the round before the healthy node -------------------------------


@needs_root
@pytest.mark.hostile("faults")
def test_a_stale_leader_hint_does_not_keep_the_round_from_the_healthy_node(
    bao: Bao, stand_in: Callable[[Respond], StandIn], forwarder: Callable[..., Forwarder], tmpfs: Path,
    workdir: Path,
) -> None:  # fmt: skip
    """[A refused, B 503 sealed, C]: C is the real OpenBao behind a stand-in whose sys/leader still names A
    (stale, mid-election). The read succeeds on C in the first round. Before the fix the hint sent the
    round's last try back to A, every round: C never got the read and the run ended 69."""
    kv = kv_secret(bao)
    a = refused_addr()
    b = stand_in(lambda seen: SEALED)
    c = forwarder(bao.addr, lie=lambda seen: leader(a) if seen.kind == LEADER else None)
    run = render(bao, kv, workdir, tmpfs / "out", [a, b.addr, c.addr], auth="token", startup="3s", request="1s")
    assert run.code == 0, run.stderr
    assert run.failovers() == [(a, b.addr), (b.addr, c.addr)], run.stderr
    read = f"GET /v1/{kv.path}"
    assert b.kinds() == [read], b.kinds()
    assert c.kinds().count(read) == 1 and c.kinds().count(LEADER) == 1, c.kinds()
    assert run.logged("vault request failed, retrying") == [], "one round"


# -- 8. one sys/leader per round when every node answers 503 --------------------------------------------


@pytest.mark.hostile("faults")
def test_every_node_sealed_costs_one_sys_leader_per_renewal_try(stand_in: Callable[[Respond], StandIn]) -> None:
    """Three stand-ins all answering 503 (an election, say). After the start each renewal try is one round of
    the addresses, and near a lease's expiry the renewer makes one about every second: each try is one
    renewal per node and ONE sys/leader. Before the fix every failover asked sys/leader again: two per
    try, on top of the three renewals."""
    nodes = [stand_in(lambda seen: SEALED) for _ in range(3)]
    token = random_secret("tok")
    cfg = VaultConfig(addr=tuple(n.addr for n in nodes), startup_timeout=0.0, request_timeout=1.0)
    client = VaultClient(cfg, {"VAULT_TOKEN": token})
    client.login()
    client.end_startup()
    renew = "PUT /v1/sys/leases/renew"
    with pytest.raises(VaultUnavailableError):  # the first request also asks sys/leader once, before anything
        client.renew_lease("database/creds/app/abc", 8)
    for attempt in range(3):
        before = [len(n.seen) for n in nodes]
        with pytest.raises(VaultUnavailableError) as caught:
            client.renew_lease("database/creds/app/abc", 8)
        assert caught.value.exit_code == 69 and "HTTP 503" in str(caught.value)
        sent = collections.Counter(s.kind for n, b in zip(nodes, before, strict=True) for s in n.seen[b:])
        assert sent == {renew: 3, LEADER: 1}, (attempt, sent)
        assert_no_leak(str(caught.value), token)
    assert all(s.headers.get("X-Vault-Token") == token for n in nodes for s in n.seen if s.kind == renew)


# -- 9. a held lease Vault says is gone is not revoked --------------------------------------------------


def lease_not_found(bao: Bao) -> SecretInitError:
    """What the client raises when the REAL OpenBao refuses to renew a lease it does not know (400)."""
    token = register_secret(bao.client.auth.token.create(policies=["default"], ttl="60s")["auth"]["client_token"])
    client = VaultClient(VaultConfig(addr=bao.addr, startup_timeout=0.0, request_timeout=5.0), {"VAULT_TOKEN": token})
    client.login()
    client.end_startup()
    with pytest.raises(SecretInitError) as caught:
        client.renew_lease(f"database/creds/app/{secrets.token_hex(8)}", 8)
    assert "lease not found" in str(caught.value) and caught.value.exit_code != 69, caught.value
    assert_no_leak(str(caught.value), token)
    return caught.value


class GoneVault(FakeVault):
    """test_schedule's SCRIPTED Vault (a fake on purpose): once lease-2 exists, renewing lease-1 raises
    `gone`, the error the real client raised for OpenBao's 400 "lease not found"."""

    def __init__(self, clock: Clock, gone: SecretInitError) -> None:
        super().__init__(clock)
        self.gone = gone

    def renew_lease(self, lease_id: str, increment: float) -> float:
        if lease_id == "lease-1" and self.issued > 1:
            self._record("renew refused", lease_id)
            raise self.gone
        return super().renew_lease(lease_id, increment)


def test_a_held_lease_whose_renewal_says_lease_not_found_is_not_revoked(bao: Bao, tmp_path: Path) -> None:
    """Sidecar, stop_timeout 8 s: lease-1 is rotated away at ~20.8 s and held (renewed) until its revoke 8 s
    later. Its last renewal made it last past that revoke, but the next one gets "lease not found": Vault
    dropped it. So no revoke is sent, then or at exit: OpenBao answers a revoke of an unknown lease as it
    answers a real one, and "lease revoked" would lie. Before the fix the refusal ended the hold and the
    delayed revoke went out as if the lease were alive."""
    gone = lease_not_found(bao)
    scene = Scene(tmp_path, stop_timeout="8s")
    vault = GoneVault(scene.clock, gone)
    scene.vault = vault
    scene.loop.client = cast(VaultClient, vault)
    vault.probes = [(30.0, 10.0)]  # a max TTL 30 s away: rotated at about 20.8 s
    renewer = scene.begin()
    scene.run(60.0, stop=lambda: renewer.snapshot()[DB].lease_id != "lease-1")
    rotated = renewer.snapshot()[DB].rotated_at
    assert rotated is not None and renewer.snapshot()[DB].lease_id == "lease-2"
    scene.run(rotated + 20.0)
    revoke_due = rotated + 8.0
    renewed = [at for at, (lease_id, _) in vault.called("renew") if lease_id == "lease-1"]
    assert renewed and renewed[-1] + 10.0 > revoke_due, "without Vault's answer it would still be alive then"
    refused = vault.times("renew refused")
    assert refused and refused[0] < revoke_due, "the held lease's renewal was refused before its revoke"
    assert not scene.loop.pending_revokes, "the delayed revoke came due"
    assert "lease-1" not in [arg for _, arg in vault.called("revoke")]
    scene.loop.finish()
    assert "lease-1" not in [arg for _, arg in vault.called("revoke")], "nor at exit"


# -- 10. expire() re-checks the expiry -------------------------------------------------------------------


def test_expire_refuses_a_lease_renewed_after_the_loops_snapshot() -> None:
    """The loop saw lease-1 expiring at 10 s; a renewal answered since (the renewer thread), so at 10.5 s
    expire() must say no and leave it alive. Before the fix it marked the fresh lease expired, which
    started a needless rotation and its expiry_grace."""
    clock = Clock()
    vault = FakeVault(clock)
    renewer, posted = new_renewer(vault, clock)
    renewer.look_up_token()
    renewer.track(DB, Lease("lease-1", 10.0, True, 0.0))
    stale = renewer.snapshot()[DB]
    drive(renewer, clock, 9.0, stop=lambda: bool(vault.called("probe")))  # the probe renews it back to 10 s
    assert vault.called("probe") and stale.expires_at == 10.0
    fresh = renewer.snapshot()[DB]
    assert fresh.expires_at > 10.5, fresh
    clock.now = 10.5  # past the loop's stale expiry, before the real one
    assert renewer.expire(DB, stale.lease_id) is False
    assert not renewer.snapshot()[DB].expired and posted == []


# -- the config: one node listed twice ---------------------------------------------------------------------


@pytest.mark.hostile("config")
def test_an_address_listed_again_with_its_default_port_is_78(tmpfs: Path, workdir: Path) -> None:
    """https://v and https://v:443 are the same node. Before the fix the text differed, so it was accepted."""
    token = random_secret("tok")
    cfg = write_config(
        workdir,
        f'[output]\ndir = "{tmpfs}/out"\n[vault]\naddr = ["https://v", "https://v:443"]\n'
        'startup_timeout = "1s"\n[[secret]]\nname = "k"\nsource = "vault:secret/data/app/x#k"\n',
    )
    result = run_cli("render", "--config", str(cfg), env=base_env(VAULT_TOKEN=token))
    assert result.returncode == 78, result.stderr
    message = config_error(result.stderr)
    assert "addr" in message and "listed twice" in message and "https://v:443" in message, message
    assert_no_leak(result.stdout + result.stderr, token)
    assert not (tmpfs / "out").exists()
