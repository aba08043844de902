"""The supervisor: the ONLY code that starts, signals or waits for processes.

It starts the app with dropped privileges in its own process group, forwards signals to
that group, reaps every child (orphaned grandchildren included: it is PID 1 or a child
subreaper), and stops what is left of the group when the app is gone. Signal handlers only
enqueue (and note a stop request, so that a restart in progress gives way at once); the
caller's loop decides what to do. A sidecar's app, in another container, is signalled
here too.
"""

import contextlib
import os
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Mapping
from queue import SimpleQueue
from types import FrameType
from typing import Any, NamedTuple

import psutil
import structlog

from secret_init import privileges
from secret_init.errors import ExitCode, PermissionRefusedError, SecretInitError
from secret_init.execute import resolve_command
from secret_init.privileges import AppUser

log = structlog.get_logger()

FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)
PR_SET_CHILD_SUBREAPER = 36
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_POLL = 0.02


SignalHandler = Callable[[int, FrameType | None], Any] | int | None


class SignalEvent(NamedTuple):
    signum: int


def exit_code(status: int) -> int:
    """A wait status as a shell would report it: the exit code, or 128+N for signal N."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


class Supervisor:
    def __init__(self, events: "SimpleQueue[object]", clock: Callable[[], float] = time.monotonic) -> None:
        self.events = events
        self.clock = clock
        self.pid: int | None = None  # the app; also its process group id
        self.exit_status: int | None = None  # wait status of the app once reaped
        self.stop_requested: int | None = None  # SIGTERM or SIGINT, once one arrived
        self._stop_forwarded = False
        self._tty: int | None = None  # stdin, when its foreground group was ours at install()
        self._ttou: SignalHandler = signal.SIG_DFL  # SIGTTOU's disposition while the app has the terminal
        self._terminal_given = False

    def install(self) -> None:
        """Handle every forwarded signal and SIGCHLD; become the reaper of orphaned descendants."""
        privileges.prctl(PR_SET_CHILD_SUBREAPER, 1, "PR_SET_CHILD_SUBREAPER")
        for signum in (*FORWARDED, signal.SIGCHLD):
            signal.signal(signum, self._enqueue)
        if _foreground_is_ours(0):
            self._tty = 0

    def uninstall(self) -> None:
        """The loop has ended: ignore what would have been forwarded.

        Python resets its handlers to SIG_DFL at interpreter exit, so a late SIGHUP, say,
        would kill us and the app's exit status would be lost; SIG_IGN it keeps.
        """
        for signum in FORWARDED:
            signal.signal(signum, signal.SIG_IGN)

    def _enqueue(self, signum: int, _frame: object) -> None:
        if signum in STOP_SIGNALS:
            self.stop_requested = signum
        self.events.put(SignalEvent(signum))  # SimpleQueue.put is safe in a signal handler

    # -- starting ---------------------------------------------------------------------

    def start(self, argv: list[str], env: Mapping[str, str], user: AppUser | None) -> int:
        """Start the app as `user` (None: as ourselves) in a new process group."""
        path = resolve_command(argv[0], env.get("PATH", os.defpath))
        try:
            with privileges.app_core_limit():
                proc = subprocess.Popen(
                    [path, *argv[1:]],
                    env=dict(env),
                    close_fds=True,
                    process_group=0,
                    user=user.uid if user else None,
                    group=user.gid if user else None,
                    extra_groups=list(user.groups) if user else None,
                )
        except FileNotFoundError:
            raise SecretInitError(f"command {argv[0]!r} not found", ExitCode.NOT_FOUND) from None
        except PermissionError as e:
            raise SecretInitError(f"command {argv[0]!r}: {e.strerror}", ExitCode.NOT_EXECUTABLE) from None
        # This module owns all waiting: Popen must never reap behind our back.
        proc.returncode = 0
        self.pid, self.exit_status = proc.pid, None
        if user is not None:
            self._verify_credentials(proc.pid, user)
        self._give_terminal(proc.pid)
        log.info("app started", pid=proc.pid, argv0=argv[0], uid=user.uid if user else os.geteuid())
        return int(proc.pid)

    def _verify_credentials(self, pid: int, user: AppUser) -> None:
        status = privileges.proc_status(pid)
        try:
            uids, gids = status["Uid"].split(), status["Gid"].split()
            groups = {int(g) for g in status["Groups"].split()}
        except (KeyError, ValueError):
            return  # the app already exited; nothing left to verify
        if {int(u) for u in uids} != {user.uid} or {int(g) for g in gids} != {user.gid} or groups != set(user.groups):
            self.kill_group(signal.SIGKILL)
            raise PermissionRefusedError(f"app pid {pid} does not run as uid {user.uid} gid {user.gid}; killed it")

    # -- the terminal -------------------------------------------------------------------------

    def _give_terminal(self, pgid: int) -> None:
        """Make the app's group the terminal's foreground group, so that it may read stdin.

        The app runs in its own group: in the background it would be stopped by SIGTTIN. We
        are in the background from here on: SIGTTOU stays ignored, so that tcsetpgrp works
        and our own log lines never stop us (a terminal with `tostop`) until _take_terminal.
        """
        if self._tty is None:
            return
        self._ttou = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        self._terminal_given = True
        try:
            os.tcsetpgrp(self._tty, pgid)
        except OSError as e:
            log.warning("could not give the terminal to the app", pid=pgid, error=e.strerror)
            return
        if privileges.proc_status(pgid).get("State", "").startswith("T"):
            self.kill_group(signal.SIGCONT)  # it read stdin before it was in the foreground

    def _take_terminal(self) -> None:
        """The app is gone: the foreground is ours again, and SIGTTOU as it was (a new app inherits it)."""
        if self._tty is None or not self._terminal_given:
            return
        with contextlib.suppress(OSError):
            os.tcsetpgrp(self._tty, os.getpgrp())
        signal.signal(signal.SIGTTOU, self._ttou)
        self._terminal_given = False

    # -- signals and waiting ----------------------------------------------------------------

    def stop_declined(self) -> None:
        """The app outlived a forwarded stop by stop_timeout: it declined it; later restarts go ahead."""
        self.stop_requested = None
        self._stop_forwarded = False

    def forward(self, signum: int) -> None:
        if signum in STOP_SIGNALS:
            self.stop_requested = signum
        self._stop_forwarded = self._stop_forwarded or signum in STOP_SIGNALS
        log.info("signal forwarded", signal=signal.Signals(signum).name, pid=self.pid)
        self.kill_group(signum)

    def signal_app(self, signum: int) -> None:
        """Signal the app process alone (a reload), not its children."""
        if self.pid is not None and self.exit_status is None:
            log.info("app signalled", signal=signal.Signals(signum).name, pid=self.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def kill_group(self, signum: int) -> bool:
        """Signal the app's process group; False when nothing is left in it."""
        if self.pid is None:
            return False
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            return False
        return True

    def reap(self) -> bool:
        """Reap every exited child; True when the app itself was among them."""
        app_exited = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return app_exited
            if pid == 0:
                return app_exited
            if pid == self.pid:
                self.exit_status = status
                app_exited = True
                self._take_terminal()
                log.info("app exited", pid=pid, exit_code=exit_code(status))
            else:
                log.debug("reaped", pid=pid, exit_code=exit_code(status))

    def stop_app(self, signum: int, timeout: float) -> int:
        """Stop the app (signal, wait up to timeout, SIGKILL) and return its wait status."""
        self.kill_group(signum)
        if not self._wait_app(timeout):
            log.warning("app did not stop in time, killing it", pid=self.pid, stop_timeout=timeout)
            self.kill_group(signal.SIGKILL)
            self._wait_app(None)
        assert self.exit_status is not None
        return self.exit_status

    def restart(
        self, argv: list[str], env: Mapping[str, str], user: AppUser | None, signum: int, timeout: float
    ) -> bool:
        """Stop the app and what is left of it, then start it again; False when a stop came meanwhile.

        A SIGTERM or SIGINT that arrives during the restart is forwarded at once, and no new
        app is started: the caller's loop then stops.
        """
        old_pid = self.pid
        self.stop_app(signum, timeout)
        self.stop_leftovers(timeout)
        if self.stop_requested is not None:
            log.info("restart abandoned: a stop was requested", old_pid=old_pid)
            return False
        new_pid = self.start(argv, env, user)
        log.info("app restarted", old_pid=old_pid, new_pid=new_pid)
        return True

    def notify(self, pidfile: str, signum: int, app_uid: int | None) -> None:
        """Signal an app in another container that shares our PID namespace, by its pidfile.

        The pidfile is the app's to write, so its content is untrusted: a pid that fails any
        check (see `pidfile_target`) is logged and skipped, never signalled.
        """
        try:
            pid = read_pidfile(pidfile)
            pidfd = os.pidfd_open(pid)  # from here on, a reused pid cannot be signalled by mistake
        except (OSError, ValueError) as e:
            log.warning("could not notify the app", pidfile=pidfile, error=_reason(e))
            return
        try:
            refused = pidfile_target_refused(pid, app_uid)
            if refused is not None:
                log.warning("could not notify the app", pidfile=pidfile, pid=pid, error=refused)
                return
            signal.pidfd_send_signal(pidfd, signum)
            log.info("app notified", pid=pid, signal=signal.Signals(signum).name)
        except OSError as e:
            log.warning("could not notify the app", pidfile=pidfile, pid=pid, error=_reason(e))
        finally:
            os.close(pidfd)

    def _pause(self) -> None:
        """One poll interval; a stop request arriving meanwhile is forwarded to the app's group."""
        time.sleep(_POLL)
        if self.stop_requested is not None and not self._stop_forwarded:
            self.forward(self.stop_requested)

    def _wait_app(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else self.clock() + timeout
        while self.exit_status is None:
            if not self.reap() and self.exit_status is None:
                if deadline is not None and self.clock() >= deadline:
                    return False
                self._pause()
        return True

    def stop_leftovers(self, timeout: float) -> None:
        """After the app exited: SIGTERM what is left of it, wait up to timeout, then SIGKILL.

        "What is left" is the app's process group and every other descendant: a daemon that
        left the group with setsid is still re-parented to us, the subreaper.
        """
        if not self._signal_leftovers(signal.SIGTERM):
            self.reap()
            return
        deadline = self.clock() + timeout
        while self.clock() < deadline:
            self.reap()
            if not _descendants():
                return
            self._pause()
        log.warning("processes left behind by the app after stop_timeout, killing them", pgid=self.pid)
        self._signal_leftovers(signal.SIGKILL)
        while _descendants():
            self.reap()
            self._pause()
        self.reap()

    def _signal_leftovers(self, signum: int) -> bool:
        found = self.kill_group(signum)
        for pid in _descendants():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
                found = True
        return found


def _foreground_is_ours(fd: int) -> bool:
    """`fd` is a terminal whose foreground process group is ours (`docker run -it`, a shell's job)."""
    try:
        return os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False


PIDFILE_MAX = 32  # bytes: a pid is at most 7 digits, plus whitespace


def read_pidfile(path: str) -> int:
    """The pid in `path`: a regular file, opened without blocking or following a link, digits only."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        raw = os.read(fd, PIDFILE_MAX + 1)
    finally:
        os.close(fd)
    text = raw.strip()
    if len(raw) > PIDFILE_MAX or not text or len(text) > 7 or not text.isdigit() or not text.isascii():
        raise ValueError("not a pid (digits only, at most 7)")
    pid = int(text)
    if pid <= 0:
        raise ValueError("not a positive pid")
    return pid


def pidfile_target_refused(pid: int, app_uid: int | None) -> str | None:
    """Why `pid` must not be signalled, or None when it may be.

    pid 1 is allowed only when the config names the app user and pid 1 runs as it: with
    `pid: service:app` the app is pid 1 of the shared namespace. Otherwise pid 1 is an init
    or a pod's pause process, and a SIGHUP may end the whole container or pod.
    """
    if pid == os.getpid():
        return "the pid is secret-init's own"
    if pid in _ancestors():
        return "the pid is an ancestor of secret-init"
    if not _same_pid_namespace(pid):
        return "the process is in another PID namespace"
    try:
        status = privileges.proc_status(pid)
        state, uids = status["State"].split()[0], {int(u) for u in status["Uid"].split()}
    except (KeyError, ValueError, IndexError):
        return "the process is gone"
    if state in ("Z", "X"):
        return "the process has exited"
    if app_uid is not None and uids != {app_uid}:
        return f"the process does not run as the app user (uid {app_uid})"
    if pid == 1 and app_uid is None:
        return "pid 1 is signalled only when [output] user names the app user it runs as"
    return None


def _ancestors() -> set[int]:
    return {p.pid for p in psutil.Process().parents()}


def _same_pid_namespace(pid: int) -> bool:
    """/proc/PID/ns/pid against ours; without the right to read it, the depth of NSpid.

    Every process in /proc is in our namespace or one nested in it; a nested one lists
    more pids in NSpid. Reading ns/pid needs ptrace rights that a container's root may lack.
    """
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") == os.readlink("/proc/self/ns/pid")
    except PermissionError:
        pass
    except OSError:
        return False
    ours, theirs = privileges.proc_status("self").get("NSpid"), privileges.proc_status(pid).get("NSpid")
    return ours is not None and theirs is not None and len(ours.split()) == len(theirs.split())


def _reason(e: Exception) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


def _descendants() -> list[int]:
    """Living (not zombie) descendants of this process: all of the app's group, since we reap its orphans."""
    alive = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child.pid)
    return alive
