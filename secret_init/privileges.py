"""Privileges: the ONLY code that changes this process's uid, gid or groups.

The drop follows gosu's order (setgroups, setgid, setuid), then proves itself: every
real, effective and saved id is the app's, no capability is left, and setuid(0)
fails. Then no_new_privs closes setuid binaries and file capabilities for good.
"""

import os
import pwd
import re
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

from secret_init.errors import PermissionRefusedError, SecretInitError, UnknownUserError
from secret_init.fsinfo import libc

PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
_saved_core_limit: tuple[int, int] | None = None


class AppUser(NamedTuple):
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups after the drop
    name: str | None  # None for a bare uid:gid with no passwd entry
    home: str

    def environment(self) -> dict[str, str | None]:
        """HOME, USER and LOGNAME as a login would set them; None unsets (a uid with no name)."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}


def resolve(spec: str | None) -> AppUser:
    """A user from its name (passwd, with groups from getgrouplist), `uid:gid`, or None for ourselves."""
    if spec is None:
        uid, gid = os.geteuid(), os.getegid()
        entry = _passwd_by_uid(uid)
        return AppUser(
            uid, gid, tuple(os.getgroups()), entry.pw_name if entry else None, entry.pw_dir if entry else "/"
        )
    numeric = re.fullmatch(r"(\d+):(\d+)", spec)
    if numeric:
        uid, gid = int(numeric.group(1)), int(numeric.group(2))
        entry = _passwd_by_uid(uid)
        return AppUser(uid, gid, (), entry.pw_name if entry else None, entry.pw_dir if entry else "/")
    try:
        entry = pwd.getpwnam(spec)
    except KeyError:
        raise UnknownUserError(f"user {spec!r} does not exist in the passwd database") from None
    groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid))))
    return AppUser(entry.pw_uid, entry.pw_gid, groups, entry.pw_name, entry.pw_dir or "/")


def _passwd_by_uid(uid: int) -> "pwd.struct_passwd | None":
    try:
        return pwd.getpwuid(uid)
    except KeyError:
        return None


def is_root() -> bool:
    return os.geteuid() == 0


def drop(user: AppUser) -> None:
    """Become `user` for good; without root only no_new_privs is set."""
    import structlog  # imported by the caller long before: no import after the drop

    # Before the drop: ctypes may not be importable once we are the app (the
    # interpreter's own files can be out of its reach).
    set_no_new_privs()
    if is_root():
        try:
            os.setgroups(list(user.groups))
            os.setresgid(user.gid, user.gid, user.gid)
            os.setresuid(user.uid, user.uid, user.uid)
        except OSError as e:
            raise PermissionRefusedError(f"cannot switch to uid {user.uid} gid {user.gid}: {e.strerror}") from None
        verify_dropped(user)
        structlog.get_logger().info("privileges dropped", uid=user.uid, gid=user.gid, groups=list(user.groups))


def verify_dropped(user: AppUser) -> None:
    """Raise unless every id is the app's and, for a non-root app, root cannot come back."""
    problems = []
    if os.getresuid() != (user.uid,) * 3:
        problems.append(f"uids are {os.getresuid()}")
    if os.getresgid() != (user.gid,) * 3:
        problems.append(f"gids are {os.getresgid()}")
    if set(os.getgroups()) != set(user.groups):
        problems.append(f"groups are {sorted(os.getgroups())}")
    status = proc_status("self")
    if status.get("NoNewPrivs") != "1":
        problems.append("no_new_privs is not set")
    if user.uid != 0:
        if _can_become_root():
            problems.append("setuid(0) succeeded")
        caps = [key for key in ("CapPrm", "CapEff", "CapAmb") if int(status.get(key, "1"), 16) != 0]
        if caps:
            problems.append(f"capabilities remain ({', '.join(caps)})")
    if problems:
        raise PermissionRefusedError(f"privilege drop to uid {user.uid} failed verification: {'; '.join(problems)}")


def _can_become_root() -> bool:
    try:
        os.setuid(0)
    except PermissionError:
        return False
    return True


def proc_status(pid: int | str) -> dict[str, str]:
    """/proc/PID/status as a dict; empty when unreadable (the process is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:  # binary: no codec import after the drop
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return {}
    fields = (line.partition(":") for line in text.splitlines())
    return {key: value.strip() for key, _, value in fields}


def protect_process() -> None:
    """Before any secret is read: no core dump, no ptrace or /proc/PID/mem by the same uid.

    Both last only until the exec: the kernel resets dumpability on execve, and the core
    limit is given back to the app by restore_core_limit.
    """
    global _saved_core_limit
    prctl(PR_SET_DUMPABLE, 0, "PR_SET_DUMPABLE")
    _saved_core_limit = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, _saved_core_limit[1]))


def restore_core_limit() -> None:
    """The app's own core-file limit, for the exec path: nothing of ours runs after it."""
    if _saved_core_limit is not None:
        resource.setrlimit(resource.RLIMIT_CORE, _saved_core_limit)


@contextmanager
def app_core_limit() -> Iterator[None]:
    """The app's core-file limit while a supervised app is forked; 0 again afterwards.

    The limit is per process, so other threads see it for that moment too: harmless,
    since this process is not dumpable (protect_process) and so never writes a core.
    """
    restore_core_limit()
    try:
        yield
    finally:
        if _saved_core_limit is not None:
            resource.setrlimit(resource.RLIMIT_CORE, (0, _saved_core_limit[1]))


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")


def prctl(option: int, value: int, name: str) -> None:
    import ctypes

    if libc().prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise SecretInitError(f"prctl({name}) failed: {os.strerror(err)}")
