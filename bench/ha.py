"""secret-init against `bao agent` on a real 3-node OpenBao raft cluster, under the faults of issue 13.

    bash bench/run-ha                        # as root: installs HEAD's secret-init, prints markdown tables
    bash bench/run-ha --faults a,c --runs 2  # a subset, twice each
    bash bench/run-ha --json /tmp/ha.json    # also keep the figures; later, one table of several such files:
    .venv/bin/python bench/ha.py --from /tmp/ha-1.json /tmp/ha-2.json

Each fault gets a fresh cluster from tests/cluster.py (3 non-dev nodes, raft storage in temp dirs,
TLS with a CA made for the run, `performance_multiplier = 1`, so an election takes a few seconds),
its database engine against one real PostgreSQL (role `app`: 8 s TTL, 30 s max), and these five
consumers, ALL AT THE SAME TIME on that cluster and that fault, each with its own app (the
harness's prober: a NEW PostgreSQL login every 200 ms with the credentials file, one log line each):

  si3        secret-init, `addr` = the three nodes (the configured node first)
  si1        secret-init, `addr` = the configured node only; on_expiry and expiry_grace left at their defaults
  si1-old    the same with on_expiry = "stop", expiry_grace = "0s": the behaviour before issue 13
  si1-keep   the same with on_expiry = "keep" (expiry_grace at its default)
  agent      `bao agent` (auto_auth approle, one template rendering the credentials file, which its
             template engine renews); its `vault { address }` takes one address: the configured node

Every secret-init runs as a container would, with a restart policy like Swarm's default (any exit
is followed by a new start `--restart-delay` seconds later, 5 s by default, with a fresh output dir);
the agent and its app are not restarted (the agent never exits here). Everything else is left at
each tool's defaults.

Faults (the "configured node" is the one address of the 1-address columns and the agent):
  a  the leader is SIGKILLed; the configured node is a standby (si3: that standby first). It stays down.
  b  the configured node is the leader; it is SIGKILLed and started again 30 s later (then unsealed).
  c  the configured node is the leader; it is sealed (`sys/seal`) and stays sealed.

What is measured, per consumer, from the moment every app had its first successful login until the
end of the window (`--warmup` s before the fault, `--window` s after it):
  - logins and failed logins, from the prober's log;
  - app downtime: the seconds in which no app process was running (rotation restarts included:
    secret-init's default on_rotate is "restart"), and the longest such gap;
  - secret-init's exits during the window, with their codes and times after the fault (restarts follow);
  - from secret-init's log: rotations, "vault failover" events, leases that expired unrotated.
Also: the election time (the fault until the serving nodes agree on a new leader), the node's
return in b, and for each lease secret-init logged as expired unrotated: the last successful login
with its credentials, when its role left pg_roles (dropped by a revocation), and its VALID UNTIL
(pg_roles is polled every 0.3 s), each against the time of that log line.

Nothing is faked: the cluster, PostgreSQL, the agent, secret-init and the app are real processes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.cluster import (  # noqa: E402 - the same real cluster as the HA tests
    RaftCluster,
    approle_credentials,
    bao_binary,
    configure_cluster,
    probe_log,
    wait_until,
    write_prober,
)
from tests.conftest import Postgres, mounted_tmpfs, postgres_bin, start_postgres, stop_postgres  # noqa: E402

SECRET_INIT = os.environ.get("BENCH_SECRET_INIT", str(Path(sys.executable).parent / "secret-init"))
COMMIT = os.environ.get("BENCH_COMMIT", "")
APP_UID = APP_GID = 65534
PYTHON = "/usr/bin/python3"  # the app's interpreter (Debian's), not the bench's venv
FAULTS = {
    "a": "leader killed; addr = a standby",
    "b": "the configured node (the leader) killed, back 30 s later",
    "c": "the configured node (the leader) sealed",
}
RESTART_AFTER = 30.0  # fault b: the killed node starts again this long after the kill


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    process: str  # extra [process] lines for secret-init; "" for the agent
    addresses: int  # 3 or 1; the agent takes 1


COLUMNS: tuple[Column, ...] = (
    Column("si3", "secret-init (3 addresses)", "", 3),
    Column("si1", "secret-init (1 address, defaults)", "", 1),
    Column("si1-old", 'secret-init (1 address, on_expiry = "stop", expiry_grace = 0)',
           'on_expiry = "stop"\nexpiry_grace = "0s"\n', 1),
    Column("si1-keep", 'secret-init (1 address, on_expiry = "keep")', 'on_expiry = "keep"\n', 1),
    Column("agent", "bao agent (1 address)", "", 1),
)  # fmt: skip


def log(message: str) -> None:
    print(f"[ha {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the consumers -------------------------------------------------------------------------------


class Restarting(threading.Thread):
    """`secret-init run -- prober` under a restart policy like Swarm's default: after any exit
    (other than the bench's own SIGTERM at the end), start again `delay` seconds later, with a
    fresh output dir, as a new container would have. Its log lines (all starts) go to one file."""

    def __init__(self, work: Path, out: Path, config_text: str, app: list[str], delay: float) -> None:
        super().__init__(daemon=True)
        self.work, self.out, self.config_text, self.app, self.delay = work, out, config_text, app, delay
        self.log = work / "secret-init.log"
        self.exits: list[tuple[float, int]] = []  # (wall time, exit code) of exits the bench did not ask for
        self.starts: list[float] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.final_code: int | None = None

    def run(self) -> None:
        self.out.mkdir(mode=0o755, exist_ok=True)
        while not self.stopping.is_set():
            n = len(self.starts) + 1
            config = self.work / f"config-{n}.toml"
            config.write_text(self.config_text.replace("@OUT@", str(self.out / f"start-{n}")))
            with self.lock:
                if self.stopping.is_set():
                    return
                with self.log.open("a") as err:
                    self.proc = subprocess.Popen(
                        [SECRET_INIT, "run", "--config", str(config), "--", *self.app],
                        env={"PATH": "/usr/bin:/bin", "HOME": str(self.work)},
                        stdout=subprocess.DEVNULL, stderr=err,
                    )  # fmt: skip
                self.starts.append(time.time())
            code = self.proc.wait()
            if self.stopping.is_set():
                self.final_code = code
                return
            self.exits.append((time.time(), code))
            self.stopping.wait(self.delay)

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM the running secret-init (it stops the app and revokes), and no restart after."""
        with self.lock:
            self.stopping.set()
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.join(timeout)

    def events(self) -> list[dict[str, Any]]:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        found = []
        for line in lines:
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except ValueError:
                    continue
        return found


class Agent:
    """`bao agent` with AppRole auto-auth and one template rendering the credentials as JSON
    (`{{ .Data | toJSON }}`: username and password) to the file the app reads before each login.
    Its template engine renews the lease and fetches new credentials near the end of its life."""

    def __init__(self, work: Path, addr: str, ca_cert: Path, role_id: Path, secret_id: Path, app: list[str]) -> None:
        self.work = work
        self.creds = work / "render" / "db.json"
        self.creds.parent.mkdir(mode=0o755)
        config = work / "agent.hcl"
        config.write_text(f"""
vault {{
  address = "{addr}"
  ca_cert = "{ca_cert}"
}}
auto_auth {{
  method "approle" {{
    config = {{
      role_id_file_path = "{role_id}"
      secret_id_file_path = "{secret_id}"
      remove_secret_id_file_after_reading = false
    }}
  }}
}}
template {{
  contents = "{{{{ with secret \\"database/creds/app\\" }}}}{{{{ .Data | toJSON }}}}{{{{ end }}}}"
  destination = "{self.creds}"
  perms = "0444"
}}
""")
        self.log = work / "agent.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [bao_binary(), "agent", f"-config={config}"], env={"PATH": "/usr/bin:/bin", "HOME": str(work)},
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_until(lambda: self.creds.exists() or self.proc.poll() is not None, 60, "the agent's first render")
        if self.proc.poll() is not None:
            raise RuntimeError(f"bao agent exited: {self.log.read_text()[-2000:]}")
        self.app = subprocess.Popen(
            ["setpriv", f"--reuid={APP_UID}", f"--regid={APP_GID}", "--clear-groups", *app, "--creds", str(self.creds)],
            env={"PATH": "/usr/bin:/bin"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> None:
        for proc in (self.app, self.proc):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


class RoleWatch(threading.Thread):
    """Polls PostgreSQL's pg_roles every 0.3 s: each `v-` role's latest VALID UNTIL, and when it was last seen."""

    def __init__(self, pg: Postgres) -> None:
        super().__init__(daemon=True)
        self.pg = pg
        self.valid_until: dict[str, float] = {}
        self.last_seen: dict[str, float] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        query = "select rolname, coalesce(extract(epoch from rolvaliduntil), 0) from pg_roles where rolname like 'v-%'"
        while not self.stopping.is_set():
            now = time.time()
            try:
                rows = self.pg.sql(query).splitlines()
            except subprocess.CalledProcessError:
                rows = []
            for row in rows:
                name, _, until = row.partition("|")
                self.valid_until[name] = max(self.valid_until.get(name, 0.0), float(until or 0))
                self.last_seen[name] = now
            self.stopping.wait(0.3)


# -- one fault, all consumers at once ------------------------------------------------------------


@dataclass
class Outcome:
    column: Column
    logins: int = 0
    failed: int = 0
    down: float = 0.0
    longest_gap: float = 0.0
    exits: list[tuple[float, int]] = field(default_factory=list)  # (seconds after the fault, code)
    final_code: int | None = None
    rotations: int = 0
    failovers: int = 0
    expired: int = 0
    failures_span: tuple[float, float] | None = None  # first and last failed login, seconds after the fault
    accepted_after_expiry: list[float] = field(default_factory=list)  # last ok login - secret-init's expiry log
    valid_until_after_expiry: list[float] = field(default_factory=list)  # VALID UNTIL - secret-init's expiry log
    dropped_after_expiry: list[float | None] = field(default_factory=list)  # role last seen - the expiry log
    late_vs_valid_until: float | None = None  # max(ok login time - the role's VALID UNTIL)

    def cell(self) -> str:
        exits = "" if self.column.key == "agent" else f"; exits: {', '.join(str(c) for _, c in self.exits) or 'none'}"
        return f"{self.failed} failed of {self.logins}; down {self.down:.1f} s{exits}"


@dataclass
class FaultRun:
    fault: str
    window: float
    commit: str = COMMIT
    election: float | None = None
    back: float | None = None  # fault b: the kill until the node is unsealed again
    outcomes: list[Outcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def running_spans(entries: list[dict[str, Any]], interval: float) -> list[tuple[float, float]]:
    """(start, end) of each app process from its log lines: start to its "stop" line, or to its last line."""
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for e in entries:
        by_pid.setdefault(e["pid"], []).append(e)
    spans = []
    for lines in by_pid.values():
        begin = min(e["t"] for e in lines)
        stops = [e["t"] for e in lines if e["event"] == "stop"]
        end = min(stops) if stops else max(e["t"] for e in lines) + interval
        spans.append((begin, end))
    return sorted(spans)


def downtime(spans: list[tuple[float, float]], t0: float, t1: float) -> tuple[float, float]:
    """(seconds in [t0, t1] with no app running, the longest such gap)."""
    covered, longest, cursor = 0.0, 0.0, t0
    for begin, end in spans:
        begin, end = max(begin, t0), min(end, t1)
        if end <= cursor:
            continue
        if begin > cursor:
            longest = max(longest, begin - cursor)
            begin_at = begin
        else:
            begin_at = cursor
        covered += end - begin_at
        cursor = end
    longest = max(longest, t1 - cursor)
    return (t1 - t0) - covered, longest


def when(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def analyse(
    column: Column, probe: Path, t0: float, fault_at: float, t1: float, watch: RoleWatch, runner: Restarting | None
) -> Outcome:
    entries = [json.loads(x) for x in probe.read_text().splitlines() if x.strip()]
    logins = [e for e in entries if e["event"] == "login" and t0 <= e["t"] <= t1]
    failed = [e for e in logins if not e["ok"]]
    down, longest = downtime(running_spans(entries, 0.2), t0, t1)
    outcome = Outcome(column, len(logins), len(failed), down, longest)
    if failed:
        outcome.failures_span = (failed[0]["t"] - fault_at, failed[-1]["t"] - fault_at)
    lates = [e["t"] - watch.valid_until[e["user"]] for e in logins if e["ok"] and e["user"] in watch.valid_until]
    outcome.late_vs_valid_until = max(lates) if lates else None
    if runner is None:
        return outcome
    outcome.exits = [(t - fault_at, code) for t, code in runner.exits if t <= t1]
    outcome.final_code = runner.final_code
    events = runner.events()
    outcome.rotations = sum(1 for e in events if e.get("event") == "lease rotated")
    outcome.failovers = sum(1 for e in events if e.get("event") == "vault failover")
    expiries = [when(e) for e in events if str(e.get("event", "")).startswith("lease expired before it could be")]
    outcome.expired = len(expiries)
    all_logins = [e for e in entries if e["event"] == "login"]
    for expired_at in expiries:
        before = [e for e in all_logins if e["t"] <= expired_at]
        if not before:
            continue
        user = before[-1]["user"]
        ok_as_user = [e["t"] for e in all_logins if e["ok"] and e["user"] == user]
        if ok_as_user:
            outcome.accepted_after_expiry.append(max(ok_as_user) - expired_at)
        if user in watch.valid_until:
            outcome.valid_until_after_expiry.append(watch.valid_until[user] - expired_at)
            seen = watch.last_seen[user]
            outcome.dropped_after_expiry.append(None if seen >= t1 else seen - expired_at)
    return outcome


def secret_init_config(addrs: list[str], ca: Path, role_id: Path, secret_id: Path, process: str) -> str:
    """The TOML each secret-init start gets (@OUT@: its fresh output dir). Defaults everywhere
    except the policy under test."""
    addr = json.dumps(addrs[0] if len(addrs) == 1 else addrs)
    return f"""[output]
dir = "@OUT@"
user = "{APP_UID}:{APP_GID}"

[vault]
addr = {addr}
auth = "approle"
role_id_file = "{role_id}"
secret_id_file = "{secret_id}"
ca_cert = "{ca}"

[process]
{process}
[[secret]]
name = "db.json"
source = "vault:database/creds/app"
env = "DB_JSON_FILE"
"""


def run_fault(fault: str, pg: Postgres, args: argparse.Namespace) -> FaultRun:
    result = FaultRun(fault, args.window)
    state = Path(tempfile.mkdtemp(prefix="si-bench-ha-"))
    state.chmod(0o755)
    watch = RoleWatch(pg)
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, state, ignore_errors=True)  # runs last, also after a failure
        out = stack.enter_context(mounted_tmpfs("16m"))
        log(f"fault {fault}: starting a 3-node cluster")
        cluster = stack.enter_context(RaftCluster.start(state / "cluster"))
        configure_cluster(cluster, pg.port, pg.password)
        leader = cluster.wait_leader()
        standby = next(node for node in cluster.nodes if node is not leader)
        configured = standby if fault == "a" else leader
        addrs = [configured.addr] + [n.addr for n in cluster.nodes if n is not configured]
        log(f"fault {fault}: leader {leader.node_id}, configured node {configured.node_id}")
        prober = write_prober(state)
        watch.start()
        stack.callback(watch.stopping.set)
        probes: dict[str, Path] = {}
        runners: dict[str, Restarting] = {}
        agent: Agent | None = None
        for column in COLUMNS:
            work = state / column.key
            work.mkdir(mode=0o755)
            probes[column.key] = probe_log(work / "probe.log", APP_UID, APP_GID)
            app = [PYTHON, str(prober), "--log", str(probes[column.key]), "--port", str(pg.port)]
            role_id, secret_id = approle_credentials(cluster, work)
            if column.key == "agent":
                agent = Agent(work, configured.addr, cluster.ca.ca_cert, role_id, secret_id, app)
                stack.callback(agent.stop)
                continue
            text = secret_init_config(addrs[: column.addresses], cluster.ca.ca_cert, role_id, secret_id, column.process)
            runner = Restarting(work, out / column.key, text, app, args.restart_delay)
            runners[column.key] = runner
            runner.start()
            stack.callback(runner.stop)

        def all_logged_in() -> bool:
            for key, path in probes.items():
                if '"ok": true' not in path.read_text():
                    runner = runners.get(key)
                    if runner is not None and runner.exits:
                        tail = runner.log.read_text()[-2000:]
                        raise RuntimeError(f"{key}: secret-init exited {runner.exits}: {tail}")
                    return False
            return True

        wait_until(all_logged_in, 90, "every app's first successful login", interval=0.2)
        t0 = time.time()
        log(f"fault {fault}: every app logged in; the fault in {args.warmup:.0f} s")
        time.sleep(args.warmup)
        fault_at = time.time()
        fault_mono = time.monotonic()
        if fault == "c":
            cluster.seal(leader)
        else:
            cluster.kill(leader)
        try:
            cluster.wait_leader(timeout=args.window, other_than=leader)
            result.election = time.monotonic() - fault_mono
        except TimeoutError:
            result.notes.append(f"no new leader within {args.window:.0f} s")
        log(f"fault {fault}: {'sealed' if fault == 'c' else 'killed'} {leader.node_id}; election {result.election}")
        if fault == "b":
            time.sleep(max(0.0, fault_mono + RESTART_AFTER - time.monotonic()))
            cluster.restart(leader)
            result.back = time.monotonic() - fault_mono
            log(f"fault b: {leader.node_id} back and unsealed {result.back:.1f} s after the kill")
        time.sleep(max(0.0, fault_mono + args.window - time.monotonic()))
        t1 = time.time()
        log(f"fault {fault}: window over; stopping the consumers")
        stoppers = [threading.Thread(target=r.stop) for r in runners.values()]
        if agent is not None:
            stoppers.append(threading.Thread(target=agent.stop))
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join(90)
        watch.stopping.set()
        for column in COLUMNS:
            result.outcomes.append(
                analyse(column, probes[column.key], t0, fault_at, t1, watch, runners.get(column.key))
            )
        if agent is not None:
            errors = sum(1 for line in agent.log.read_text(errors="replace").splitlines() if "[ERROR]" in line)
            result.notes.append(f"bao agent logged {errors} [ERROR] lines")
        keep = args.keep_logs
        if keep is not None:
            target = keep / f"fault-{fault}-{int(fault_at)}"
            target.mkdir(parents=True, exist_ok=True)
            (target / "valid-until.json").write_text(json.dumps(watch.valid_until, indent=1))
            for column in COLUMNS:
                for name in ("probe.log", "secret-init.log", "agent.log"):
                    source = state / column.key / name
                    if source.exists():
                        shutil.copy(source, target / f"{column.key}-{name}")
    return result


# -- the report ----------------------------------------------------------------------------------


def fmt(value: float | None, unit: str = " s") -> str:
    return "–" if value is None else f"{value:.1f}{unit}"


def merged_cell(outcomes: list[Outcome]) -> str:
    """Several runs of one consumer under one fault: "0 / 1 failed of ~440; down 0.4 / 0.3 s; exits: none / 75"."""
    if not outcomes:
        return "–"
    failed = " / ".join(str(o.failed) for o in outcomes)
    logins = round(statistics.mean(o.logins for o in outcomes))
    down = " / ".join(f"{o.down:.1f}" for o in outcomes)
    text = f"{failed} failed of ~{logins}; down {down} s"
    if outcomes[0].column.key == "agent":
        return text
    exits = " / ".join(", ".join(str(code) for _, code in o.exits) or "none" for o in outcomes)
    return f"{text}; exits: {exits}"


def load_runs(paths: list[Path]) -> list[FaultRun]:
    """FaultRuns back from --json files (several runs, possibly of several commits, in one report)."""
    by_key = {c.key: c for c in COLUMNS}
    runs = []
    for path in paths:
        for item in json.loads(path.read_text()):
            run = FaultRun(item["fault"], item.get("window", 0.0), item.get("commit", ""))
            run.election, run.back, run.notes = item["election"], item["back"], item["notes"]
            for o in item["outcomes"]:
                outcome = Outcome(by_key[o["column"]])
                for name, value in o.items():
                    if name == "column":
                        continue
                    if name == "exits":
                        value = [tuple(x) for x in value]
                    elif name == "failures_span" and value is not None:
                        value = tuple(value)
                    setattr(outcome, name, value)
                run.outcomes.append(outcome)
            runs.append(run)
    return runs


def per_column(run: FaultRun, values: str) -> str:
    """One Outcome list field of each consumer that has values: "si1: 1.6; si1-keep: -0.2"."""
    return "; ".join(
        f"{o.column.key}: " + ", ".join("alive" if x is None else f"{x:.1f}" for x in getattr(o, values))
        for o in run.outcomes
        if getattr(o, values)
    )


def report(runs: list[FaultRun], args: argparse.Namespace) -> None:
    if not args.saved:
        print(f"secret-init: {SECRET_INIT}" + (f" (commit {COMMIT})" if COMMIT else ""))
    print(
        f"Window: from every app's first successful login, {args.warmup:.0f} s before the fault, "
        f"to {args.window:.0f} s after it. Restart policy for secret-init: a new start "
        f"{args.restart_delay:g} s after any exit."
    )
    commits = sorted({r.commit for r in runs if r.commit and r.commit != COMMIT})
    if commits:
        print("Commits measured: " + "; ".join(commits))
    print()
    columns = [c for c in COLUMNS if any(o.column.key == c.key for r in runs for o in r.outcomes)]
    print("| fault | " + " | ".join(c.title for c in columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for fault in dict.fromkeys(r.fault for r in runs):
        same = [r for r in runs if r.fault == fault]
        cells = [merged_cell([o for r in same for o in r.outcomes if o.column.key == c.key]) for c in columns]
        print(
            f"| {fault}: {FAULTS[fault]} ({len(same)} run{'s' if len(same) > 1 else ''}) | " + " | ".join(cells) + " |"
        )
    print()
    print(
        "| fault | consumer | logins | failed | failed from / to (s after the fault) | down s | longest gap s "
        "| exits (s after the fault: code) | exit at the end | rotations | failovers | expired unrotated |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in runs:
        for o in run.outcomes:
            span = f"{o.failures_span[0]:.1f} / {o.failures_span[1]:.1f}" if o.failures_span else "–"
            exits = ", ".join(f"{t:.1f}: {code}" for t, code in o.exits) or "none"
            agent = o.column.key == "agent"
            final = "–" if agent or o.final_code is None else str(o.final_code)
            print(
                f"| {run.fault} | {o.column.title} | {o.logins} | {o.failed} | {span} | {o.down:.1f} | "
                f"{o.longest_gap:.1f} | {'–' if agent else exits} | {final} | "
                f"{'–' if agent else o.rotations} | {'–' if agent else o.failovers} | {'–' if agent else o.expired} |"
            )
    print()
    print(
        "| fault | election s | node back s | latest ok login - its role's VALID UNTIL, s (max) "
        "| last ok login with an expired lease's credentials - secret-init's log of that expiry, s "
        "| the role dropped (last seen in pg_roles) - that log, s | its VALID UNTIL - that log, s | notes |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in runs:
        lates = [o.late_vs_valid_until for o in run.outcomes if o.late_vs_valid_until is not None]
        print(
            f"| {run.fault} | {fmt(run.election, '')} | {fmt(run.back, '')} | "
            f"{fmt(max(lates) if lates else None, '')} | {per_column(run, 'accepted_after_expiry') or '–'} | "
            f"{per_column(run, 'dropped_after_expiry') or '–'} | "
            f"{per_column(run, 'valid_until_after_expiry') or '–'} | "
            f"{'; '.join(run.notes)} |"
        )
    elections = [r.election for r in runs if r.election is not None]
    if elections:
        print()
        print(
            f"Elections: median {statistics.median(elections):.1f} s, "
            f"min {min(elections):.1f} s, max {max(elections):.1f} s over {len(elections)} faults."
        )


def main() -> int:
    global COLUMNS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", default="a,b,c", help="comma-separated subset of a,b,c (default: all)")
    parser.add_argument("--runs", type=int, default=1, help="runs of each fault (default 1)")
    parser.add_argument("--warmup", type=float, default=15, help="seconds from every app's first login to the fault")
    parser.add_argument("--window", type=float, default=75, help="seconds measured after the fault (default 75)")
    parser.add_argument("--restart-delay", type=float, default=5, help="secret-init's restart policy delay (5 s)")
    parser.add_argument(
        "--columns", default=",".join(c.key for c in COLUMNS), help="comma-separated subset of the consumers"
    )
    parser.add_argument("--keep-logs", type=Path, help="copy every probe, secret-init and agent log here")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--from", dest="saved", type=Path, nargs="+", help="print the tables of earlier --json files; run nothing"
    )
    args = parser.parse_args()
    if args.saved:
        report(load_runs(args.saved), args)
        return 0
    faults = args.faults.split(",")
    if not set(faults) <= set(FAULTS):
        parser.error(f"unknown fault in --faults: {args.faults}")
    wanted = args.columns.split(",")
    if not set(wanted) <= {c.key for c in COLUMNS}:
        parser.error(f"unknown consumer in --columns: {args.columns}")
    COLUMNS = tuple(c for c in COLUMNS if c.key in wanted)
    if os.geteuid() != 0:
        print("bench/ha: run as root (tmpfs mounts, the app user, PostgreSQL)", file=sys.stderr)
        return 77
    if args.window <= RESTART_AFTER + 10 and "b" in faults:
        parser.error(f"--window must be longer than {RESTART_AFTER + 10:.0f} s for fault b")
    bin_dir = postgres_bin()
    assert bin_dir is not None, "PostgreSQL is not installed (scripts/bootstrap installs it)"
    pg = start_postgres(bin_dir)
    runs: list[FaultRun] = []
    began = time.monotonic()
    try:
        for _ in range(args.runs):
            for fault in faults:
                runs.append(run_fault(fault, pg, args))
    finally:
        stop_postgres(pg)
    log(f"all faults done in {time.monotonic() - began:.0f} s")
    report(runs, args)
    if args.json:
        args.json.write_text(json.dumps([_plain(r) for r in runs], indent=2, default=str))
    return 0


def _plain(run: FaultRun) -> dict[str, Any]:
    return {
        "fault": run.fault,
        "window": run.window,
        "commit": run.commit,
        "election": run.election,
        "back": run.back,
        "notes": run.notes,
        "outcomes": [{**o.__dict__, "column": o.column.key} for o in run.outcomes],
    }


if __name__ == "__main__":
    raise SystemExit(main())
