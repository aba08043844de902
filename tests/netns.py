"""A private network made of network namespaces, and Docker engines that live in it.

The bridge sits in a namespace of its own (the hub). Each node namespace holds one end of a veth pair
whose other end is a port of that bridge, and one address in a private /24 that no address or route of
the root namespace overlaps. There is no default route anywhere, no forwarding and no NAT, and the root
namespace gets no interface, address or route: the namespaces reach each other and nothing else.

Processes join a namespace with `ip netns exec NS ...`, which also gives them a mount namespace of their
own with a fresh /sys. The test's own connections into the hub (hvac against the OpenBao there) come from
`NetnsThread`: one thread that joined the hub's network namespace with setns(2), which moves only the
calling thread, so the rest of the test process stays where it was.

Teardown kills what is still running in these namespaces (only this module's processes and their
children can be there), deletes them (their veths and the bridge go with them), and unmounts
/run/netns again if `ip netns add` mounted it.
"""

import ctypes
import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

from tests.conftest import base_env
from tests.engine import Engine

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
P = ParamSpec("P")
T = TypeVar("T")


def ip_binary() -> str | None:
    return shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin")


def netns_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make network namespaces"
    if ip_binary() is None:
        return "ip is not installed (scripts/bootstrap installs iproute2)"
    if shutil.which("unshare") is None:
        return "unshare is not installed (scripts/bootstrap installs util-linux)"
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [ip_binary() or "ip", *args], capture_output=True, text=True, check=False, timeout=30, env=base_env()
    )
    if check and result.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def unused_range() -> ipaddress.IPv4Network:
    """The first 10.213.N.0/24 that no address or route of the root namespace overlaps."""
    used: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for link in json.loads(ip("-j", "addr").stdout or "[]"):
        for info in link.get("addr_info", []):
            used.append(ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False))
    for route in json.loads(ip("-j", "route", "show", "table", "all").stdout or "[]"):
        if route.get("dst", "default") != "default":
            used.append(ipaddress.ip_network(route["dst"], strict=False))
    for third in range(256):
        candidate = ipaddress.IPv4Network(f"10.213.{third}.0/24")
        if not any(candidate.overlaps(net) for net in used if net.version == 4):
            return candidate
    raise AssertionError("every 10.213.N.0/24 is in use on this host")


@dataclass(frozen=True)
class Namespace:
    name: str
    addr: str  # its address on the private range

    def argv(self, *command: str) -> list[str]:
        """`command` run inside this namespace (its own mount namespace and /sys too)."""
        return [ip_binary() or "ip", "netns", "exec", self.name, *command]

    def pids(self) -> list[int]:
        return [int(p) for p in ip("netns", "pids", self.name, check=False).stdout.split()]

    def routes(self) -> list[str]:
        """Every IPv4 and IPv6 route of every table in this namespace."""
        listed = ip("-n", self.name, "-4", "route", "show", "table", "all").stdout
        listed += ip("-n", self.name, "-6", "route", "show", "table", "all").stdout
        return [line.strip() for line in listed.splitlines()]


@dataclass(frozen=True)
class PrivateNet:
    network: ipaddress.IPv4Network
    hub: Namespace  # holds the bridge; its address is the bridge's
    nodes: tuple[Namespace, ...]


class NetnsThread:
    """One thread inside a network namespace: the sockets it opens, and the processes it starts, live there."""

    def __init__(self, namespace: Namespace) -> None:
        self.namespace = namespace
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"netns-{namespace.name}", initializer=self._enter)

    def _enter(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(NETNS_DIR / self.namespace.name, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, f"setns into {self.namespace.name}: {os.strerror(errno)}")
        finally:
            os.close(fd)

    def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return self._pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@contextmanager
def private_network(node_names: Sequence[str]) -> Iterator[PrivateNet]:
    """A hub namespace with a bridge at .1 and one namespace per node at .11, .12, ...; all gone afterwards."""
    network = unused_range()
    tag = secrets.token_hex(2)
    hosts = list(network.hosts())
    hub = Namespace(f"si{tag}-hub", str(hosts[0]))
    nodes = tuple(Namespace(f"si{tag}-{name}", str(hosts[10 + i])) for i, name in enumerate(node_names))
    netns_was_mounted = _is_mountpoint(NETNS_DIR)
    netns_existed = NETNS_DIR.exists()
    made: list[Namespace] = []
    try:
        for namespace in (hub, *nodes):
            ip("netns", "add", namespace.name)
            made.append(namespace)
            ip("-n", namespace.name, "link", "set", "lo", "up")
            _no_forwarding(namespace)
        ip("-n", hub.name, "link", "add", "br0", "type", "bridge")
        ip("-n", hub.name, "addr", "add", f"{hub.addr}/{network.prefixlen}", "dev", "br0")
        ip("-n", hub.name, "link", "set", "br0", "up")
        for i, node in enumerate(nodes):
            port = f"v{tag}n{i}"  # the hub's end; both ends are made inside their namespaces
            ip("link", "add", port, "netns", hub.name, "type", "veth", "peer", "name", "eth0", "netns", node.name)
            ip("-n", hub.name, "link", "set", port, "master", "br0")
            ip("-n", hub.name, "link", "set", port, "up")
            ip("-n", node.name, "addr", "add", f"{node.addr}/{network.prefixlen}", "dev", "eth0")
            ip("-n", node.name, "link", "set", "eth0", "up")
        yield PrivateNet(network, hub, nodes)
    finally:
        for namespace in made:
            _kill_all_in(namespace)
        for namespace in made:
            ip("netns", "delete", namespace.name, check=False)
        if not netns_was_mounted and _is_mountpoint(NETNS_DIR) and not ip("netns", "list").stdout.strip():
            subprocess.run(["umount", str(NETNS_DIR)], check=False, capture_output=True)
            if not netns_existed:
                NETNS_DIR.rmdir()
        left = [namespace.name for namespace in made if (NETNS_DIR / namespace.name).exists()]
        assert not left, f"network namespaces left behind: {left}"


def _no_forwarding(namespace: Namespace) -> None:
    script = "echo 0 >/proc/sys/net/ipv4/ip_forward && echo 0 >/proc/sys/net/ipv6/conf/all/forwarding"
    subprocess.run(namespace.argv("sh", "-c", script), check=True, capture_output=True, env=base_env())


def _kill_all_in(namespace: Namespace) -> None:
    """SIGKILL whatever still runs in `namespace`: only this test's processes and their children can."""
    deadline = time.monotonic() + 10
    while (pids := namespace.pids()) and time.monotonic() < deadline:
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _is_mountpoint(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


# -- Docker engines in namespaces ------------------------------------------------------------


def _cgroup_mounts() -> str:
    """Shell lines that mount this host's cgroup hierarchies again under the fresh /sys `ip netns exec` gives.

    Mounting a cgroup hierarchy again (same type and options) attaches the same hierarchy, so an engine in
    the namespace sees and manages the host's cgroups as the host's own engine would.
    """
    lines = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            mountpoint = left.split()[4]
            if mountpoint != "/sys/fs/cgroup" and not mountpoint.startswith("/sys/fs/cgroup/"):
                continue
            fstype, source, options = right.split()[:3]
            lines.append(
                f"mkdir -p {shlex.quote(mountpoint)} && mount -t {shlex.quote(fstype)} -o {shlex.quote(options)} "
                f"{shlex.quote(source)} {shlex.quote(mountpoint)}"
            )
    return "\n".join(lines)


def start_engine_in(namespace: Namespace, hostname: str, hosts: str) -> Engine:
    """dockerd inside `namespace`: its own data root, exec root, pidfile and socket, its own UTS namespace
    (so its Swarm node has its own hostname), and `hosts` as /etc/hosts (a bind mount in its own mount
    namespace; host-network containers get a copy of it). Flags as in tests/engine.start_engine."""
    root = Path(tempfile.mkdtemp(prefix="sid-", dir="/tmp"))  # short: socket paths are limited
    (root / "hosts").write_text(hosts)
    (root / "hosts").chmod(0o644)
    dockerd = [
        "dockerd", "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
        "--pidfile", str(root / "dockerd.pid"), "-H", f"unix://{root}/docker.sock", "--storage-driver", "overlay2",
        "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false",
    ]  # fmt: skip
    script = "\n".join(
        [
            "set -e",
            f"echo {shlex.quote(hostname)} >/proc/sys/kernel/hostname",
            _cgroup_mounts(),
            f"mount --bind {shlex.quote(str(root / 'hosts'))} /etc/hosts",
            f"exec {shlex.join(dockerd)}",
        ]
    )
    log = (root / "dockerd.log").open("wb")
    process = subprocess.Popen(
        namespace.argv("unshare", "--uts", "sh", "-c", script), stdout=log, stderr=subprocess.STDOUT, env=base_env()
    )
    engine = Engine(root, process)
    deadline = time.monotonic() + 60
    while engine.docker("version", check=False, timeout=10).returncode != 0:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"dockerd in {namespace.name} did not start: {(root / 'dockerd.log').read_text()[-2000:]}"
            )
        time.sleep(0.2)
    return engine
