"""The app user attacks the output dir: locks, plants, chmod, a full tmpfs. All for real.

The attacker is a small Python process run as the real unprivileged `app_user`; it does
what it is told (see ATTACKER), prints what worked, then holds everything until its stdin
closes. secret-init runs as root through the real CLI, with generous timeouts: a hang is
a failed test, not a stuck session.
"""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    REPO,
    Bao,
    UnixUser,
    app_command,
    base_env,
    log_events,
    needs_root,
    random_secret,
    record_cases,
    record_output,
    run_cli,
    write_config,
)

pytestmark = needs_root

FAST = 8.0  # seconds: every run here takes well under one; a lock wait would take forever

ATTACKER = r"""
import errno, fcntl, json, os, signal, socket, struct, sys
signal.signal(signal.SIGIO, signal.SIG_IGN)  # a lease break notice must not end the attacker
held, done = [], {}
def ro(path):
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    held.append(fd)
    return fd
def flock(path):
    fcntl.flock(ro(path), fcntl.LOCK_EX | fcntl.LOCK_NB)
def lockf(path):
    fcntl.lockf(ro(path), fcntl.LOCK_SH | fcntl.LOCK_NB)
def ofd(path):
    fcntl.fcntl(ro(path), fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, 0, 0, 0))
def lease(path):
    fcntl.fcntl(ro(path), fcntl.F_SETLEASE, fcntl.F_WRLCK)
def owned_flocked(path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    held.append(fd)
    fcntl.flock(fd, fcntl.LOCK_EX)
def plant_socket(path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    held.append(s)
def fill(path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
def append(path):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"tampered")
    os.close(fd)
def plant_dir(path):
    os.mkdir(path)
    open(os.path.join(path, "inside"), "w").close()
ops = {
    "flock": flock, "lockf": lockf, "ofd": ofd, "lease": lease, "keep_open": ro,
    "owned_flocked": owned_flocked, "socket": plant_socket, "fill": fill, "dir": plant_dir,
    "mkdir": lambda p: os.mkdir(p, 0o777), "fifo": os.mkfifo,
    "symlink": lambda p, target: os.symlink(target, p), "hardlink": lambda p, src: os.link(src, p),
    "chmod": lambda p, mode: os.chmod(p, int(mode, 8)), "chown": lambda p: os.chown(p, os.getuid(), os.getgid()),
    "create": lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)),
    "open_rw": lambda p: os.close(os.open(p, os.O_RDWR | os.O_NONBLOCK)),
    "open_ro": lambda p: os.close(os.open(p, os.O_RDONLY | os.O_NONBLOCK)),
    "append": append,
    "unlink": os.unlink, "rename": lambda p, dst: os.rename(p, dst),
    "acl": lambda p: os.setxattr(p, "system.posix_acl_access", bytes.fromhex(ACL)),
    "acl_set": lambda p, name: os.setxattr(p, name, bytes.fromhex(ACL)),
}
ACL = sys.argv[2]
for i, (op, *args) in enumerate(json.loads(sys.argv[1])):
    try:
        ops[op](*args)
        done[f"{i} {op}"] = "ok"
    except OSError as e:
        done[f"{i} {op}"] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(done), flush=True)
sys.stdin.read()  # hold every descriptor, lock and lease until the test is done
"""


def posix_acl(*entries: tuple[int, int, int]) -> bytes:
    """The kernel's xattr form of a POSIX ACL: version 2, then (tag, perm, id) entries in order."""
    import struct

    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


NO_ID = 0xFFFFFFFF
# user::rwx, user:12345:r--, group::r-x, mask::r-x, other::---
ACL_NAMING_A_STRANGER = posix_acl(
    (0x01, 7, NO_ID), (0x02, 4, 12345), (0x04, 5, NO_ID), (0x10, 5, NO_ID), (0x20, 0, NO_ID)
)


class Attacker:
    def __init__(self, proc: "subprocess.Popen[str]", results: dict[str, str]) -> None:
        self.proc = proc
        self.results = results

    def outcomes(self) -> list[str]:
        return list(self.results.values())


@contextmanager
def attacking(workdir: Path, user: UnixUser, *actions: tuple[str, ...]) -> Iterator[Attacker]:
    """Run ATTACKER as the app user; yields once every action was tried (and is still held)."""
    script = app_command(workdir, "attacker", ATTACKER)
    proc = subprocess.Popen(
        [*script, json.dumps(actions), ACL_NAMING_A_STRANGER.hex()],
        user=user.uid, group=user.gid, extra_groups=[user.gid, user.extra_gid],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"the attacker failed: {proc.communicate(timeout=10)[1]}"
        yield Attacker(proc, json.loads(line))
    finally:
        proc.communicate(timeout=10)  # closing stdin lets it go


def as_app(workdir: Path, user: UnixUser, *actions: tuple[str, ...]) -> list[str]:
    """Try `actions` as the app user and let go at once; the outcome of each ("ok" or an errno name)."""
    with attacking(workdir, user, *actions) as attacker:
        return attacker.outcomes()


def file_config(workdir: Path, out: Path, user: UnixUser, extra: str = "") -> tuple[Path, Path]:
    """A config with one file source, `token`; returns it and the source file."""
    source = workdir / "token-source"
    source.write_text(random_secret("first"))
    cfg = write_config(
        workdir,
        f'[output]\ndir = "{out}"\nuser = "{user.name}"\n{extra}'
        f'[[secret]]\nname = "token"\nsource = "file:{source}"\nenv = "TOKEN_FILE"\n',
    )
    return cfg, source


def timed_render(cfg: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = run_cli("render", "--config", str(cfg), timeout=60)
    return result, time.monotonic() - started


def is_private(path: Path) -> bool:
    st = path.lstat()
    return stat.S_ISREG(st.st_mode) and (st.st_uid, st.st_nlink, stat.S_IMODE(st.st_mode)) == (0, 1, 0o600)


def only_error(stderr: str) -> str:
    """The one error secret-init logged: one line, no traceback."""
    errors = [e["event"] for e in log_events(stderr) if e["level"] in ("error", "critical")]
    assert len(errors) == 1 and "\n" not in errors[0] and "Traceback" not in stderr, stderr
    return str(errors[0])


# -- the app holds every lock it can ----------------------------------------------------------


def every_lock_on(out: Path, name: str) -> list[tuple[str, ...]]:
    """Every lock the app can hold on the dir and on its own file NAME (a write lease excludes them: see below)."""
    file = str(out / name)
    return [
        ("flock", str(out)), ("flock", str(out / ".secret-init")), ("flock", file),
        ("lockf", file), ("ofd", file), ("keep_open", file),
        ("flock", str(out / ".secret-init" / "owner.lock")), ("flock", str(out / ".secret-init" / "write.lock")),
    ]  # fmt: skip


@pytest.mark.hostile("app-user")
def test_render_finishes_while_the_app_holds_every_lock_it_can(tmpfs: Path, workdir: Path, app_user: UnixUser) -> None:
    """Was: the app's flock on the output dir froze every later write. Now nothing the app holds is waited on."""
    out = tmpfs / "out"
    cfg, source = file_config(workdir, out, app_user)
    assert run_cli("render", "--config", str(cfg)).returncode == 0
    second = random_secret("second")
    source.write_text(second)
    with attacking(workdir, app_user, *every_lock_on(out, "token")) as attacker:
        outcomes = attacker.outcomes()
        result, took = timed_render(cfg)
    assert outcomes[:6] == ["ok"] * 6, outcomes  # every lock on the dir and the file was really held
    assert outcomes[6:] == ["EACCES", "EACCES"], outcomes  # secret-init's own locks cannot even be opened
    assert result.returncode == 0, result.stderr
    assert took < FAST
    assert (out / "token").read_text() == second
    record_cases("app-user", len(outcomes))


@pytest.mark.hostile("app-user")
def test_an_app_write_lease_on_its_file_costs_a_rewrite_not_a_wait(
    tmpfs: Path, workdir: Path, app_user: UnixUser
) -> None:
    """The app owns its file, so it may take a write lease: reading it back must not wait lease-break-time."""
    out = tmpfs / "out"
    cfg, source = file_config(workdir, out, app_user)
    assert run_cli("render", "--config", str(cfg)).returncode == 0
    with attacking(workdir, app_user, ("lease", str(out / "token"))) as attacker:
        result, took = timed_render(cfg)  # the same value: only reading the file back tells
    assert attacker.outcomes() == ["ok"]
    assert result.returncode == 0, result.stderr
    assert took < FAST
    assert (out / "token").read_text() == source.read_text()
    record_cases("app-user", 1)


def start_supervised(cfg: Path, app: list[str]) -> "subprocess.Popen[str]":
    proc = subprocess.Popen(
        [sys.executable, "-m", "secret_init", "run", "--config", str(cfg), "--", *app],
        env=base_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
    return proc


def stop_supervised(proc: "subprocess.Popen[str]", out: Path, timeout: float = 30) -> tuple[int, str, float]:
    """SIGTERM, then its exit code, stderr and how long it took to exit."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # its app still holds the pipes: do not wait on them, end it too
        proc.wait()
        kill_app(out)
        return proc.returncode, "secret-init did not exit after SIGTERM", time.monotonic() - started
    record_output(stdout, "app stdout through secret-init")
    record_output(stderr, "secret-init stderr")
    return proc.returncode, stderr, time.monotonic() - started


QUIET_APP = (
    "import signal, sys\nsignal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
    "print('ready', flush=True)\nwhile True:\n    signal.pause()\n"
)


def kill_app(out: Path) -> None:
    """SIGKILL the app a killed supervisor left behind (its pid is in status.json)."""
    try:
        pid = int(json.loads((out / ".secret-init" / "status.json").read_text())["app_pid"])
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no status, or the app is gone already


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout} s"
        time.sleep(0.05)


def status_state(out: Path) -> str | None:
    try:
        return str(json.loads((out / ".secret-init" / "status.json").read_text())["state"])
    except (OSError, ValueError):
        return None


@pytest.mark.hostile("app-user")
def test_sigterm_is_acted_on_while_the_app_flocks_the_dir(tmpfs: Path, workdir: Path, app_user: UnixUser) -> None:
    """Was: the stop's status write waited on the app's flock forever. Now it exits at once, status "stopped"."""
    out = tmpfs / "out"
    cfg, _ = file_config(workdir, out, app_user, '[process]\nsupervise = true\nstop_timeout = "2s"\n')
    proc = start_supervised(cfg, app_command(workdir, "quiet_app", QUIET_APP))
    wait_for(lambda: status_state(out) == "running", 10, "status.json")
    status = str(out / ".secret-init" / "status.json")
    locks = [("flock", str(out)), ("flock", str(out / ".secret-init")), ("flock", status), ("ofd", status)]
    with attacking(workdir, app_user, *locks) as attacker:
        code, stderr, took = stop_supervised(proc, out)
    assert attacker.outcomes() == ["ok"] * len(locks)
    assert code == 0, stderr
    assert took < FAST
    assert status_state(out) == "stopped"
    record_cases("app-user", len(locks))


@pytest.mark.hostile("app-user")
def test_a_vault_refresh_lands_while_the_app_holds_every_lock_it_can(
    bao: Bao, tmpfs: Path, workdir: Path, app_user: UnixUser
) -> None:
    """A changed KV secret is rewritten (refresh_interval 1 s) under the app's locks, and SIGTERM still works."""
    import secrets as pysecrets

    key = pysecrets.token_hex(6)
    first, second = random_secret("kv1"), random_secret("kv2")
    bao.client.secrets.kv.v2.create_or_update_secret(path=f"app/{key}", secret={"k": first})
    role_file, secret_file, _ = bao.approle_credentials("app", workdir)
    out = tmpfs / "out"
    cfg = write_config(
        workdir,
        f'[output]\ndir = "{out}"\nuser = "{app_user.name}"\n'
        f'[vault]\naddr = "{bao.addr}"\nauth = "approle"\nrole_id_file = "{role_file}"\n'
        f'secret_id_file = "{secret_file}"\nrefresh_interval = "1s"\n'
        '[process]\nsupervise = true\non_rotate = "none"\nstop_timeout = "2s"\n'
        f'[[secret]]\nname = "api_key"\nsource = "vault:secret/data/app/{key}#k"\nenv = "API_KEY_FILE"\n',
    )
    proc = start_supervised(cfg, app_command(workdir, "quiet_app", QUIET_APP))
    try:
        wait_for(lambda: status_state(out) == "running", 10, "status.json")
        with attacking(workdir, app_user, *every_lock_on(out, "api_key")) as attacker:
            bao.client.secrets.kv.v2.create_or_update_secret(path=f"app/{key}", secret={"k": second})
            wait_for(lambda: (out / "api_key").read_text() == second, 20, "the rewrite under the app's locks")
            code, stderr, took = stop_supervised(proc, out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            kill_app(out)
    assert attacker.outcomes()[:6] == ["ok"] * 6, attacker.outcomes()
    assert code == 0, stderr
    assert took < FAST
    assert "secret changed in vault" in [e["event"] for e in log_events(stderr)]
    record_cases("app-user", len(attacker.outcomes()))


@pytest.mark.hostile("app-user")
def test_the_app_cannot_change_the_dirs_nor_open_secret_inits_locks(
    tmpfs: Path, workdir: Path, app_user: UnixUser
) -> None:
    """root:group 0750 dirs: not the owner, the app can chmod, chown, ACL, create, rename or unlink nothing there."""
    out = tmpfs / "out"
    cfg, _ = file_config(workdir, out, app_user)
    assert run_cli("render", "--config", str(cfg)).returncode == 0
    state = out / ".secret-init"
    tries: list[tuple[str, ...]] = [
        ("chmod", str(out), "0"), ("chmod", str(out), "777"), ("chmod", str(state), "0"), ("chmod", str(state), "777"),
        ("chown", str(out)), ("chown", str(state)), ("acl", str(out)), ("acl", str(state)),
        ("create", str(out / "intruder")), ("create", str(state / "intruder")), ("mkdir", str(state / "d")),
        ("rename", str(out / "token"), str(out / "moved")), ("unlink", str(out / "token")),
        ("unlink", str(state / "owner.lock")), ("symlink", str(state / "x"), "/etc/passwd"),
        ("open_ro", str(state / "owner.lock")), ("open_ro", str(state / "write.lock")),
        ("open_rw", str(state / "owner.lock")), ("open_rw", str(state / "write.lock")),
    ]  # fmt: skip
    outcomes = as_app(workdir, app_user, *tries)
    assert set(outcomes) <= {"EPERM", "EACCES"}, dict(zip([t[0] for t in tries], outcomes, strict=True))
    st = out.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, app_user.gid, 0o750)
    assert (out / "token").exists() and is_private(state / "owner.lock") and is_private(state / "write.lock")
    record_cases("app-user", len(tries))


@pytest.mark.hostile("app-user")
def test_the_app_filling_the_tmpfs_fails_a_rewrite_with_73_and_keeps_the_old_file(
    small_tmpfs: Path, workdir: Path, app_user: UnixUser
) -> None:
    """The app fills the 64 KiB tmpfs through a dir of its own: one line, 73, the old value stays, no temp file."""
    out = small_tmpfs / "out"
    cfg, source = file_config(workdir, out, app_user)
    assert run_cli("render", "--config", str(cfg)).returncode == 0
    old = (out / "token").read_text()
    mine = small_tmpfs / "app-scratch"
    mine.mkdir()
    os.chown(mine, app_user.uid, app_user.gid)
    assert as_app(workdir, app_user, ("fill", str(mine / "filler"))) == ["ok"]
    source.write_text(random_secret("new") * 200)  # a value that needs a page more
    result, took = timed_render(cfg)
    assert result.returncode == 73, result.stderr
    assert "No space left" in only_error(result.stderr)
    assert took < FAST
    assert (out / "token").read_text() == old
    leftovers = [p.name for d in (out, out / ".secret-init") for p in d.iterdir() if p.name.startswith(".si-tmp-")]
    assert leftovers == []


# -- plants in a volume the app owned before secret-init ran ----------------------------------------

PLANT_KINDS = ["symlink-file", "symlink-dir", "dir", "fifo", "socket", "app-file-flocked", "hardlink"]
PLANT_NAMES = [".secret-init/owner.lock", ".secret-init/write.lock", "token", ".si-tmp-0000", ".secret-init/.si-tmp-0"]


@pytest.fixture
def prepopulated(tmpfs: Path, app_user: UnixUser) -> Path:
    """`out` and `out/.secret-init`, 0777 and the app's (as a volume the app filled first), and victims."""
    out = tmpfs / "out"
    for d in (out, out / ".secret-init"):
        d.mkdir()
        os.chown(d, app_user.uid, app_user.gid)
        d.chmod(0o777)
    victim = tmpfs / "victim"  # the app's own file: one it may hard-link
    victim.write_text("victim")
    os.chown(victim, app_user.uid, app_user.gid)
    (tmpfs / "victim-dir").mkdir()
    (tmpfs / "victim-dir" / "keep").write_text("keep")
    return out


def plant(kind: str, path: Path, tmpfs: Path) -> tuple[str, ...]:
    return {
        "symlink-file": ("symlink", str(path), str(tmpfs / "victim")),
        "symlink-dir": ("symlink", str(path), str(tmpfs / "victim-dir")),
        "dir": ("dir", str(path)),
        "fifo": ("fifo", str(path)),
        "socket": ("socket", str(path)),
        "app-file-flocked": ("owned_flocked", str(path)),
        "hardlink": ("hardlink", str(path), str(tmpfs / "victim")),
    }[kind]


def assert_victims_untouched(tmpfs: Path, app_user: UnixUser) -> None:
    st = (tmpfs / "victim").stat()
    assert (tmpfs / "victim").read_text() == "victim" and (st.st_uid, stat.S_IMODE(st.st_mode)) == (app_user.uid, 0o644)
    assert sorted(p.name for p in (tmpfs / "victim-dir").iterdir()) == ["keep"]


@pytest.mark.hostile("filesystem")
@pytest.mark.parametrize("kind", PLANT_KINDS)
@pytest.mark.parametrize("name", PLANT_NAMES)
def test_a_plant_in_a_prepopulated_volume_is_replaced_never_followed(
    tmpfs: Path, workdir: Path, app_user: UnixUser, prepopulated: Path, name: str, kind: str
) -> None:
    """Whatever the app left there, render succeeds in bounded time and writes through nothing.

    A directory where the output file goes is the one refusal: one line, 73 (it is the app's file name).
    """
    out = prepopulated
    cfg, source = file_config(workdir, out, app_user)
    with attacking(workdir, app_user, plant(kind, out / name, tmpfs)) as attacker:
        assert attacker.outcomes() == ["ok"]
        result, took = timed_render(cfg)
    assert took < FAST
    assert_victims_untouched(tmpfs, app_user)
    if name == "token" and kind == "dir":
        assert result.returncode == 73, result.stderr
        assert "a directory is in the way" in only_error(result.stderr)
        record_cases("filesystem", rejected_codes=[73])
        return
    assert result.returncode == 0, result.stderr
    assert (out / "token").read_text() == source.read_text()
    assert is_private(out / ".secret-init" / "owner.lock") and is_private(out / ".secret-init" / "write.lock")


STATE_DIR_KINDS = ["symlink-dir", "symlink-file", "fifo", "socket"]


@pytest.mark.hostile("filesystem")
@pytest.mark.parametrize("kind", STATE_DIR_KINDS)
def test_a_plant_instead_of_the_state_dir_is_replaced(
    tmpfs: Path, workdir: Path, app_user: UnixUser, prepopulated: Path, kind: str
) -> None:
    out = prepopulated
    (out / ".secret-init").rmdir()
    cfg, _ = file_config(workdir, out, app_user)
    with attacking(workdir, app_user, plant(kind, out / ".secret-init", tmpfs)) as attacker:
        assert attacker.outcomes() == ["ok"]
        result, took = timed_render(cfg)
    assert result.returncode == 0, result.stderr
    assert took < FAST
    assert_victims_untouched(tmpfs, app_user)
    st = (out / ".secret-init").lstat()
    assert stat.S_ISDIR(st.st_mode) and (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o750)


@pytest.mark.hostile("filesystem")
@pytest.mark.parametrize("kind", PLANT_KINDS)
def test_a_plant_at_status_json_is_replaced(
    tmpfs: Path, workdir: Path, app_user: UnixUser, prepopulated: Path, kind: str
) -> None:
    """A supervised run (the app exits at once) writes status.json twice over whatever was planted there."""
    out = prepopulated
    cfg, _ = file_config(workdir, out, app_user, "[process]\nsupervise = true\n")
    with attacking(workdir, app_user, plant(kind, out / ".secret-init" / "status.json", tmpfs)) as attacker:
        assert attacker.outcomes() == ["ok"]
        started = time.monotonic()
        result = run_cli("run", "--config", str(cfg), "--", "/bin/true", timeout=60)
        took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert took < FAST
    assert_victims_untouched(tmpfs, app_user)
    status = out / ".secret-init" / "status.json"
    st = status.lstat()
    assert stat.S_ISREG(st.st_mode) and (st.st_uid, st.st_nlink, stat.S_IMODE(st.st_mode)) == (0, 1, 0o440)
    assert status_state(out) == "stopped"


@pytest.mark.hostile("filesystem")
def test_acls_the_app_left_on_the_dirs_are_dropped(
    tmpfs: Path, workdir: Path, app_user: UnixUser, prepopulated: Path
) -> None:
    """Was: a default ACL the app set on its volume gave every new 0440 file to the user it named (uid 12345)."""
    out = prepopulated
    cfg, _ = file_config(workdir, out, app_user)
    cfg.write_text(cfg.read_text().replace('env = "TOKEN_FILE"', 'env = "TOKEN_FILE"\nmode = "0440"'))
    acls = [
        ("acl_set", str(d), name)
        for d in (out, out / ".secret-init")
        for name in ("system.posix_acl_default", "system.posix_acl_access")
    ]
    assert as_app(workdir, app_user, *acls) == ["ok"] * len(acls)
    result = run_cli("render", "--config", str(cfg))
    assert result.returncode == 0, result.stderr
    for path in (out, out / ".secret-init", out / "token", out / ".secret-init" / "owner.lock"):
        assert not [x for x in os.listxattr(path, follow_symlinks=False) if x.startswith("system.posix_acl")], path
    record_cases("filesystem", len(acls))


@pytest.mark.hostile("filesystem")
@pytest.mark.parametrize("kind", ["fifo", "socket", "dir", "symlink-file"])
def test_health_never_waits_on_a_planted_status_file(
    tmpfs: Path, workdir: Path, app_user: UnixUser, prepopulated: Path, kind: str
) -> None:
    """Was: `secret-init health` (root, in the healthcheck) opened a FIFO at status.json and waited for a writer."""
    out = prepopulated
    cfg, _ = file_config(workdir, out, app_user)
    assert as_app(workdir, app_user, plant(kind, out / ".secret-init" / "status.json", tmpfs)) == ["ok"]
    started = time.monotonic()
    result = run_cli("health", "--config", str(cfg), timeout=30)
    assert time.monotonic() - started < FAST
    assert result.returncode == 1
    assert result.stdout.startswith("unhealthy: ") and result.stdout.count("\n") == 1, result.stdout
    assert_victims_untouched(tmpfs, app_user)


@pytest.mark.hostile("filesystem")
def test_health_reads_a_bounded_part_of_a_huge_planted_status_file(
    tmpfs: Path, workdir: Path, app_user: UnixUser, prepopulated: Path
) -> None:
    """A sparse 2 GiB status.json the app left in its volume: health refuses it unread, not after 2 GiB."""
    out = prepopulated
    cfg, _ = file_config(workdir, out, app_user)
    with (out / ".secret-init" / "status.json").open("wb") as planted:
        planted.truncate(2 * 1024**3)  # sparse: no tmpfs page is used
    result = run_cli("health", "--config", str(cfg), timeout=30)
    assert result.returncode == 1
    assert "is over 1048576 bytes" in result.stdout, result.stdout


@pytest.mark.hostile("filesystem")
def test_health_answers_unhealthy_for_a_deeply_nested_planted_status_file(
    tmpfs: Path, workdir: Path, app_user: UnixUser, prepopulated: Path
) -> None:
    """100,000 '[' (under the size bound): json.loads raised RecursionError, and health a traceback."""
    cfg, _ = file_config(workdir, prepopulated, app_user)
    (prepopulated / ".secret-init" / "status.json").write_text("[" * 100_000)
    result = run_cli("health", "--config", str(cfg), timeout=30)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith("unhealthy: status file unreadable: ") and result.stdout.count("\n") == 1


@pytest.mark.hostile("filesystem")
@pytest.mark.parametrize(
    "planted",
    [
        [],
        {"secrets": 5},
        {"secrets": [1]},
        {"secrets": [{"deadline": 5}]},
        {"secrets": [{"deadline": "not a time"}]},
        {"secrets": [{"name": "a\nhealthy", "deadline": "2000-01-01T00:00:00Z"}]},
    ],
)
def test_health_answers_unhealthy_for_a_status_file_of_another_shape(
    planted: Any, tmpfs: Path, workdir: Path, app_user: UnixUser, prepopulated: Path
) -> None:
    """JSON that is not what secret-init writes: AttributeError, TypeError or ValueError was a traceback."""
    cfg, _ = file_config(workdir, prepopulated, app_user)
    (prepopulated / ".secret-init" / "status.json").write_text(json.dumps(planted))
    result = run_cli("health", "--config", str(cfg), timeout=30)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith("unhealthy: status file unreadable: ") and result.stdout.count("\n") == 1


NO_CTTY_AFTER_READ = r"""
import errno, os, sys
from secret_init import status
os.setsid()  # a session leader without a terminal: opening one without O_NOCTTY makes it ours
try:
    status.read_regular(sys.argv[1])
except OSError:
    pass
try:
    os.close(os.open("/dev/tty", os.O_RDWR))
except OSError as e:
    print("no controlling terminal" if e.errno == errno.ENXIO else f"error {e.errno}")
else:
    print("acquired a controlling terminal")
"""


@pytest.mark.hostile("filesystem")
def test_reading_a_planted_terminal_does_not_make_it_the_controlling_terminal() -> None:
    """read_regular refuses a terminal after opening it; the open alone, without O_NOCTTY, took it over."""
    leader, follower = os.openpty()
    try:
        result = subprocess.run(
            [sys.executable, "-c", NO_CTTY_AFTER_READ, os.ttyname(follower)],
            cwd=REPO, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    finally:
        os.close(follower)
        os.close(leader)
    assert result.stdout == "no controlling terminal\n", result.stdout + result.stderr


@pytest.mark.hostile("app-user")
def test_the_app_tampering_with_its_own_file_gets_it_back_at_the_next_write(
    tmpfs: Path, workdir: Path, app_user: UnixUser
) -> None:
    """The app owns its file, so it may chmod and write it: the next write restores the value and 0400."""
    out = tmpfs / "out"
    cfg, source = file_config(workdir, out, app_user)
    assert run_cli("render", "--config", str(cfg)).returncode == 0
    token = str(out / "token")
    assert as_app(workdir, app_user, ("chmod", token, "666"), ("append", token)) == ["ok", "ok"]
    result = run_cli("render", "--config", str(cfg))
    assert result.returncode == 0, result.stderr
    st = (out / "token").stat()
    assert (out / "token").read_text() == source.read_text() and stat.S_IMODE(st.st_mode) == 0o400
    record_cases("app-user", 2)


@pytest.mark.hostile("filesystem")
@pytest.mark.parametrize("name", [".secret-init/owner.lock", ".secret-init/write.lock", "token"])
def test_a_device_node_left_in_the_volume_is_replaced_never_opened(
    tmpfs: Path, workdir: Path, app_user: UnixUser, prepopulated: Path, name: str
) -> None:
    """The app cannot mknod; whoever prepared the volume could. A character device there is removed unopened."""
    out = prepopulated
    cfg, source = file_config(workdir, out, app_user)
    os.mknod(out / name, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null's numbers: harmless were it opened
    result, took = timed_render(cfg)
    assert result.returncode == 0, result.stderr
    assert took < FAST
    assert (out / "token").read_text() == source.read_text()
    assert is_private(out / ".secret-init" / "owner.lock") and is_private(out / ".secret-init" / "write.lock")
