"""Supervise mode as a real PID 1: signals forwarded, zombies reaped, exit codes, stop, isolation.

The helper app is modelled on dumb-init's tests: it prints every signal it receives.
"""

import json
import os
import signal
import subprocess
import sys
import time
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
    write_config,
)

pytestmark = needs_root

FORWARDED = ["SIGHUP", "SIGINT", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH", "SIGTERM"]

SIGNAL_APP = r"""
import json, os, signal, subprocess, sys, time
mode = sys.argv[1]
def echo(signum, frame):
    print(signal.Signals(signum).name, flush=True)
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
if mode == "exit7":
    sys.exit(7)
if mode == "kill9":
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "orphans":
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for _ in range(3):  # double fork: each grandchild is orphaned and exits at once
        if os.fork() == 0:
            if os.fork() == 0:
                os._exit(0)
            os._exit(0)
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
if mode == "escaped":
    # A daemon that leaves the app's process group (setsid) and ignores SIGTERM.
    code = ("import os, signal, time; os.setsid(); signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('daemon', os.getpid(), flush=True); time.sleep(60)")
    subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.5)
    sys.exit(0)
if mode == "leftover":
    # A grandchild in the app's group that ignores SIGTERM, left behind when the app exits.
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('child', flush=True); time.sleep(60)")
    subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.5)
    sys.exit(0)
parent = os.getppid()
fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
print(json.dumps({"ready": os.getpid(), "uid": os.getuid(), "fds": fds,
    "parent_environ": attempt(f"/proc/{parent}/environ"), "parent_mem": attempt(f"/proc/{parent}/mem"),
    "env": sorted(os.environ)}), flush=True)
while True:
    time.sleep(0.05)
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


def readline(stream: IO[str] | None, timeout: float = 10) -> str:
    """One line from the app, or fail: the helper prints within milliseconds."""
    import select

    assert stream is not None
    raw = stream.buffer.raw  # type: ignore[attr-defined]
    line = b""
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([raw], [], [], timeout)
        assert ready, "the app printed nothing"
        chunk = raw.read(1)  # byte by byte: nothing is left waiting in a buffer
        assert chunk, "the app closed its output"
        line += chunk
    return line.decode().strip()


@pytest.fixture
def supervised(
    supervised_config: Path, signal_app: list[str]
) -> Iterator[tuple[subprocess.Popen[str], dict[str, object]]]:
    proc = start(supervised_config, [*signal_app, "echo"], VAULT_TOKEN=random_secret("tok"))
    try:
        hello = json.loads(readline(proc.stdout))
        yield proc, hello
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM the supervisor (it forwards); a supervisor killed outright would orphan the app."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return stderr


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


@pytest.mark.parametrize(("mode", "code"), [("exit7", 7), ("kill9", 137)])
def test_exit_codes(supervised_config: Path, signal_app: list[str], mode: str, code: int) -> None:
    proc = start(supervised_config, [*signal_app, mode])
    proc.communicate(timeout=30)
    assert proc.returncode == code


def test_orphaned_grandchildren_are_reaped(supervised_config: Path, signal_app: list[str]) -> None:
    """Grandchildren orphaned by the app are re-parented to secret-init (a subreaper) and reaped."""
    proc = start(supervised_config, [*signal_app, "orphans"], level="debug")
    try:
        line = readline(proc.stdout)
        assert json.loads(line)["ready"]
        deadline = time.monotonic() + 5
        while zombies_of(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert zombies_of(proc.pid) == []
    finally:
        stderr = stop(proc)
    reaped = [e for e in log_events(stderr) if e["event"] == "reaped"]
    assert len(reaped) == 3, "the three orphans were reaped by secret-init itself"


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


def test_leftovers_are_terminated_then_killed(supervised_config: Path, signal_app: list[str]) -> None:
    """The app exits leaving a child that ignores SIGTERM: SIGKILL after stop_timeout (1 s)."""
    proc = start(supervised_config, [*signal_app, "leftover"])
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "child" in stdout
    assert "killing them" in stderr
    survivors = subprocess.run(["pgrep", "-f", "signal.SIG_IGN"], capture_output=True, text=True, check=False)
    assert survivors.stdout.strip() == ""


def test_a_daemon_that_left_the_group_is_stopped_too(supervised_config: Path, signal_app: list[str]) -> None:
    """tini#180: a grandchild that called setsid escapes killpg; as subreaper secret-init still stops it."""
    proc = start(supervised_config, [*signal_app, "escaped"])
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    daemon = int(stdout.split("daemon", 1)[1].split()[0])
    assert "killing them" in stderr
    assert not Path(f"/proc/{daemon}").exists()


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
