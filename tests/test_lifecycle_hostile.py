"""Lifecycle under hostile conditions: a lying pidfile, a declined stop, an interrupted start,
a terminal, and signal storms. Real OpenBao, PostgreSQL, tmpfs, user, PID namespaces and pty.
"""

import hashlib
import json
import os
import pty
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tests.conftest import (
    REPO,
    Bao,
    Database,
    QuietHandler,
    UnixUser,
    app_command,
    assert_no_leak,
    base_env,
    free_port,
    log_events,
    needs_root,
    random_secret,
    record_output,
    serve_http,
    stop_http,
    write_config,
)
from tests.figures import record_cases, record_figure
from tests.test_leases import JsonLines

pytestmark = needs_root


# -- 9. the sidecar's pidfile is the app's to write ------------------------------------------

NS_APP = r"""
import os, signal, sys, time
marker = sys.argv[1]
def hup(signum, frame):
    with open(marker, "a") as f:
        f.write("HUP\n")
signal.signal(signal.SIGHUP, hup)
with open(marker, "a") as f:
    f.write("READY\n")
while True:
    time.sleep(1)
"""

# Runs as root inside the app's PID namespace (entered with nsenter, as `pid: service:app`
# does): pid 1 there is the app, and this process is not its descendant. Each case writes the
# pidfile, calls Supervisor.notify, then reports which processes got the SIGHUP.
NOTIFY_WORKER = r"""
import json, os, signal, subprocess, sys, time
from queue import SimpleQueue
from secret_init import logs
from secret_init.supervisor import Supervisor

logs.configure("json", "info")
uid, gid, work, marker = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
pidfile = os.path.join(work, "app.pid")
sup = Supervisor(SimpleQueue())

def canary(as_uid):
    return subprocess.Popen(["setpriv", f"--reuid={as_uid}", f"--regid={gid}", "--clear-groups", "sleep", "60"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

def nested():
    # a sleep in a PID namespace nested in this one: visible here, but not in our namespace
    outer = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "sleep", "60"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        kids = open(f"/proc/{outer.pid}/task/{outer.pid}/children").read().split()
        if kids:
            return outer, int(kids[0])
        time.sleep(0.01)
    raise SystemExit("no nested child")

def zombie():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    time.sleep(0.2)
    return pid

def hups():
    return open(marker).read().count("HUP")

def write(content):
    if os.path.lexists(pidfile):
        if os.path.isdir(pidfile) and not os.path.islink(pidfile):
            os.rmdir(pidfile)
        else:
            os.unlink(pidfile)
    if isinstance(content, tuple):
        kind, value = content
        if kind == "fifo":
            os.mkfifo(pidfile)
        elif kind == "dir":
            os.mkdir(pidfile)
        elif kind == "symlink":
            with open(pidfile + ".real", "w") as f:
                f.write(value)
            os.symlink(pidfile + ".real", pidfile)
        return
    with open(pidfile, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode())

def alarm(signum, frame):
    raise TimeoutError("notify hung")

signal.signal(signal.SIGALRM, alarm)
got_hup = []
signal.signal(signal.SIGHUP, lambda *_: got_hup.append(1))  # the "ancestor" case aims at this process
results = {}
for name, make, app_uid in json.loads(sys.argv[5]):
    app, root = canary(uid), canary(0)
    time.sleep(0.1)
    extra = None
    if make == "APP":
        content = str(app.pid)
    elif make == "ROOT":
        content = str(root.pid)
    elif make == "SELF":
        content = str(os.getpid())
    elif make == "PARENT":  # a child notifies: this process is its ancestor
        write(str(os.getpid()))
        child = os.fork()
        if child == 0:
            signal.alarm(3)
            sup.notify(pidfile, signal.SIGHUP, None)
            os._exit(0)
        os.waitpid(child, 0)
        content = "0"  # what this process then notifies: nothing
    elif make == "ZOMBIE":
        content = str(zombie())
    elif make == "NESTED":
        extra, pid = nested()
        content = str(pid)
    elif make == "GONE":
        gone = subprocess.Popen(["true"]); gone.wait()
        content = str(gone.pid)
    elif make == "SYMLINK_APP":
        content = ("symlink", str(app.pid))
    elif isinstance(make, list):
        content = tuple(make)
    else:
        content = make.encode()
    write(content)
    before = hups()
    began = time.monotonic()
    signal.alarm(3)
    try:
        sup.notify(pidfile, signal.SIGHUP, app_uid)
        outcome = "returned"
    except TimeoutError:
        outcome = "hung"
    signal.alarm(0)
    elapsed = time.monotonic() - began
    time.sleep(0.2)
    results[name] = {"outcome": outcome, "seconds": round(elapsed, 3), "app": app.poll() is not None,
                     "root": root.poll() is not None, "pid1": hups() > before, "ancestor": bool(got_hup)}
    for p in (app, root, extra):
        if p is not None and p.poll() is None:
            p.kill(); p.wait()
print(json.dumps(results))
"""


def notify_cases(uid: int) -> list[tuple[str, object, int | None]]:
    """(name, pidfile content or recipe, app uid passed to notify); only "valid" may signal."""
    too_long = "1" * 8
    return [
        ("minus one", "-1", uid),
        ("minus one, no user", "-1", None),
        ("zero", "0", None),  # kill(0) signals our own process group
        ("minus pid", "-2", None),
        ("plus sign", "+1", None),
        ("hex", "0x1", None),
        ("unicode digits", "\u0661", uid),  # Arabic-Indic 1: int() would take it
        ("eight digits", too_long, None),
        ("two pids", "1 1", None),
        ("trailing text", "1abc", None),
        ("empty", "", None),
        ("spaces only", " " * 40, None),
        ("nul byte", "1\x00", None),
        ("fifo", ["fifo", ""], None),
        ("directory", ["dir", ""], None),
        ("symlink to the app's pid", "SYMLINK_APP", uid),
        ("own pid", "SELF", None),
        ("an ancestor", "PARENT", None),
        ("a zombie", "ZOMBIE", None),
        ("no such process", "GONE", None),
        ("nested pid namespace", "NESTED", None),
        ("another user's process", "ROOT", uid),
        ("pid 1 without a named user", "1", None),
        ("pid 1 that is the app", "1", uid),
        ("valid", "APP", uid),
    ]


@pytest.fixture
def app_pid_namespace(workdir: Path, app_user: UnixUser) -> Iterator[tuple[int, Path]]:
    """A new PID namespace whose pid 1 is an app running as the app user: (its host pid, its SIGHUP log)."""
    marker = workdir / "hups"
    marker.touch()
    os.chown(marker, app_user.uid, app_user.gid)
    script = app_command(workdir, "ns_app", NS_APP)
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "setpriv", f"--reuid={app_user.uid}",
         f"--regid={app_user.gid}", "--clear-groups", *script, str(marker)],
    )  # fmt: skip
    app = None
    try:
        deadline = time.monotonic() + 10
        while "READY" not in marker.read_text():
            assert time.monotonic() < deadline, "the namespace's app did not start"
            time.sleep(0.02)
        app = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
        yield app, marker
    finally:
        if app is not None:  # its pid 1: the namespace ends with it (setpriv cleared --kill-child's death signal)
            os.kill(app, signal.SIGKILL)
        proc.kill()
        proc.wait()


@pytest.mark.hostile("app-user")
def test_the_sidecar_signals_only_a_pid_that_passes_every_check(
    app_pid_namespace: tuple[int, Path], workdir: Path, app_user: UnixUser
) -> None:
    """Defect 9: `-1` made the root sidecar signal every process; a FIFO hung it for good.

    25 pidfiles in a PID namespace shared with the app (its pid 1): only the app's own pid,
    and pid 1 when it runs as the named app user, are signalled. Nothing hangs.
    """
    ns_app, marker = app_pid_namespace
    cases = notify_cases(app_user.uid)
    result = subprocess.run(
        ["nsenter", f"--target={ns_app}", "--pid", "--mount", sys.executable, "-c", NOTIFY_WORKER,
         str(app_user.uid), str(app_user.gid), str(workdir), str(marker), json.dumps(cases)],
        env=base_env(PYTHONPATH=str(REPO)), cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        start_new_session=True,  # a pid 0 signals the caller's process group: never the test's
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout.splitlines()[-1])
    assert set(outcomes) == {name for name, _, _ in cases}
    signalled = {name for name, o in outcomes.items() if o["app"] or o["root"] or o["pid1"] or o["ancestor"]}
    assert signalled == {"valid", "pid 1 that is the app"}, outcomes
    assert outcomes["valid"]["app"] and not outcomes["valid"]["root"]
    assert all(o["outcome"] == "returned" and o["seconds"] < 1 for o in outcomes.values()), outcomes
    refusals = [e for e in log_events(result.stderr) if e["event"] == "could not notify the app"]
    assert len(refusals) == len(cases) - 2 + 1, (
        "every refusal (the ancestor case refuses twice) is logged, with its reason"
    )
    assert all(e["level"] == "warning" and e["error"] for e in refusals)
    record_cases("app-user", len(cases))


# -- 10. a stop the app declines ---------------------------------------------------------------

KV_APP = r"""
import hashlib, json, os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as shells and REPLs do
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
data = open(os.environ["API_KEY_FILE"], "rb").read()
print(json.dumps({"event": "start", "pid": os.getpid(), "sha256": hashlib.sha256(data).hexdigest()}), flush=True)
while True:
    time.sleep(0.1)
"""


class Lines(JsonLines):
    """secret-init as the test started it; `drain` reads on while nothing is awaited."""

    def drain(self, seconds: float) -> None:
        """Read whatever comes for `seconds`: a full pipe would block secret-init's logging."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.proc.stdout, self.proc.stderr], [], [], left)
            for stream in ready:
                line = stream.readline().decode()
                if not line:
                    return
                self.take(stream is self.proc.stdout, line)


def kv_config(bao: Bao, tmpfs: Path, workdir: Path, app_user: UnixUser, key: str, process: str) -> Path:
    role_file, secret_file, _ = bao.approle_credentials("app", workdir)
    return write_config(
        workdir,
        f'[output]\ndir = "{tmpfs}/out"\nuser = "{app_user.name}"\n'
        f'[vault]\naddr = "{bao.addr}"\nauth = "approle"\nrole_id_file = "{role_file}"\n'
        f'secret_id_file = "{secret_file}"\nrefresh_interval = "1s"\n'
        f"[process]\nsupervise = true\n{process}\n"
        f'[[secret]]\nname = "api_key"\nsource = "vault:secret/data/app/{key}#k"\nenv = "API_KEY_FILE"\n',
    )


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@pytest.mark.hostile("signals")
def test_a_declined_sigint_does_not_end_rotation(bao: Bao, tmpfs: Path, workdir: Path, app_user: UnixUser) -> None:
    """Defect 10: after a SIGINT the app ignored, no refresh or rotation ever ran again.

    The secret changes in Vault during the grace (stop_timeout 2 s): the refresh is deferred,
    then done once the app has outlived the grace, and the app is restarted with the new value.
    """
    key = secrets.token_hex(6)
    first, second = random_secret("kv1"), random_secret("kv2")
    bao.client.secrets.kv.v2.create_or_update_secret(path=f"app/{key}", secret={"k": first})
    cfg = kv_config(bao, tmpfs, workdir, app_user, key, 'stop_timeout = "2s"')
    proc = subprocess.Popen(
        [sys.executable, "-m", "secret_init", "run", "--config", str(cfg), "--", *app_command(workdir, "kv", KV_APP)],
        env=base_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
    )  # fmt: skip
    run = Lines(proc)
    try:
        run.until(lambda r: len(r.lines) == 1, 20)
        assert run.lines[0]["sha256"] == sha(first)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        run.until(lambda r: bool(r.logged("signal forwarded")), 10)
        bao.client.secrets.kv.v2.create_or_update_secret(path=f"app/{key}", secret={"k": second})
        run.until(lambda r: len(r.lines) == 2, 20)
        restarted_after = time.monotonic() - sent
        assert run.lines[1]["sha256"] == sha(second), "the restarted app reads the new value"
        assert restarted_after >= 2, "nothing was restarted during the grace"
    finally:
        code = run.finish()
    assert code == 0, run.logs[-5:]
    declined = [e for e in run.logs if "declined the stop" in e["event"]]
    assert len(declined) == 1, "logged once"
    events = [e["event"] for e in run.logs]
    assert events.index(declined[0]["event"]) < events.index("app restarted"), "deferred until the grace ended"
    assert_no_leak(json.dumps(run.logs) + json.dumps(run.lines), first, second)


IGNORES_SIGINT_APP = r"""
import json, os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
user = open(os.environ["DB_USER_FILE"]).read()
print(json.dumps({"event": "start", "pid": os.getpid(), "user": user}), flush=True)
while True:
    time.sleep(0.1)
"""


@pytest.mark.hostile("signals")
def test_a_lease_rotates_after_a_declined_sigint(
    database: Database, tmpfs: Path, workdir: Path, app_user: UnixUser
) -> None:
    """Defect 10 with a database lease (3 s TTL, 9 s max): SIGINT at once, declined; the lease
    still rotates, the app is restarted with the new user, and the old lease is revoked."""
    creds = database.role("3s", "9s")
    role_file, secret_file, _ = database.bao.approle_credentials("app", workdir)
    cfg = write_config(
        workdir,
        f'[output]\ndir = "{tmpfs}/out"\nuser = "{app_user.name}"\n'
        f'[vault]\naddr = "{database.bao.addr}"\nauth = "approle"\nrole_id_file = "{role_file}"\n'
        f'secret_id_file = "{secret_file}"\nrequest_timeout = "2s"\n'
        '[process]\nstop_timeout = "1s"\n'
        f'[[secret]]\nname = "db_user"\nsource = "vault:{creds}#username"\nenv = "DB_USER_FILE"\n',
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "secret_init", "run", "--config", str(cfg), "--",
         *app_command(workdir, "no_sigint", IGNORES_SIGINT_APP)],
        env=base_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
    )  # fmt: skip
    run = Lines(proc)
    try:
        run.until(lambda r: len(r.lines) == 1, 20)
        first = database.leases(creds)
        proc.send_signal(signal.SIGINT)
        run.until(lambda r: len(r.lines) == 2, 20)
        assert run.lines[1]["user"] != run.lines[0]["user"], "restarted with new credentials"
        run.until(lambda r: bool(r.logged("lease revoked")), 10)
        assert not set(first) & set(database.leases(creds)), "the old lease is revoked"
    finally:
        code = run.finish()
    assert code == 0, run.logs[-5:]
    assert len([e for e in run.logs if "declined the stop" in e["event"]]) == 1
    assert database.leases(creds) == []


# -- 11. an interrupted start --------------------------------------------------------------------


@pytest.fixture
def dead_database_role(database: Database) -> str:
    """A creds path on a connection to a port nobody listens on: real OpenBao answers HTTP 500
    (it cannot reach the database), which secret-init retries until startup_timeout."""
    name = f"dead{secrets.token_hex(3)}"
    database.bao.client.write(
        f"database/config/{name}",
        plugin_name="postgresql-database-plugin",
        allowed_roles="*",
        connection_url=f"postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{free_port()}/postgres",
        username="postgres",
        password=secrets.token_hex(8),
        verify_connection=False,
    )
    database.bao.client.write(
        f"database/roles/{name}", db_name=name, default_ttl="60s", max_ttl="120s",
        creation_statements=["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}';"],
    )  # fmt: skip
    return f"database/creds/{name}"


def two_path_config(workdir: Path, tmpfs: Path, app_user: UnixUser, bao: Bao, good: str, second: str) -> Path:
    return write_config(
        workdir,
        f'[output]\ndir = "{tmpfs}/out"\nuser = "{app_user.name}"\n'
        f'[vault]\naddr = "{bao.addr}"\nstartup_timeout = "60s"\nrequest_timeout = "2s"\n'
        f'[[secret]]\nname = "db_user"\nsource = "vault:{good}#username"\n'
        f'[[secret]]\nname = "other"\nsource = "vault:{second}#username"\n',
    )


def supplied_token(database: Database) -> str:
    """A token the test makes: secret-init may not revoke it, so each lease must be revoked by itself."""
    return str(database.bao.client.auth.token.create(policies=["app-read"], ttl="5m")["auth"]["client_token"])


@pytest.mark.hostile("signals")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_start_interrupted_by_a_signal_revokes_its_leases(
    database: Database, dead_database_role: str, tmpfs: Path, workdir: Path, app_user: UnixUser, signum: int
) -> None:
    """Defect 11: a stop while the second path is retried left the first path's lease alive.

    Exit 128+signum, one error line, no lease left, no file written.
    """
    good = database.role("60s", "120s")
    cfg = two_path_config(workdir, tmpfs, app_user, database.bao, good, dead_database_role)
    token = supplied_token(database)
    proc = subprocess.Popen(
        [sys.executable, "-m", "secret_init", "run", "--config", str(cfg), "--", "/bin/true"],
        env=base_env(VAULT_TOKEN=token), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
    )  # fmt: skip
    run = Lines(proc)
    try:
        run.until(
            lambda r: any(
                dead_database_role in e.get("request", "") for e in r.logged("vault request failed, retrying")
            ),
            30,
        )
        assert len(database.leases(good)) == 1, "the first path's lease is live while the second is retried"
        proc.send_signal(signum)
        began = time.monotonic()
        code = proc.wait(30)
        took = time.monotonic() - began
    finally:
        if proc.poll() is None:
            proc.kill()
    run.finish()
    assert code == 128 + signum, run.logs[-5:]
    assert took < 10
    errors = [e for e in run.logs if e["level"] == "error"]
    assert len(errors) == 1 and errors[0]["exit_code"] == 128 + signum, errors
    assert database.leases(good) == []
    assert not (tmpfs / "out" / "db_user").exists()
    assert_no_leak(json.dumps(run.logs), token)


@pytest.mark.hostile("faults")
def test_a_start_that_fails_after_the_reads_revokes_its_leases(
    database: Database, tmpfs: Path, workdir: Path, app_user: UnixUser
) -> None:
    """Defect 11: every read succeeds, then the app cannot be started (127): the lease is revoked too."""
    good = database.role("60s", "120s")
    cfg = write_config(
        workdir,
        f'[output]\ndir = "{tmpfs}/out"\nuser = "{app_user.name}"\n[vault]\naddr = "{database.bao.addr}"\n'
        f'[[secret]]\nname = "db_user"\nsource = "vault:{good}#username"\n',
    )
    result = subprocess.run(
        [sys.executable, "-m", "secret_init", "run", "--config", str(cfg), "--", "/nonexistent/app"],
        env=base_env(VAULT_TOKEN=supplied_token(database)), cwd=REPO, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 127, result.stderr[-2000:]
    assert [e for e in log_events(result.stderr) if e["event"] == "lease revoked"]
    assert database.leases(good) == []


# -- 12. a terminal ---------------------------------------------------------------------------------

TTY_APP = r"""
import os, sys
print("ready", flush=True)
line = sys.stdin.readline()
print("got:" + line.strip(), flush=True)
"""


@pytest.mark.hostile("signals")
def test_a_supervised_app_on_a_terminal_reads_stdin(tmpfs: Path, workdir: Path, app_user: UnixUser) -> None:
    """Defect 12: in its own process group the app was stopped by SIGTTIN when it read stdin.

    secret-init runs as a session leader with a real pseudo-terminal as its controlling
    terminal (setsid --ctty), as under `docker run -it`.
    """
    secret = workdir / "token"
    secret.write_text(random_secret("t"))
    cfg = write_config(
        workdir,
        f'[output]\ndir = "{tmpfs}/out"\nuser = "{app_user.name}"\n[process]\nsupervise = true\n'
        f'[[secret]]\nname = "token"\nsource = "file:{secret}"\n',
    )
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        ["setsid", "--ctty", sys.executable, "-m", "secret_init", "--log-format", "json", "run", "--config", str(cfg),
         "--", *app_command(workdir, "tty_app", TTY_APP)],
        env=base_env(), cwd=REPO, stdin=slave, stdout=slave, stderr=slave,
    )  # fmt: skip
    os.close(slave)
    seen = b""
    try:
        seen = read_until(master, b"ready", seen)
        word = secrets.token_hex(8).encode()
        os.write(master, word + b"\n")
        seen = read_until(master, b"got:" + word, seen)
        assert proc.wait(15) == 0, seen.decode(errors="replace")[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


TTY_LOOP_APP = r"""
import hashlib, os, signal, sys
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
start = hashlib.sha256(open(os.environ["API_KEY_FILE"], "rb").read()).hexdigest()[:12]
print("ready:" + start, flush=True)
for line in sys.stdin:
    print(f"got:{start}:" + line.strip(), flush=True)
"""


@pytest.mark.hostile("signals")
def test_a_restarted_app_gets_the_terminal_too(bao: Bao, tmpfs: Path, workdir: Path, app_user: UnixUser) -> None:
    """Defect 12, after a restart: the secret changes in Vault, the app is restarted, and the new
    app (a new process group) reads the terminal as the first one did."""
    key = secrets.token_hex(6)
    first, second = random_secret("kv1"), random_secret("kv2")
    bao.client.secrets.kv.v2.create_or_update_secret(path=f"app/{key}", secret={"k": first})
    cfg = kv_config(bao, tmpfs, workdir, app_user, key, 'stop_timeout = "2s"')
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        ["setsid", "--ctty", sys.executable, "-m", "secret_init", "--log-format", "json", "run", "--config", str(cfg),
         "--", *app_command(workdir, "tty_loop", TTY_LOOP_APP)],
        env=base_env(), cwd=REPO, stdin=slave, stdout=slave, stderr=slave,
    )  # fmt: skip
    os.close(slave)
    seen = b""
    try:
        for value in (first, second):
            tag = sha(value)[:12].encode()
            seen = read_until(master, b"ready:" + tag, seen)
            word = secrets.token_hex(8).encode()
            os.write(master, word + b"\n")
            seen = read_until(master, b"got:" + tag + b":" + word, seen)
            bao.client.secrets.kv.v2.create_or_update_secret(path=f"app/{key}", secret={"k": second})
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, seen.decode(errors="replace")[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert_no_leak(seen.decode(errors="replace"), first, second)


def read_until(fd: int, wanted: bytes, seen: bytes, timeout: float = 15) -> bytes:
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {wanted!r} from the terminal: {seen.decode(errors='replace')[-1500:]}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:  # EIO: every slave end is closed
                break
    assert wanted in seen, f"no {wanted!r} from the terminal: {seen.decode(errors='replace')[-1500:]}"
    return seen


# -- signal storms ------------------------------------------------------------------------------

STORM_APP = r"""
import json, os, signal, time
for name in ("SIGHUP", "SIGUSR1", "SIGUSR2", "SIGWINCH", "SIGQUIT"):
    signal.signal(getattr(signal, name), signal.SIG_IGN)
signal.signal(signal.SIGTERM, lambda *_: os._exit(3))  # a code of its own: the one secret-init must exit with
os.write(1, (json.dumps({"event": "start", "pid": os.getpid()}) + "\n").encode())
while True:
    time.sleep(0.1)
"""

STORM = (signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD, signal.SIGWINCH)


def storm(run: Lines, seconds: float, counts: dict[str, int]) -> None:
    """Bursts of 50 signals, chosen in turn from STORM, every 20 ms, for `seconds`."""
    deadline = time.monotonic() + seconds
    turn = 0
    while time.monotonic() < deadline and run.proc.poll() is None:
        for _ in range(50):
            signum = STORM[turn % len(STORM)]
            turn += 1
            try:
                os.kill(run.proc.pid, signum)
            except ProcessLookupError:
                return
            counts[signal.Signals(signum).name] = counts.get(signal.Signals(signum).name, 0) + 1
        run.drain(0.02)


@pytest.mark.hostile("signals")
def test_signal_storms_during_restart_rotations(
    database: Database, tmpfs: Path, workdir: Path, app_user: UnixUser
) -> None:
    """Thousands of SIGHUP/SIGUSR1/SIGCHLD/SIGWINCH while leases rotate (on_rotate restart), then
    200 SIGTERMs: no crash, the app's exit code, every lease revoked."""
    creds = database.role("2s", "6s")
    role_file, secret_file, _ = database.bao.approle_credentials("app", workdir)
    cfg = write_config(
        workdir,
        f'[output]\ndir = "{tmpfs}/out"\nuser = "{app_user.name}"\n'
        f'[vault]\naddr = "{database.bao.addr}"\nauth = "approle"\nrole_id_file = "{role_file}"\n'
        f'secret_id_file = "{secret_file}"\nrequest_timeout = "2s"\n'
        '[process]\nstop_timeout = "1s"\n'
        f'[[secret]]\nname = "db_user"\nsource = "vault:{creds}#username"\n',
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "secret_init", "run", "--config", str(cfg), "--", "/bin/sh", "-c",
         # ignored before the exec: a forwarded SIGHUP can then only hit dash's first instructions
         f'trap "" HUP USR1; exec {" ".join(app_command(workdir, "storm_app", STORM_APP))}'],
        env=base_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
    )  # fmt: skip
    run = Lines(proc)
    counts: dict[str, int] = {}
    try:
        run.until(lambda r: len(r.lines) == 1, 20)
        storm(run, 9, counts)
        for _ in range(200):
            os.kill(proc.pid, signal.SIGTERM)
        counts["SIGTERM"] = 200
    finally:
        code = run.finish()
    print("signal storm:", counts, "rotations:", len(run.logged("lease rotated")), "code:", code)
    record_figure(
        "signal storms",
        "during restart rotations",
        signals=counts,
        rotations=len(run.logged("lease rotated")),
        code=code,
    )
    assert sum(counts.values()) > 1000
    assert len(run.logged("lease rotated")) >= 1, "the storm spanned a restart rotation"
    assert len(run.logged("app restarted")) >= 1
    assert not [e for e in run.logs if e["level"] == "error"], [e for e in run.logs if e["level"] == "error"]
    exited = run.logged("app exited")
    assert code == exited[-1]["exit_code"] == run.logged("supervisor exiting")[-1]["exit_code"], "the app's code"
    # 3: the last app ran until the SIGTERMs; 129/138: a storm signal hit a restarted app
    # before its shell's trap was in place, and that is its code too.
    assert code in (3, 129, 138), code
    assert database.leases(creds) == []


EXITS_3_APP = "trap '' HUP USR1; sleep 0.3; exit 3"


@pytest.mark.hostile("signals")
@pytest.mark.parametrize("attempt", range(4))
def test_a_storm_while_the_app_exits_keeps_its_exit_code(
    tmpfs: Path, workdir: Path, app_user: UnixUser, attempt: int
) -> None:
    """The app exits 3 by itself while SIGHUP/SIGUSR1/SIGCHLD/SIGWINCH keep coming, through
    secret-init's exit: Python's handlers are gone at interpreter exit, so a late SIGHUP
    killed it (-1) and the app's code was lost. Four runs."""
    source = workdir / "token"
    source.write_text(random_secret("t"))
    cfg = write_config(
        workdir,
        f'[output]\ndir = "{tmpfs}/out"\nuser = "{app_user.name}"\n[process]\nsupervise = true\n'
        f'stop_timeout = "1s"\n[[secret]]\nname = "token"\nsource = "file:{source}"\n',
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "secret_init", "run", "--config", str(cfg), "--", "/bin/sh", "-c", EXITS_3_APP],
        env=base_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
    )  # fmt: skip
    run = Lines(proc)
    counts: dict[str, int] = {}
    try:
        run.until(lambda r: bool(r.logged("app started")), 20)
        storm(run, 30, counts)  # until secret-init has exited
    finally:
        code = run.finish()
    print("storm at exit:", counts, "code:", code)
    record_figure("signal storms", f"while the app exits (run {attempt + 1})", signals=counts, code=code)
    assert sum(counts.values()) > 100
    assert code == 3, (code, counts)


# -- a stop signal while a Vault answer is on its way, and during the clean-up ---------------


class SlowIssuer(QuietHandler):
    """A FAKE Vault (labelled: a real one cannot be made to hold an answer it has already acted
    on): each read issues a lease at once, then answers 1.5 s later; each revoke takes 0.5 s."""

    issued: ClassVar[list[str]]
    revoked: ClassVar[list[str]]

    def do_GET(self) -> None:
        lease_id = f"{self.path.removeprefix('/v1/')}/{secrets.token_hex(6)}"
        self.issued.append(lease_id)  # the database user exists from here on
        time.sleep(1.5)
        self._answer(200, {"lease_id": lease_id, "lease_duration": 60, "renewable": True,
                           "data": {"username": random_secret("user"), "password": random_secret("pw")}})  # fmt: skip

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(0.5)
        if self.path.startswith("/v1/sys/leases/revoke"):
            self.revoked.append(json.loads(body)["lease_id"])
        self._answer(204, None)

    do_POST = do_PUT

    def _answer(self, status: int, doc: Any) -> None:
        body = b"" if doc is None else json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.hostile("signals")
def test_a_stop_while_an_answer_is_in_flight_and_during_the_clean_up_revokes_every_lease(
    tmpfs: Path, workdir: Path, app_user: UnixUser
) -> None:
    """Was: the SIGTERM raised out of the read, so its answer (and lease) was lost; a second
    SIGTERM during the revokes stopped them. Now a stop waits for the answer in flight, and
    the clean-up runs to its end: both paths' leases are revoked, exit 143, one line."""

    class Issuer(SlowIssuer):
        issued: ClassVar[list[str]] = []
        revoked: ClassVar[list[str]] = []

    handler = Issuer
    server, addr = serve_http(handler)
    try:
        cfg = write_config(
            workdir,
            f'[output]\ndir = "{tmpfs}/out"\nuser = "{app_user.name}"\n[vault]\naddr = "{addr}"\n'
            '[[secret]]\nname = "a"\nsource = "vault:database/creds/a#password"\n'
            '[[secret]]\nname = "b"\nsource = "vault:database/creds/b#password"\n',
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "secret_init", "run", "--config", str(cfg), "--", "true"],
            env=base_env(VAULT_TOKEN=random_secret("tok")), cwd=REPO, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(2.0)  # the first answer is in, the second read is in flight
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.5)  # the second answer is in: the clean-up is revoking
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        stop_http(server)
    record_output(stderr, "secret-init stderr")
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    errors = [e for e in log_events(stderr) if e["level"] == "error"]
    assert len(errors) == 1 and "start interrupted by signal 15" in errors[0]["event"], stderr
    assert len(handler.issued) == 2, "the second read was in flight when the stop came"
    assert sorted(handler.revoked) == sorted(handler.issued)
