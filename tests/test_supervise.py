"""Supervise mode as a real PID 1: signals forwarded, zombies reaped, exit codes, stop, isolation.

The helper app is modelled on dumb-init's tests: it prints every signal it receives.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from tests.conftest import (
    REPO,
    UnixUser,
    app_command,
    base_env,
    log_events,
    needs_root,
    random_secret,
    record_output,
    record_process,
    write_config,
)

pytestmark = needs_root

FORWARDED = ["SIGHUP", "SIGINT", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH", "SIGTERM"]

SIGNAL_APP = r"""
import json, os, signal, subprocess, sys
mode = sys.argv[1]
def say(line):
    os.write(1, (line + "\n").encode())  # not print: a handler that prints while print runs raises
def echo(signum, frame):
    say(signal.Signals(signum).name)
    if signum == signal.SIGTERM:
        sys.exit(0)
for name in ("SIGHUP", "SIGINT", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH", "SIGTERM", "SIGCHLD"):
    signal.signal(getattr(signal, name), echo)
def attempt(path):
    try:
        open(path, "rb").read(1)
        return "read"
    except OSError as e:
        return e.strerror
def leave_behind(label, setsid):
    # A process that ignores SIGTERM. Its first line ("LABEL PID") comes once SIG_IGN is in
    # place; the app passes that line on, then exits and leaves the process behind.
    code = ("import os, signal, time; " + ("os.setsid(); " if setsid else "")
            + "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            + f"print({label!r}, os.getpid(), flush=True); time.sleep(60)")
    # Not secret-init's stderr: the test's pipes then close when secret-init exits, survivor or not.
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    say(child.stdout.readline().strip())
    sys.exit(0)
if mode == "exit7":
    sys.exit(7)
if mode == "kill9":
    os.kill(os.getpid(), signal.SIGKILL)
orphans = []
if mode == "orphans":
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    r, w = os.pipe()
    for _ in range(3):  # double fork: each grandchild is orphaned and exits at once
        if os.fork() == 0:
            grandchild = os.fork()
            if grandchild == 0:
                os._exit(0)
            os.write(w, f"{grandchild}\n".encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as pids:  # EOF once every child and grandchild is gone
        orphans = [int(pid) for pid in pids.read().split()]
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
if mode == "escaped":
    leave_behind("daemon", setsid=True)  # left the app's process group: killpg misses it
if mode == "leftover":
    leave_behind("child", setsid=False)  # a grandchild in the app's group
parent = os.getppid()
fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
say(json.dumps({"ready": os.getpid(), "uid": os.getuid(), "fds": fds, "orphans": orphans,
    "parent_environ": attempt(f"/proc/{parent}/environ"), "parent_mem": attempt(f"/proc/{parent}/mem"),
    "env": sorted(os.environ)}))
while True:
    signal.pause()
"""


@pytest.fixture
def signal_app(workdir: Path) -> list[str]:
    return app_command(workdir, "signal_app", SIGNAL_APP)


@pytest.fixture
def supervised_config(tmpfs: Path, workdir: Path, app_user: UnixUser) -> Path:
    secret = workdir / "token"
    secret.write_text(random_secret("t"))
    return write_config(
        workdir,
        f'[output]\ndir = "{tmpfs}/out"\nuser = "{app_user.name}"\n'
        '[process]\nsupervise = true\nstop_timeout = "1s"\n'
        f'[[secret]]\nname = "token"\nsource = "file:{secret}"\nenv = "TOKEN_FILE"\n',
    )


def start(
    config: Path, app: list[str], *, prefix: tuple[str, ...] = (), level: str = "info", **env: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", "secret_init", "--log-level", level, "run", "--config", str(config), "--",
         *app],
        env=base_env(**env), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def readline(stream: IO[str] | None, timeout: float = 10, who: str = "the app") -> str:
    """One line from the app (or secret-init's stderr), or fail: both print within milliseconds."""
    import select

    assert stream is not None
    raw = stream.buffer.raw  # type: ignore[attr-defined]
    line = b""
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([raw], [], [], timeout)
        assert ready, f"{who} printed nothing in {timeout} s"
        chunk = raw.read(1)  # byte by byte: nothing is left waiting in a buffer
        assert chunk, f"{who} closed its output"
        line += chunk
    return line.decode().strip()


@pytest.fixture
def supervised(
    supervised_config: Path, signal_app: list[str]
) -> Iterator[tuple[subprocess.Popen[str], dict[str, object]]]:
    proc = start(supervised_config, [*signal_app, "echo"], VAULT_TOKEN=random_secret("tok"))
    try:
        hello = json.loads(readline(proc.stdout))
        record_process(int(hello["ready"]), "the supervised app")  # its environ must hold no token
        record_process(proc.pid, "secret-init", environ=False)  # its environ holds the test's VAULT_TOKEN
        yield proc, hello
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM the supervisor (it forwards); a supervisor killed outright would orphan the app."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        stdout, stderr = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    record_output(stdout, "app stdout through secret-init")
    record_output(stderr, "secret-init stderr")
    return stderr


@pytest.mark.hostile("signals")
def test_every_forwarded_signal_reaches_the_app_and_sigchld_does_not(
    supervised: tuple[subprocess.Popen[str], dict[str, object]],
) -> None:
    proc, _ = supervised
    for name in FORWARDED[:-1]:
        proc.send_signal(getattr(signal, name))
        assert readline(proc.stdout) == name
    proc.send_signal(signal.SIGCHLD)  # must not be forwarded: the next line is the marker
    proc.send_signal(signal.SIGUSR1)
    assert readline(proc.stdout) == "SIGUSR1"
    proc.send_signal(signal.SIGTERM)
    assert readline(proc.stdout) == "SIGTERM"
    assert proc.wait(10) == 0


@pytest.mark.hostile("app-user")
def test_the_app_runs_as_the_user_and_cannot_read_the_supervisor(
    supervised: tuple[subprocess.Popen[str], dict[str, object]], app_user: UnixUser
) -> None:
    _, hello = supervised
    assert hello["uid"] == app_user.uid
    assert hello["parent_environ"] == "Permission denied"
    assert hello["parent_mem"] == "Permission denied"
    assert hello["fds"] == [0, 1, 2, 3], "only stdio (3 is the listing's own): no inherited descriptor"
    assert "TOKEN_FILE" in hello["env"]  # type: ignore[operator]
    assert not [k for k in hello["env"] if k.startswith(("VAULT_", "BAO_"))]  # type: ignore[attr-defined]
    status = Path(f"/proc/{hello['ready']}/status").read_text()
    assert f"Uid:\t{app_user.uid}\t{app_user.uid}\t{app_user.uid}" in status
    assert "NoNewPrivs:\t1" in status


@pytest.mark.hostile("signals")
@pytest.mark.parametrize(("mode", "code"), [("exit7", 7), ("kill9", 137)])
def test_exit_codes(supervised_config: Path, signal_app: list[str], mode: str, code: int) -> None:
    proc = start(supervised_config, [*signal_app, mode])
    proc.communicate(timeout=30)
    assert proc.returncode == code


@pytest.mark.hostile("signals")
def test_orphaned_grandchildren_are_reaped(supervised_config: Path, signal_app: list[str]) -> None:
    """Grandchildren orphaned by the app are re-parented to secret-init (a subreaper) and reaped.

    The app names its three orphans; the test reads secret-init's debug log until each of
    them is reported reaped (no fixed wait), then checks none is left a zombie.
    """
    proc = start(supervised_config, [*signal_app, "orphans"], level="debug")
    logged = ""
    try:
        orphans = set(json.loads(readline(proc.stdout))["orphans"])
        assert len(orphans) == 3, orphans
        reaped: set[int] = set()
        while not orphans <= reaped:
            line = readline(proc.stderr, who="secret-init (no 'reaped' for every orphan)")
            logged += line + "\n"
            reaped |= {e["pid"] for e in log_events(line) if e["event"] == "reaped"}
        assert zombies_of(proc.pid) == []
    finally:
        logged += stop(proc)
    reaped_events = [e for e in log_events(logged) if e["event"] == "reaped"]
    assert sorted(e["pid"] for e in reaped_events) == sorted(orphans), "the three orphans, reaped by secret-init"


def zombies_of(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z" and int(fields[1]) == parent:
            found.append(int(entry))
    return found


def left_behind(proc: subprocess.Popen[str], label: str) -> int | None:
    """The "LABEL PID" line the app passes on once its leftover ignores SIGTERM; a pidfd for that pid.

    A pidfd keeps naming that very process, so a recycled pid can never pass for a survivor.
    None: the process is already gone (SIGKILLed after stop_timeout before the test looked).
    """
    name, pid = readline(proc.stdout).split()
    assert name == label
    try:
        return os.pidfd_open(int(pid))
    except ProcessLookupError:
        return None


def survives(pidfd: int | None) -> bool:
    """Still there (alive, or a zombie nobody reaped): signal 0 through the pidfd reaches it."""
    if pidfd is None:
        return False
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    return True


def kill_survivor(pidfd: int | None) -> None:
    """Cleanup after a failed test: SIGKILL exactly that process, never a name match on the host."""
    if pidfd is None:
        return
    if survives(pidfd):
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    os.close(pidfd)


def assert_stopped_after_stop_timeout(config: Path, app: list[str], mode: str, label: str) -> None:
    """Run the app in `mode`; the process it leaves behind (and names) is SIGKILLed, then reaped."""
    proc = start(config, [*app, mode])
    pidfd = None
    try:
        pidfd = left_behind(proc, label)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr
        assert "killing them" in stderr
        assert not survives(pidfd), f"the {label} the app left behind outlived secret-init"
    finally:
        if proc.poll() is None:
            stop(proc)
        kill_survivor(pidfd)


@pytest.mark.hostile("signals")
def test_leftovers_are_terminated_then_killed(supervised_config: Path, signal_app: list[str]) -> None:
    """The app exits leaving a child that ignores SIGTERM: SIGKILL after stop_timeout (1 s)."""
    assert_stopped_after_stop_timeout(supervised_config, signal_app, "leftover", "child")


@pytest.mark.hostile("signals")
def test_a_daemon_that_left_the_group_is_stopped_too(supervised_config: Path, signal_app: list[str]) -> None:
    """tini#180: a grandchild that called setsid escapes killpg; as subreaper secret-init still stops it."""
    assert_stopped_after_stop_timeout(supervised_config, signal_app, "escaped", "daemon")


@pytest.mark.hostile("signals")
def test_as_pid_1_in_a_new_pid_namespace(supervised_config: Path, signal_app: list[str]) -> None:
    """Under `unshare --pid`, secret-init is PID 1: signals still reach the app, SIGTERM ends it."""
    proc = start(supervised_config, [*signal_app, "echo"], prefix=("unshare", "--pid", "--fork", "--mount-proc"))
    try:
        hello = json.loads(readline(proc.stdout))
        assert hello["ready"] == 2, "the app is the first child of PID 1"
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        pid1 = int(children[0])
        nspid = next(line for line in Path(f"/proc/{pid1}/status").read_text().splitlines() if line.startswith("NSpid"))
        assert nspid.split()[-1] == "1", "secret-init is PID 1 in its namespace"
        os.kill(pid1, signal.SIGUSR2)
        assert readline(proc.stdout) == "SIGUSR2"
        os.kill(pid1, signal.SIGTERM)
        assert readline(proc.stdout) == "SIGTERM"
        assert proc.wait(10) == 0
    finally:
        stop(proc)


@pytest.mark.hostile("app-user")
def test_a_module_planted_in_the_working_directory_is_never_imported_as_root(
    supervised_config: Path, workdir: Path, app_user: UnixUser
) -> None:
    """`python -m` puts the working directory on sys.path; secret-init imports psutil late, as root.

    The directory belongs to the app's user, who could plant a psutil.py there: secret-init
    must forget such import paths before the app starts.
    """
    planted = workdir / "app-home"
    planted.mkdir()
    marker = workdir / "planted-module-ran"
    (planted / "psutil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    os.chown(planted, app_user.uid, app_user.gid)
    proc = subprocess.Popen(
        [sys.executable, "-m", "secret_init", "run", "--config", str(supervised_config), "--", "/bin/true"],
        env=base_env(PYTHONPATH=str(REPO)), cwd=planted, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "app exited" in [e["event"] for e in log_events(stderr)], "the app ran, then psutil was needed"
    assert not marker.exists(), "a module from the app's directory ran as root"
