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
import subprocess
import time
from collections.abc import Callable, Mapping
from queue import SimpleQueue
from typing import NamedTuple

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

    def install(self) -> None:
        """Handle every forwarded signal and SIGCHLD; become the reaper of orphaned descendants."""
        privileges.prctl(PR_SET_CHILD_SUBREAPER, 1, "PR_SET_CHILD_SUBREAPER")
        for signum in (*FORWARDED, signal.SIGCHLD):
            signal.signal(signum, self._enqueue)

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

    # -- signals and waiting ----------------------------------------------------------------

    def forward(self, signum: int) -> None:
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

    def notify(self, pidfile: str, signum: int) -> None:
        """Signal an app in another container that shares our PID namespace, by its pidfile."""
        try:
            with open(pidfile, "rb") as f:
                pid = int(f.read(32).strip())
            os.kill(pid, signum)
            log.info("app notified", pid=pid, signal=signal.Signals(signum).name)
        except (OSError, ValueError) as e:
            log.warning("could not notify the app", pidfile=pidfile, error=str(e))

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


def _descendants() -> list[int]:
    """Living (not zombie) descendants of this process: all of the app's group, since we reap its orphans."""
    alive = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child.pid)
    return alive
