"""Dynamic database credentials end to end: real OpenBao, real PostgreSQL, a real probing app.

The app reads its credential files when it starts (and again on SIGHUP), then logs in to
PostgreSQL every 100 ms with them. It prints one JSON line per start and per probe.
"""

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    REPO,
    Bao,
    Database,
    QuietHandler,
    UnixUser,
    app_command,
    base_env,
    log_events,
    needs_root,
    record_output,
    run_cli,
    serve_http,
    stop_http,
    write_config,
)
from tests.test_startup import IMPORTS_AFTER_THE_APP_STARTS

pytestmark = needs_root

DB_APP = r"""
import json, os, signal, subprocess, sys, time
port = sys.argv[1]
def say(**event):
    event["t"] = time.time()
    event["pid"] = os.getpid()
    # os.write, not print: a signal handler that prints while print runs raises "reentrant call".
    os.write(1, (json.dumps(event) + "\n").encode())
def load():
    global user, password
    if "DB_JSON_FILE" in os.environ:  # one file holding both: safe to re-read at any moment
        creds = json.load(open(os.environ["DB_JSON_FILE"]))
        user, password = creds["username"], creds["password"]
        return
    if "DB_USER_FILE" not in os.environ:  # handed over in the environment (OpenBao Agent's exec mode)
        user, password = os.environ["DB_USER"], os.environ["DB_PASSWORD"]
        return
    user = open(os.environ["DB_USER_FILE"]).read()
    password = open(os.environ["DB_PASSWORD_FILE"]).read()
def on_hup(signum, frame):
    load()
    say(event="reload", user=user)
def on_term(signum, frame):
    say(event="stop", user=user)
    sys.exit(0)
signal.signal(signal.SIGHUP, on_hup)
signal.signal(signal.SIGTERM, on_term)
load()
say(event="start", user=user)
while True:
    if "DB_JSON_FILE" in os.environ:
        load()
    r = subprocess.run(
        ["psql", "-h", "127.0.0.1", "-p", port, "-U", user, "-d", "postgres", "-w", "-tAc", "select 1"],
        env={"PGPASSWORD": password, "PATH": "/usr/bin:/bin", "PGCONNECT_TIMEOUT": "2"},
        capture_output=True, text=True,
    )
    say(event="probe", ok=r.returncode == 0, user=user, error=r.stderr.strip()[-200:])
    time.sleep(0.1)
"""


@pytest.fixture
def db_app(workdir: Path) -> list[str]:
    if not os.path.exists("/usr/bin/psql"):
        pytest.skip("needs psql for the probing app")
    return app_command(workdir, "db_app", DB_APP)


class JsonLines:
    """A running secret-init: the app's JSON lines (its stdout) and the log (its stderr), read as they come."""

    def __init__(self, proc: "subprocess.Popen[bytes]") -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []  # the app's
        self.logs: list[dict[str, Any]] = []  # secret-init's
        self.stdout = self.stderr = ""

    def until(self, done: Callable[[Any], bool], timeout: float) -> None:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while not done(self):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; app said {self.lines[-3:]}; logs {self.logs[-3:]}"
            ready, _, _ = select.select([self.proc.stdout, self.proc.stderr], [], [], left)
            for stream in ready:
                line = stream.readline().decode()
                assert line, f"secret-init ended early: {self.finish()} {self.stderr[-2000:]}"
                self.take(stream is self.proc.stdout, line)

    def take(self, from_app: bool, line: str) -> None:
        if from_app:
            self.stdout += line
            self.lines.append(json.loads(line))
        else:
            self.stderr += line
            self.logs.append(json.loads(line))

    def finish(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = (b.decode() for b in self.proc.communicate(timeout=timeout))
        self.stdout += out
        self.lines += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        self.stderr += err
        self.logs += log_events(err)
        record_output(self.stdout, "app stdout through secret-init")
        record_output(self.stderr, "secret-init stderr")
        return self.proc.returncode

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.lines if e["event"] == name]

    def logged(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.logs if e["event"] == name]


class Run(JsonLines):
    """secret-init supervising the probing app; collects the app's lines and the logs as they come."""

    def __init__(self, cfg: Path, app: list[str] | None, port: int = 0, import_report: Path | None = None) -> None:
        """With `app` None this is `secret-init sidecar`; `import_report` records imports after the app starts."""
        self.cfg = cfg
        command = ["run", "--config", str(cfg), "--", *app, str(port)] if app else ["sidecar", "--config", str(cfg)]
        launcher = ["-c", IMPORTS_AFTER_THE_APP_STARTS, str(import_report)] if import_report else ["-m", "secret_init"]
        # Unbuffered binary pipes: select() then sees every line, none hides in a buffer.
        proc = subprocess.Popen(
            [sys.executable, *launcher, *command],
            env=base_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
        )  # fmt: skip
        super().__init__(proc)


def starts(n: int) -> Callable[[Run], bool]:
    return lambda run: len(run.events("start")) >= n


def lease_config(
    workdir: Path, out: Path, bao: Bao, creds: str, user: str, process: str = "", role: str = "app"
) -> Path:
    role_file, secret_file, _ = bao.approle_credentials(role, workdir)
    return write_config(
        workdir,
        f"""
[output]
dir = "{out}"
user = "{user}"

[vault]
addr = "{bao.addr}"
auth = "approle"
role_id_file = "{role_file}"
secret_id_file = "{secret_file}"
request_timeout = "1s"

[process]
stop_timeout = "2s"
{process}

[[secret]]
name = "db_user"
source = "vault:{creds}#username"
env = "DB_USER_FILE"

[[secret]]
name = "db_password"
source = "vault:{creds}#password"
env = "DB_PASSWORD_FILE"
""",
    )


def test_rotation_restarts_ahead_of_expiry_with_no_failed_probe(
    database: Database, tmpfs: Path, workdir: Path, app_user: UnixUser, db_app: list[str]
) -> None:
    """default_ttl 3s, max_ttl 9s: two rotations, each restart >= 3s (rotate_before) ahead of expiry.

    Through all of it (renewals, probes, rotations, restarts, revokes, shutdown) the supervisor,
    root, imports no module once the app has started.
    """
    creds = database.role("3s", "9s")
    role_name = creds.rsplit("/", 1)[1]
    assert len(role_name) == 8, "usernames carry the first 8 characters of the role name"
    cfg = lease_config(workdir, tmpfs / "out", database.bao, creds, app_user.name)
    assert run_cli("health", "--config", str(cfg)).returncode == 1, "unhealthy before any file exists"

    imports = workdir / "imports.json"
    run = Run(cfg, db_app, database.pg.port, import_report=imports)
    try:
        run.until(starts(1), 20)
        during = run_cli("health", "--config", str(cfg))
        assert during.returncode == 0, during.stdout
        run.until(starts(3), 40)
        live = database.pg.roles(f"v-approle-{role_name}")
        first, second, third = (e["user"] for e in run.events("start")[:3])
        assert first not in live and second not in live, "rotated-away roles are dropped at once"
        assert third in live
    finally:
        code = run.finish()
    assert code == 0, run.stderr
    late = json.loads(imports.read_text())
    assert late["started"] and late["late"] == [], f"imported as root after the app started: {late['late']}"

    probes = run.events("probe")
    assert len(probes) > 30
    assert [p for p in probes if not p["ok"]] == [], "no probe may fail"
    users = [e["user"] for e in run.events("start")]
    assert len(set(users)) == len(users) >= 3, "each start uses new credentials"

    logs = log_events(run.stderr)
    reads = [e for e in logs if e["event"] == "vault read"]
    rotations = [e for e in logs if e["event"] == "lease rotated"]
    restarts = [e for e in logs if e["event"] == "app restarted"]
    assert len(rotations) >= 2 and len(restarts) >= 2
    for i, start in enumerate(run.events("start")[1:]):
        issued = _ts(reads[i]["timestamp"])
        expiry = issued + 9
        assert expiry - start["t"] >= 3.0, f"restart {i + 1} landed only {expiry - start['t']:.2f}s before expiry"
    for rotation in rotations:
        assert rotation["old_lease"] != rotation["new_lease"]
    assert [e for e in logs if e["event"] == "lease renewed"], "leases are renewed between rotations"

    assert database.pg.roles(f"v-approle-{role_name}") == set(), "old and last roles are dropped"
    assert database.leases(creds) == [], "no lease remains after shutdown"
    after = run_cli("health", "--config", str(cfg))
    assert after.returncode == 1 and "stopped" in after.stdout


@pytest.mark.hostile("vault-answers")
def test_refused_renewal_rotates(
    database: Database, tmpfs: Path, workdir: Path, app_user: UnixUser, db_app: list[str]
) -> None:
    """The lease is revoked behind secret-init's back: the next renewal is refused, so it rotates."""
    creds = database.role("4s", "60s")
    cfg = lease_config(workdir, tmpfs / "out", database.bao, creds, app_user.name)
    run = Run(cfg, db_app, database.pg.port)
    try:
        run.until(lambda r: bool(r.logged("lease tracked")), 20)
        database.bao.client.sys.revoke_lease(run.logged("lease tracked")[0]["lease_id"])
        run.until(starts(2), 20)
        new_user = run.events("start")[1]["user"]
        run.until(lambda r: len([p for p in r.events("probe") if p["user"] == new_user]) >= 3, 10)
    finally:
        assert run.finish() == 0, run.stderr[-3000:]
    rotated = run.logged("lease rotated")
    assert rotated and rotated[0]["reason"] == "renewal refused"
    probes_after = [p for p in run.events("probe") if p["user"] == run.events("start")[1]["user"]]
    assert probes_after and all(p["ok"] for p in probes_after), "the new credentials work"


def test_on_rotate_signal_reloads_without_restart(
    database: Database, tmpfs: Path, workdir: Path, app_user: UnixUser, db_app: list[str]
) -> None:
    creds = database.role("2s", "6s")
    cfg = lease_config(workdir, tmpfs / "out", database.bao, creds, app_user.name, 'on_rotate = "signal:SIGHUP"')
    run = Run(cfg, db_app, database.pg.port)
    try:
        run.until(lambda r: bool(r.events("reload")), 30)
        run.until(lambda r: sum(1 for e in r.events("probe") if e["user"] == r.events("reload")[0]["user"]) > 3, 10)
    finally:
        assert run.finish() == 0, run.stderr
    assert len(run.events("start")) == 1, "no restart"
    reload = run.events("reload")[0]
    assert reload["pid"] == run.events("start")[0]["pid"]
    assert reload["user"] != run.events("start")[0]["user"]
    assert [p for p in run.events("probe") if not p["ok"]] == []


@pytest.mark.hostile("faults")
def test_vault_outage_then_recovery_then_expiry(
    database: Database, tmpfs: Path, workdir: Path, app_user: UnixUser, db_app: list[str]
) -> None:
    """Freeze OpenBao (SIGSTOP) across a renewal: it fails, the app runs on. Thaw it in time:
    renewal resumes. Freeze it for good: expiry_grace (3 s here) after the expiry, on_expiry = "stop"
    stops the app, exit 75."""
    creds = database.role("10s", "60s")
    cfg = lease_config(workdir, tmpfs / "out", database.bao, creds, app_user.name, 'expiry_grace = "3s"')
    run = Run(cfg, db_app, database.pg.port)
    bao_pid = database.bao.pid
    try:
        run.until(lambda r: bool(r.logged("lease renewed")), 20)
        os.kill(bao_pid, signal.SIGSTOP)
        try:
            run.until(lambda r: bool(r.logged("lease renewal failed, retrying")), 15)
        finally:
            os.kill(bao_pid, signal.SIGCONT)
        failures = len(run.logged("lease renewal failed, retrying"))
        renewals = len(run.logged("lease renewed"))
        run.until(lambda r: len(r.logged("lease renewed")) > renewals, 10)
        assert run.proc.poll() is None
        os.kill(bao_pid, signal.SIGSTOP)
        try:
            run.until(lambda r: r.proc.poll() is not None or bool(r.logged("supervisor exiting")), 30)
            run.proc.wait(30)  # let it exit by itself: this test is about its own exit code
        finally:
            os.kill(bao_pid, signal.SIGCONT)
    finally:
        code = run.finish()
    assert failures >= 1
    assert code == 75, run.stderr[-3000:]
    expired = run.logged("lease expired before it could be rotated; retrying rotation about once a second")
    stopped = run.logged("credentials expired; stopping the app (on_expiry = stop)")
    assert expired and stopped and stopped[0]["expiry_grace"] == 3.0
    grace = [e for e in run.logged("rotation failed, retrying") if e["timestamp"] > expired[0]["timestamp"]]
    assert len(grace) >= 1, "rotation was retried during the grace"
    assert len(run.events("start")) == 1, "one app the whole time"
    assert not [p for p in run.events("probe")[:-3] if not p["ok"]], "probes pass while credentials are valid"


@pytest.mark.hostile("faults")
def test_on_expiry_keep_runs_on_and_recovers_when_vault_returns(
    database: Database, tmpfs: Path, workdir: Path, app_user: UnixUser, db_app: list[str]
) -> None:
    """on_expiry = "keep": past expiry the app keeps running; once Vault is back, rotation succeeds."""
    creds = database.role("3s", "60s")
    keep = 'on_expiry = "keep"\nexpiry_grace = "1s"'
    cfg = lease_config(workdir, tmpfs / "out", database.bao, creds, app_user.name, keep)
    run = Run(cfg, db_app, database.pg.port)
    bao_pid = database.bao.pid
    try:
        run.until(starts(1), 20)
        os.kill(bao_pid, signal.SIGSTOP)
        try:
            run.until(lambda r: bool(r.logged("credentials expired; on_expiry = keep, so the app keeps running")), 20)
        finally:
            os.kill(bao_pid, signal.SIGCONT)
        run.until(starts(2), 40)
        new_user = run.events("start")[1]["user"]
        run.until(lambda r: len([p for p in r.events("probe") if p["user"] == new_user]) >= 3, 10)
    finally:
        assert run.finish() == 0, run.stderr[-3000:]
    assert run.logged("lease rotated")[0]["reason"] == "retry after a failed rotation"
    assert all(p["ok"] for p in run.events("probe") if p["user"] == new_user)


def test_token_relogin_before_its_max_ttl_and_leases_follow(
    database: Database, tmpfs: Path, workdir: Path, app_user: UnixUser, db_app: list[str]
) -> None:
    """A lease dies with its token: with a 12 s token max TTL the lease must move to a new token.

    secret-init logs in again halfway through the token's life, then rotates the lease (made
    with the old token) before the old token's deadline, with no failed probe.
    """
    database.bao.client.auth.approle.create_or_update_approle(
        "short", token_policies=["app-read"], token_ttl="4s", token_max_ttl="12s"
    )
    creds = database.role("30s", "120s")
    cfg = lease_config(workdir, tmpfs / "out", database.bao, creds, app_user.name, role="short")
    run = Run(cfg, db_app, database.pg.port)
    try:
        run.until(starts(2), 30)
    finally:
        assert run.finish() == 0, run.stderr[-3000:]
    events = [e["event"] for e in run.logs]
    assert "token renewed" in events
    assert "token re-login" in events
    assert events.index("token re-login") < events.index("lease rotated")
    tracked = run.logged("lease max TTL learned")[0]
    assert tracked["deadline_in"] <= 12, "the lease's deadline is its token's"
    issued = _ts(run.logged("vault login")[0]["timestamp"])
    restart = run.events("start")[1]["t"]
    assert issued + 12 - restart >= tracked["rotate_before"], "restarted rotate_before ahead of the token's end"
    assert [p for p in run.events("probe") if not p["ok"]] == []


def test_the_token_a_relogin_replaced_keeps_its_leases_alive_until_they_are_rotated(
    database: Database, tmpfs: Path, workdir: Path, app_user: UnixUser, db_app: list[str]
) -> None:
    """Token TTL 2 s, max 24 s: the re-login comes at ~12 s, the lease's rotation only at ~16 s.

    Vault revokes a token's leases when the token expires. Before the fix the replaced token
    was no longer renewed, died ~2 s after the re-login and took the app's credentials with it
    (failed logins until a reactive rotation). Now it is renewed until its deadline.
    """
    database.bao.client.auth.approle.create_or_update_approle(
        "brief", token_policies=["app-read"], token_ttl="2s", token_max_ttl="24s"
    )
    creds = database.role("60s", "120s")
    cfg = lease_config(workdir, tmpfs / "out", database.bao, creds, app_user.name, role="brief")
    run = Run(cfg, db_app, database.pg.port)
    try:
        run.until(starts(2), 40)
    finally:
        assert run.finish() == 0, run.stderr[-3000:]
    events = [e["event"] for e in run.logs]
    assert events.index("token re-login") < events.index("lease rotated")
    assert "lease renewal refused; rotating" not in events, "the old token took its lease with it"
    assert [p for p in run.events("probe") if not p["ok"]] == []
    assert not [e for e in run.logs if e["level"] in ("warning", "error")]


@pytest.mark.hostile("faults")
def test_a_failed_start_leaves_no_lease_even_with_a_supplied_token(
    database: Database, tmpfs: Path, workdir: Path, app_user: UnixUser
) -> None:
    """Credentials are issued, then another secret fails: the new lease is revoked, not left to its TTL."""
    creds = database.role("60s", "120s")
    token = database.bao.client.auth.token.create(policies=["app-read"], ttl="5m")["auth"]["client_token"]
    cfg = write_config(
        workdir,
        f'[output]\ndir = "{tmpfs}/out"\nuser = "{app_user.name}"\n[vault]\naddr = "{database.bao.addr}"\n'
        f'[[secret]]\nname = "db_user"\nsource = "vault:{creds}#username"\n'
        '[[secret]]\nname = "missing"\nsource = "vault:secret/data/app/does-not-exist#k"\n',
    )
    result = run_cli("run", "--config", str(cfg), "--", "/bin/true", env=base_env(VAULT_TOKEN=token))
    assert result.returncode == 66, result.stderr
    assert [e for e in log_events(result.stderr) if e["event"] == "lease revoked"]
    assert database.leases(creds) == []
    assert database.pg.roles(f"v-token-{creds.rsplit('/', 1)[1]}") == set()
    assert database.bao.client.auth.token.lookup(token)["data"]["ttl"] > 0, "a supplied token is not revoked"


def test_sidecar_keeps_files_fresh_and_is_the_only_lease_owner(
    database: Database, tmpfs: Path, workdir: Path, app_user: UnixUser
) -> None:
    """No child: the sidecar renews and rotates into the shared dir; a second owner is refused."""
    creds = database.role("3s", "9s")
    cfg = lease_config(workdir, tmpfs / "out", database.bao, creds, f"{app_user.uid}:{app_user.gid}")
    sidecar = Run(cfg, None)
    try:
        sidecar.until(lambda r: bool(r.logged("lease tracked")), 20)
        first_user = (tmpfs / "out" / "db_user").read_text()
        for command in (["sidecar"], ["render"], ["run", "--", "/bin/true"]):
            second = run_cli(command[0], "--config", str(cfg), *command[1:])
            assert second.returncode == 75, second.stderr
            assert "already managed by another secret-init" in second.stderr
        assert len(database.leases(creds)) == 1, "the refused starts issued no credentials"
        sidecar.until(lambda r: bool(r.logged("lease rotated")), 20)
        assert (tmpfs / "out" / "db_user").read_text() != first_user
        assert run_cli("health", "--config", str(cfg)).returncode == 0
    finally:
        code = sidecar.finish()
    assert code == 0, sidecar.stderr[-3000:]
    assert database.leases(creds) == []


def test_sidecar_signals_the_app_through_its_pidfile(
    database: Database, tmpfs: Path, workdir: Path, app_user: UnixUser, db_app: list[str]
) -> None:
    """[sidecar] notify_pidfile: after a rotation the sidecar sends SIGHUP to the pid in the file."""
    creds = database.role("3s", "9s")
    pidfile = workdir / "app.pid"
    cfg = lease_config(workdir, tmpfs / "out", database.bao, creds, f"{app_user.uid}:{app_user.gid}")
    cfg.write_text(cfg.read_text() + f'\n[sidecar]\nnotify_pidfile = "{pidfile}"\n')
    sidecar = Run(cfg, None)
    app = None
    try:
        sidecar.until(lambda r: bool(r.logged("lease tracked")), 20)
        env = base_env(DB_USER_FILE=f"{tmpfs}/out/db_user", DB_PASSWORD_FILE=f"{tmpfs}/out/db_password")
        app = subprocess.Popen(
            ["setpriv", f"--reuid={app_user.uid}", f"--regid={app_user.gid}", "--clear-groups", *db_app,
             str(database.pg.port)],
            env=env, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        pidfile.write_text(f"{app.pid}\n")
        sidecar.until(lambda r: bool(r.logged("app notified")), 20)
        assert sidecar.logged("app notified")[0]["pid"] == app.pid
    finally:
        code = sidecar.finish()
        if app is not None:
            app.terminate()
            out, _ = app.communicate(timeout=10)
    assert code == 0, sidecar.stderr[-2000:]
    lines = [json.loads(line) for line in out.splitlines()]
    reloads = [e for e in lines if e["event"] == "reload"]
    assert reloads and reloads[0]["user"] != lines[0]["user"], "the app re-read rotated credentials"


STATIC_APP = r"""
import hashlib, json, os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
data = open(os.environ["API_KEY_FILE"], "rb").read()
print(json.dumps({"event": "start", "pid": os.getpid(), "sha256": hashlib.sha256(data).hexdigest()}), flush=True)
while True:
    time.sleep(0.1)
"""


def test_static_vault_secret_refresh_restarts_on_change(
    bao: Bao, tmpfs: Path, workdir: Path, app_user: UnixUser
) -> None:
    """A KV secret has no lease: it is re-read every refresh_interval, and a change restarts the app."""
    import hashlib
    import secrets as pysecrets

    key = pysecrets.token_hex(6)
    first, second = random_value(), random_value()
    bao.client.secrets.kv.v2.create_or_update_secret(path=f"app/{key}", secret={"k": first})
    role_file, secret_file, _ = bao.approle_credentials("app", workdir)
    app = app_command(workdir, "static_app", STATIC_APP)
    cfg = write_config(
        workdir,
        f'[output]\ndir = "{tmpfs}/out"\nuser = "{app_user.name}"\n'
        f'[vault]\naddr = "{bao.addr}"\nauth = "approle"\nrole_id_file = "{role_file}"\n'
        f'secret_id_file = "{secret_file}"\nrefresh_interval = "1s"\n'
        "[process]\nsupervise = true\n"
        f'[[secret]]\nname = "api_key"\nsource = "vault:secret/data/app/{key}#k"\nenv = "API_KEY_FILE"\n',
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "secret_init", "run", "--config", str(cfg), "--", *app],
        env=base_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        start = json.loads(proc.stdout.readline())
        assert start["sha256"] == hashlib.sha256(first.encode()).hexdigest()
        bao.client.secrets.kv.v2.create_or_update_secret(path=f"app/{key}", secret={"k": second})
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        assert ready, "no restart after the secret changed"
        again = json.loads(proc.stdout.readline())
        assert again["sha256"] == hashlib.sha256(second.encode()).hexdigest()
        assert again["pid"] != start["pid"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "secret changed in vault" in [e["event"] for e in log_events(stderr)]
    assert first not in stderr and second not in stderr


def random_value() -> str:
    import secrets as pysecrets

    return pysecrets.token_urlsafe(16)


def _ts(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@pytest.mark.hostile("vault-answers")
def test_a_token_its_policy_may_not_look_up_ends_the_start_with_77(
    database: Database, tmpfs: Path, workdir: Path, app_user: UnixUser, db_app: list[str]
) -> None:
    """Without lookup-self the token's limits cannot be learned: one line, exit 77, app stopped, lease revoked."""
    client = database.bao.client
    client.sys.create_or_update_policy(
        "no-lookup", 'path "database/creds/*" { capabilities = ["read"] }\n'
        'path "sys/leases/revoke" { capabilities = ["update"] }\n'
        'path "sys/leases/renew" { capabilities = ["update"] }\n',
    )  # fmt: skip
    client.auth.approle.create_or_update_approle("nolookup", token_policies=["no-lookup"], token_no_default_policy=True)
    creds = database.role("30s", "60s")
    cfg = lease_config(workdir, tmpfs / "out", database.bao, creds, app_user.name, role="nolookup")
    run = Run(cfg, db_app, database.pg.port)
    run.proc.wait(timeout=30)  # it ends by itself
    code = run.finish()
    assert code == 77, run.stderr[-3000:]
    errors = [e for e in run.logs if e["level"] == "error"]
    assert errors and "token lookup-self" in errors[-1]["event"] and "\n" not in errors[-1]["event"]
    assert not database.leases(creds), "the lease issued for the app is revoked"


class FailingLookupProxy:
    """A FAKE fault in front of the REAL OpenBao: it forwards every request, but answers
    the first token lookup with 503, as a Vault that hiccups at that moment would.

    A real server cannot fail exactly that request on demand; freezing it with SIGSTOP
    would race with the lookup, which runs right after the app starts.
    """

    def __init__(self, upstream: str) -> None:
        self.failed: list[str] = []
        host, port = upstream.removeprefix("http://").split(":")
        proxy = self

        class Handler(QuietHandler):
            def _forward(self) -> None:
                if self.path.startswith("/v1/auth/token/lookup-self") and not proxy.failed:
                    proxy.failed.append(self.path)
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                upstream_conn = HTTPConnection(host, int(port), timeout=10)
                upstream_conn.request(self.command, self.path, body, dict(self.headers))
                answer = upstream_conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                upstream_conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = _forward

        self.server, self.addr = serve_http(Handler)


@pytest.fixture
def failing_lookup(database: Database) -> Iterator[FailingLookupProxy]:
    proxy = FailingLookupProxy(database.bao.addr)
    yield proxy
    stop_http(proxy.server)


@pytest.mark.hostile("faults")
def test_a_token_lookup_that_fails_at_start_is_retried_and_leases_follow(
    database: Database,
    failing_lookup: FailingLookupProxy,
    tmpfs: Path,
    workdir: Path,
    app_user: UnixUser,
    db_app: list[str],
) -> None:
    """Vault unavailable for the token lookup just after the app started: no exit, the renewer asks again."""
    creds = database.role("3s", "60s")
    cfg = lease_config(workdir, tmpfs / "out", database.bao, creds, app_user.name)
    cfg.write_text(cfg.read_text().replace(database.bao.addr, failing_lookup.addr))
    run = Run(cfg, db_app, database.pg.port)
    try:
        run.until(lambda r: bool(r.logged("token tracked")) and len(r.logged("lease renewed")) >= 2, 20)
    finally:
        assert run.finish() == 0, run.stderr[-3000:]
    assert failing_lookup.failed, "the fault was injected"
    events = [e["event"] for e in run.logs]
    assert "could not look up the vault token; retrying in the background" in events
    assert events.index("could not look up the vault token; retrying in the background") < events.index("token tracked")
    assert [p for p in run.events("probe") if not p["ok"]] == []
