"""compose/stack.yml, unchanged, on a Swarm of three Docker engines in a private network.

The network (tests/netns.py): a hub namespace holding a bridge, OpenBao and PostgreSQL, and three node
namespaces, each with its own dockerd (own data root, exec root, pidfile, socket, hostname): one manager
and two workers, joined with `docker swarm join` over a private /24 that reaches nothing else. Swarm's
own traffic (2377, 7946) and every request a task makes cross that bridge; nothing is on loopback but
the test's admin calls to OpenBao (the hub's own 127.0.0.1, from a thread inside the hub).

What is deployed, and what the test adds:
- compose/stack.yml and compose/stack.toml byte for byte: the secrets and the config are made as the
  stack file's header says (`docker config create secret_init_config compose/stack.toml` included),
  and the stack is deployed as `app`.
- The stack's image, registry.example.com/my-app:1.0, is what its comment says it is: an image built
  FROM the repository's Dockerfile (the test image), adding the app (a probe that logs in to PostgreSQL
  every 200 ms with the rendered credentials and asks who it is) and the CA of the test's OpenBao
  (`VAULT_CACERT`).
- compose/stack.toml's addr, https://vault.example.com:8200, names the hub: each engine's /etc/hosts says
  so (host-network containers get a copy of it), and OpenBao's TLS listener there serves a certificate
  for that name from a CA made here. OpenBao's database role is `app`, as stack.toml reads
  `database/creds/app`, with a 3 s TTL and a 9 s max TTL so that a task rotates every few seconds.
- A second compose file makes the stack's default network the existing `host` network (what
  `docker service create --network host` does in stack form). These engines have no bridge, no iptables
  and no NAT (the rules of this suite), so an overlay network could not reach OpenBao.
- The manager is drained before the deploy, as production managers often are, so the task runs on a worker.
"""

import json
import shutil
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
import yaml

from tests import figures
from tests.conftest import (
    REPO,
    Bao,
    Postgres,
    assert_no_leak,
    configure_bao,
    connect_database,
    live_leases,
    log_events,
    postgres_bin,
    random_secret,
    record_output,
    register_secret,
    start_bao,
    start_postgres,
    stop_bao,
    stop_postgres,
    wait_ready,
)
from tests.engine import DOCKER, Engine, build_image, buildkit, engine_missing, stop_engine
from tests.netns import Namespace, NetnsThread, netns_missing, private_network, start_engine_in

STACK_FILE = REPO / "compose" / "stack.yml"
STACK_CONFIG = REPO / "compose" / "stack.toml"
STACK = "app"  # `docker stack deploy -c compose/stack.yml app`, as its header says
SERVICE = f"{STACK}_app"
AUDIT_DEVICE = "file"  # conftest's start_bao declares `audit "file" "file"`
PG_PORT = 5432  # in the hub's own namespace: nothing else listens there
T = TypeVar("T")


def _stack_facts() -> tuple[str, str, str]:
    """The image compose/stack.yml names, the Vault address and the leased path compose/stack.toml reads."""
    image = yaml.safe_load(STACK_FILE.read_text())["services"]["app"]["image"]
    config = tomllib.loads(STACK_CONFIG.read_text())
    leased = [s["source"].removeprefix("vault:") for s in config["secret"] if s["source"].startswith("vault:")]
    assert len(leased) == 1, "compose/stack.toml reads one leased path"
    return image, config["vault"]["addr"], leased[0]


APP_IMAGE, VAULT_ADDR, CREDS = _stack_facts()
VAULT_HOST, VAULT_PORT = urlsplit(VAULT_ADDR).hostname or "", urlsplit(VAULT_ADDR).port or 443

# The stack's default network is the engines' `host` network (an override file; stack.yml is untouched).
HOST_NETWORK = 'version: "3.8"\nnetworks:\n  default:\n    external: true\n    name: host\n'

# The app of the stack's image: logs in to PostgreSQL every 200 ms with the credentials secret-init
# rendered (DB_CREDENTIALS_FILE, compose/stack.toml's db.json) and asks the server who it is and from where.
APP = r"""
import json, os, signal, subprocess, sys, time
creds = json.load(open(os.environ["DB_CREDENTIALS_FILE"]))
user, password = creds["username"], creds["password"]
def say(**event):
    event["t"] = time.time()
    os.write(1, (json.dumps(event) + "\n").encode())
def on_term(signum, frame):
    say(event="stop", user=user)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
say(event="start", user=user, static=os.path.isfile(os.environ["DB_STATIC_PASSWORD_FILE"]))
while True:
    r = subprocess.run(
        ["psql", "-h", os.environ["DB_HOST"], "-p", os.environ["DB_PORT"], "-U", user, "-d", "postgres", "-w",
         "-tAc", "select current_user || ' ' || host(inet_client_addr())"],
        env={"PGPASSWORD": password, "PATH": "/usr/bin:/bin", "PGCONNECT_TIMEOUT": "2"},
        capture_output=True, text=True,
    )
    say(event="probe", ok=r.returncode == 0, user=user, seen=r.stdout.strip(), error=r.stderr.strip()[-200:])
    time.sleep(0.2)
"""

APP_DOCKERFILE = """\
FROM {base}
COPY app.py vault-ca.pem /usr/local/share/app/
ENV VAULT_CACERT=/usr/local/share/app/vault-ca.pem DB_HOST={db_host} DB_PORT={db_port}
CMD ["python3", "/usr/local/share/app/app.py"]
"""


@dataclass(frozen=True)
class Node:
    name: str
    namespace: Namespace
    engine: Engine
    node_id: str

    @property
    def addr(self) -> str:
        return self.namespace.addr


@dataclass(frozen=True)
class Task:
    task_id: str
    node: Node
    container: str


@dataclass
class Lab:
    hub: NetnsThread  # the test's calls to OpenBao run inside the hub
    bao: Bao
    pg: Postgres
    manager: Node
    workers: tuple[Node, Node]
    role_id: str
    secret_id: str
    static_password: str

    @property
    def nodes(self) -> tuple[Node, ...]:
        return (self.manager, *self.workers)

    def leases(self) -> list[str]:
        """The live leases under the stack's path, as OpenBao's root token sees them."""
        return self.hub.call(live_leases, self.bao, CREDS)

    def audit_hash(self, value: str) -> str:
        digest: str = self.hub.call(self.bao.client.sys.calculate_hash, AUDIT_DEVICE, value)["data"]["hash"]
        return digest

    def audit_mark(self) -> int:
        return len(self.bao.audit_entries())

    def requests_from(self, addr: str, path: str, since: int) -> list[dict[str, Any]]:
        """The requests to `path` that OpenBao's audit log says came from `addr`, after entry `since`."""
        return [
            e["request"]
            for e in self.bao.audit_entries()[since:]
            if e.get("type") == "request"
            and e["request"].get("path") == path
            and e["request"].get("remote_address") == addr
        ]

    def node(self, node_id: str) -> Node:
        (node,) = [n for n in self.nodes if n.node_id == node_id]
        return node

    def tasks(self) -> list[dict[str, Any]]:
        ids = self.manager.engine.docker("service", "ps", "--quiet", "--no-trunc", SERVICE, check=False).stdout.split()
        if not ids:
            return []
        found: list[dict[str, Any]] = json.loads(
            self.manager.engine.docker("inspect", *ids, check=False).stdout or "[]"
        )
        return found

    def running_task(self, timeout: float = 60, not_on: Node | None = None) -> Task:
        """The service's running task. Swarm says "running" only once the image's HEALTHCHECK
        (`secret-init health`, every 30 s) has passed: until then the task is "starting"."""

        def running() -> Task | None:
            for task in self.tasks():
                container = task["Status"].get("ContainerStatus", {}).get("ContainerID")
                if task["DesiredState"] == task["Status"]["State"] == "running" and container:
                    node = self.node(task["NodeID"])
                    if node != not_on:
                        return Task(task["ID"], node, container)
            return None

        def states() -> str:
            said = []
            for task in self.tasks():
                where = self.node(task["NodeID"]).name if task.get("NodeID") else "unassigned"
                said.append(f"{where} {task['Status']['State']} {task['Status'].get('Err', '')}")
            return ", ".join(said)

        return wait_for(running, timeout, lambda: f"no running task of {SERVICE}: {states()}")


def wait_for(probe: Callable[[], T | None], timeout: float, what: Callable[[], str]) -> T:
    """Polls `probe` until it answers something true; fails with `what()` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (answer := probe()):
        assert time.monotonic() < deadline, what()
        time.sleep(0.5)
    return answer


@dataclass
class Logs:
    """A task container's output on its own engine: the app's JSON lines (stdout), secret-init's (stderr)."""

    app: list[dict[str, Any]]
    log: list[dict[str, Any]]
    text: str

    def __repr__(self) -> str:  # short in assertion messages; the text goes where a test puts it
        return f"Logs({len(self.app)} app lines, {len(self.log)} secret-init lines)"

    @classmethod
    def parse(cls, stdout: str, stderr: str) -> "Logs":
        record_output(stdout, "swarm task stdout (the app through secret-init)")
        record_output(stderr, "swarm task stderr (secret-init)")
        return cls(log_events(stdout), log_events(stderr), stdout + stderr)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.app + self.log if e.get("event") == name]

    def tracked(self) -> set[str]:
        return {e["lease_id"] for e in self.events("lease tracked")}

    def revoked(self) -> set[str]:
        return {e["lease_id"] for e in self.events("lease revoked")}


def logs(task: Task) -> Logs:
    result = task.node.engine.docker("logs", task.container, check=False)
    return Logs.parse(result.stdout, result.stderr)


def follow(task: Task) -> "subprocess.Popen[str]":
    """`docker logs --follow` on the task's engine: it ends, with everything, when the container stops."""
    return subprocess.Popen(
        [DOCKER, "logs", "--follow", task.container],
        env=task.node.engine.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def followed(process: "subprocess.Popen[str]", timeout: float = 90) -> Logs:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return Logs.parse(stdout, stderr)


def wait_logs(task: Task, done: Callable[[Logs], bool], timeout: float) -> Logs:
    seen: list[Logs] = []

    def ready() -> Logs | None:
        seen[:] = [logs(task)]
        return seen[0] if done(seen[0]) else None

    return wait_for(
        ready, timeout, lambda: f"the task on {task.node.name} said: {seen[0].text[-3000:] if seen else ''}"
    )


def issued_password(task: Task) -> str:
    """The database password secret-init rendered in the task (read as the app user), for the leak hunt."""
    result = task.node.engine.docker("exec", "--user", "10001", task.container, "cat", "/run/app-secrets/db.json")
    return register_secret(json.loads(result.stdout)["password"], "database password issued to a swarm task")


def deploy(lab: Lab, workdir: Path) -> None:
    override = workdir / "host-network.yml"
    override.write_text(HOST_NETWORK)
    lab.manager.engine.docker(
        "stack", "deploy", "--resolve-image", "never", "-c", str(STACK_FILE), "-c", str(override), STACK
    )


def remove_stack(lab: Lab) -> None:
    """`docker stack rm`, then wait until no container of the service is left on any engine."""
    lab.manager.engine.docker("stack", "rm", STACK, check=False)

    def gone() -> bool:
        label = f"label=com.docker.swarm.service.name={SERVICE}"
        return not any(n.engine.docker("ps", "-aq", "--filter", label, check=False).stdout.split() for n in lab.nodes)

    wait_for(gone, 90, lambda: f"containers of {SERVICE} are still there after `docker stack rm`")


# -- the lab ------------------------------------------------------------------------------------


def vault_certificate(directory: Path, addr: str) -> tuple[Path, Path, Path]:
    """A CA made here by openssl, and a certificate it signed for VAULT_HOST and `addr`: (ca, cert, key)."""
    binary = shutil.which("openssl")
    if binary is None:
        pytest.skip("needs the openssl command to make a CA")

    def openssl(*args: str) -> None:
        subprocess.run([binary, *args], check=True, capture_output=True)

    directory.mkdir(mode=0o700, parents=True)
    ca_key, ca, key, csr, cert, ext = (
        str(directory / n) for n in ("ca.key", "ca.pem", "tls.key", "tls.csr", "tls.pem", "tls.ext")
    )
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        "req", "-x509", *curve, "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", "/CN=secret-init swarm test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    openssl("req", "-new", *curve, "-keyout", key, "-out", csr, "-subj", f"/CN={VAULT_HOST}")
    Path(ext).write_text(
        f"subjectAltName = DNS:{VAULT_HOST}, IP:{addr}\nbasicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\nextendedKeyUsage = serverAuth\n"
    )
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "1",
            "-extfile", ext, "-out", cert)  # fmt: skip
    for pem in (ca_key, key):
        register_secret(Path(pem).read_text().strip(), "swarm test CA key")
    return Path(ca), Path(cert), Path(key)


def start_postgres_in(hub: Namespace, bin_dir: Path, network: str) -> Postgres:
    """conftest.start_postgres, inside the hub: on its loopback (for OpenBao next to it) and on its private
    address (for the apps on the nodes, which pg_hba lets in with a password from `network` only)."""
    return start_postgres(
        bin_dir,
        port=PG_PORT,
        listen=f"127.0.0.1,{hub.addr}",
        hba=(f"host all all {network} scram-sha-256",),
        wrap=lambda argv: hub.argv(*argv),
    )


def start_vault(stack: ExitStack, hub: NetnsThread, state: Path, tls: tuple[Path, Path, Path]) -> Bao:
    """conftest's dev server, started from inside the hub: its dev listener on the hub's 127.0.0.1 (the test's
    admin calls), and a TLS listener on the hub's private address at VAULT_PORT (the tasks' calls)."""
    import hvac

    ca, cert, key = tls
    listener = (
        f'listener "tcp" {{\n  address = "{hub.namespace.addr}:{VAULT_PORT}"\n'
        f'  tls_cert_file = "{cert}"\n  tls_key_file = "{key}"\n}}\n'
    )
    server, addr, token = hub.call(start_bao, state, extra_config=listener)
    stack.callback(stop_bao, server)
    client = hvac.Client(url=addr, token=token)
    hub.call(wait_ready, client, server, state / "server.log")
    tls_client = hvac.Client(url=f"https://{hub.namespace.addr}:{VAULT_PORT}", verify=str(ca))
    hub.call(wait_ready, tls_client, server, state / "server.log")
    hub.call(configure_bao, client)
    return Bao(addr, token, state / "audit.log", client, server.pid)


def make_images(manager: Engine, workers: list[Engine], workdir: Path, ca: Path, db_host: str) -> None:
    """The test image on the manager, the stack's image FROM it, and that image loaded on the workers."""
    base = build_image(manager, workdir)
    context = workdir / "app-image"
    context.mkdir()
    (context / "app.py").write_text(APP)
    shutil.copy(ca, context / "vault-ca.pem")
    (context / "Dockerfile").write_text(APP_DOCKERFILE.format(base=base, db_host=db_host, db_port=PG_PORT))
    result = buildkit(manager, context, "-t", APP_IMAGE)
    assert result.returncode == 0, f"the app image did not build: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    saved = workdir / "app-image.tar"
    manager.docker("save", "-o", str(saved), APP_IMAGE)
    for worker in workers:
        worker.docker("load", "-i", str(saved))
    saved.unlink()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    for reason in (engine_missing(), netns_missing()):
        if reason:
            pytest.skip(reason)
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("needs Debian's postgresql package (scripts/bootstrap installs it)")
    workdir = tmp_path_factory.mktemp("swarm")
    engines: list[Engine] = []
    with ExitStack() as stack:
        net = stack.enter_context(private_network(["manager", "worker1", "worker2"]))
        for namespace in (net.hub, *net.nodes):  # no way out: no default route, v4 or v6
            routes = namespace.routes()
            assert routes and not [r for r in routes if r.startswith("default")], routes
        hub = NetnsThread(net.hub)
        stack.callback(hub.close)
        pg = start_postgres_in(net.hub, bin_dir, str(net.network))
        stack.callback(stop_postgres, pg)
        tls = vault_certificate(workdir / "pki", net.hub.addr)
        (workdir / "bao").mkdir()
        bao = start_vault(stack, hub, workdir / "bao", tls)
        hub.call(connect_database, bao, pg)
        hub.call(
            bao.client.write,
            f"database/roles/{CREDS.rsplit('/', 1)[1]}",
            db_name="pg",
            default_ttl="3s",
            max_ttl="9s",
            creation_statements=["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
                                 "VALID UNTIL '{{expiration}}';"],
        )  # fmt: skip

        def leftovers() -> None:
            live = hub.call(live_leases, bao, "database/creds")
            figures.record_leftovers("live leases under database/creds (swarm lab)", live)
            usable = "select rolname from pg_roles where rolname like 'v-%' and rolvaliduntil > now()"
            figures.record_leftovers("usable database roles made by Vault (swarm lab)", pg.sql(usable).split())

        stack.callback(leftovers)

        hosts = f"127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n{net.hub.addr} {VAULT_HOST}\n"
        for namespace, name in zip(net.nodes, ("manager", "worker1", "worker2"), strict=True):
            engine = start_engine_in(namespace, f"si-{name}", hosts)
            stack.callback(stop_engine, engine)
            engines.append(engine)
        stack.callback(figures.record_image_histories, engines[0])
        make_images(engines[0], engines[1:], workdir, tls[0], net.hub.addr)

        manager_addr = net.nodes[0].addr
        engines[0].docker("swarm", "init", "--advertise-addr", manager_addr, "--listen-addr", f"{manager_addr}:2377")
        join = register_secret(engines[0].docker("swarm", "join-token", "-q", "worker").stdout.strip(), "join token")
        for engine, namespace in zip(engines[1:], net.nodes[1:], strict=True):
            engine.docker(
                "swarm", "join", "--token", join, "--advertise-addr", namespace.addr,
                "--listen-addr", f"{namespace.addr}:2377", f"{manager_addr}:2377",
            )  # fmt: skip
        nodes = [
            Node(name, namespace, engine, engine.docker("info", "--format", "{{.Swarm.NodeID}}").stdout.strip())
            for name, namespace, engine in zip(("manager", "worker1", "worker2"), net.nodes, engines, strict=True)
        ]
        manager, worker1, worker2 = nodes
        listed = manager.engine.docker("node", "ls", "--format", "{{.ID}} {{.Status}} {{.ManagerStatus}}").stdout
        assert sorted(listed.split("\n")) == sorted(
            ["", f"{manager.node_id} Ready Leader", f"{worker1.node_id} Ready ", f"{worker2.node_id} Ready "]
        ), listed
        manager.engine.docker("node", "update", "--availability", "drain", manager.node_id)

        # The stack file's header, word for word but for stdin instead of the .txt files.
        role_id = hub.call(bao.client.auth.approle.read_role_id, "app")["data"]["role_id"]
        secret_id = hub.call(bao.client.auth.approle.generate_secret_id, "app")["data"]["secret_id"]
        register_secret(role_id, "approle role_id")
        register_secret(secret_id, "approle secret_id")
        static_password = random_secret("static")
        for name, value in (
            ("vault_role_id", role_id), ("vault_secret_id", secret_id), ("db_static_password", static_password)
        ):  # fmt: skip
            manager.engine.docker("secret", "create", name, "-", input=value)
        manager.engine.docker("config", "create", "secret_init_config", str(STACK_CONFIG))

        yield Lab(hub, bao, pg, manager, (worker1, worker2), role_id, secret_id, static_password)
    left = [str(engine.root) for engine in engines if engine.root.exists()]
    assert not left, f"engine state dirs left behind: {left}"


# -- the tests ----------------------------------------------------------------------------------


def test_a_worker_task_logs_in_across_nodes_rotates_and_service_rm_leaves_no_lease(lab: Lab, tmp_path: Path) -> None:
    """The task runs on a worker. Its AppRole role_id/secret_id and the static password arrive as Swarm
    secrets; it logs in to OpenBao in the hub (the audit log has the login from the worker's address),
    PostgreSQL sees the app's logins come from the worker, two rotations pass with zero failed probes,
    and `docker service rm` stops it: each lease it held is revoked from the worker, the token too,
    and OpenBao's root token finds no lease left the moment the container is gone."""
    since = lab.audit_mark()
    deploy(lab, tmp_path)
    try:
        assert_deployed_as_the_stack_file_says(lab)
        task = lab.running_task()
        assert task.node in lab.workers, f"the drained manager runs no task: it ran on {task.node.name}"
        wait_logs(task, lambda got: len(got.events("start")) >= 3, timeout=90)
        password = issued_password(task)
        follower = follow(task)
        lab.manager.engine.docker("service", "rm", SERVICE)
        seen = followed(follower)
        left = lab.leases()  # the moment the container stopped: a lease not revoked would still live (3 s TTL)
    finally:
        remove_stack(lab)
    starts, probes = seen.events("start"), seen.events("probe")
    failed = [p for p in probes if not p["ok"]]
    figures.record_figure(
        "multi-node swarm", "a worker's task, then docker service rm", node=task.node.name, app_starts=len(starts),
        probes=len(probes), failed_probes=len(failed), leases=len(seen.tracked()), left_after_rm=len(left),
    )  # fmt: skip

    logged_in = seen.events("vault login")
    assert logged_in and {(e["addr"], e["auth"]) for e in logged_in} == {(VAULT_ADDR, "approle")}
    assert {"db_static_password", "db.json"} <= {e["secret"] for e in seen.events("source read")}
    logins = lab.requests_from(task.node.addr, "auth/approle/login", since)
    assert len(logins) == len(logged_in), "OpenBao saw each of the task's logins come from its worker"
    assert {login["data"]["role_id"] for login in logins} == {lab.audit_hash(lab.role_id)}

    assert all(s["static"] for s in starts), "the Swarm secret db_static_password was rendered"
    assert len({s["user"] for s in starts}) == len(starts) >= 3, "two rotations or more, each with a new user"
    assert probes and failed == []
    assert {p["seen"] for p in probes} == {f"{p['user']} {task.node.addr}" for p in probes}, "PostgreSQL saw the worker"

    assert left == [], f"leases alive once the task's container stopped: {left}"
    assert seen.tracked() and seen.tracked() <= seen.revoked(), seen.text[-3000:]
    assert seen.events("vault token revoked")
    revoked = {r["data"]["lease_id"] for r in lab.requests_from(task.node.addr, "sys/leases/revoke", since)}
    assert {lab.audit_hash(lease) for lease in seen.tracked()} <= revoked, "each revoke came from the worker"
    assert lab.requests_from(task.node.addr, "auth/token/revoke-self", since)
    assert_no_leak(seen.text, lab.secret_id, lab.role_id, lab.static_password, password, lab.bao.root_token)
    assert lab.leases() == []


def assert_deployed_as_the_stack_file_says(lab: Lab) -> None:
    """The service Swarm made from compose/stack.yml: its secrets, config, tmpfs, hardening and grace period."""
    (service,) = json.loads(lab.manager.engine.docker("service", "inspect", SERVICE).stdout)
    spec = service["Spec"]["TaskTemplate"]["ContainerSpec"]
    record_output(json.dumps(spec), "swarm service spec")
    assert spec["Image"] == APP_IMAGE
    assert {(s["SecretName"], s["File"]["Name"], s["File"]["Mode"]) for s in spec["Secrets"]} == {
        (name, name, 0o400) for name in ("vault_role_id", "vault_secret_id", "db_static_password")
    }
    assert [(c["ConfigName"], c["File"]["Name"], c["File"]["Mode"]) for c in spec["Configs"]] == [
        ("secret_init_config", "/etc/secret-init/config.toml", 0o444)
    ]
    assert [(m["Type"], m["Target"]) for m in spec["Mounts"]] == [("tmpfs", "/run/app-secrets")]
    assert spec["ReadOnly"] is True
    assert spec["CapabilityDrop"] == ["ALL"] and sorted(spec["CapabilityAdd"]) == [
        "CAP_CHOWN",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
    ]
    assert spec["StopGracePeriod"] == 30 * 10**9
    assert service["Spec"]["Mode"] == {"Replicated": {"Replicas": 1}}


def test_draining_the_worker_moves_the_task_and_revokes_the_old_tasks_leases(lab: Lab, tmp_path: Path) -> None:
    """`docker node update --availability drain` on the task's worker: the task stops there (secret-init
    stops the app, revokes every lease it held and its token, from that worker), a new task starts on
    the other worker and logs in from there with new credentials, and no lease of the old task is alive
    in OpenBao. Afterwards `docker stack rm` leaves no lease either."""
    since = lab.audit_mark()
    deploy(lab, tmp_path)
    try:
        first = lab.running_task()
        assert first.node in lab.workers
        wait_logs(first, lambda got: bool(got.tracked()) and any(p["ok"] for p in got.events("probe")), 60)
        password = issued_password(first)
        follower = follow(first)
        lab.manager.engine.docker("node", "update", "--availability", "drain", first.node.node_id)
        try:
            old = followed(follower)
            alive_after_stop = set(lab.leases())
            second = lab.running_task(not_on=first.node)
            wait_logs(second, lambda got: any(p["ok"] for p in got.events("probe")), 60)
            alive_now = set(lab.leases())
            new = logs(second)  # read after: every lease alive then is one it had tracked by now
        finally:
            lab.manager.engine.docker("node", "update", "--availability", "active", first.node.node_id)
    finally:
        remove_stack(lab)
    probes = old.events("probe") + new.events("probe")
    failed = [p for p in probes if not p["ok"]]
    figures.record_figure(
        "multi-node swarm", "the task's worker drained", moved=f"{first.node.name} -> {second.node.name}",
        probes=len(probes), failed_probes=len(failed), old_leases=len(old.tracked()),
        old_leases_alive_after_its_stop=len(old.tracked() & alive_after_stop),
    )  # fmt: skip

    still_alive = old.tracked() & alive_after_stop
    assert old.tracked() and not still_alive, f"the old task's leases alive after its stop: {still_alive}"
    assert old.tracked() <= old.revoked(), old.text[-3000:]
    assert old.events("stop") and old.events("vault token revoked")
    revoked = {r["data"]["lease_id"] for r in lab.requests_from(first.node.addr, "sys/leases/revoke", since)}
    assert {lab.audit_hash(lease) for lease in old.tracked()} <= revoked, "each revoke came from the drained worker"
    assert lab.requests_from(first.node.addr, "auth/token/revoke-self", since)

    assert second.node in lab.workers and second.node != first.node
    assert new.events("vault login") and {e["addr"] for e in new.events("vault login")} == {VAULT_ADDR}
    assert len(lab.requests_from(second.node.addr, "auth/approle/login", since)) == len(new.events("vault login"))
    assert {s["user"] for s in new.events("start")}.isdisjoint(s["user"] for s in old.events("start"))
    assert probes and failed == []
    assert {p["seen"].split()[1] for p in new.events("probe")} == {second.node.addr}
    assert alive_now and alive_now <= new.tracked(), "the leases alive then were the new task's"
    assert_no_leak(old.text + new.text, lab.secret_id, lab.role_id, lab.static_password, password, lab.bao.root_token)
    assert lab.leases() == [], "`docker stack rm` left a lease"
