"""The sink: the ONLY code that writes files. It checks for tmpfs and writes atomically.

Every file is made as a temp file in output.dir (O_CREAT|O_EXCL|O_NOFOLLOW), given its
owner and mode on the descriptor before a byte is written, then renamed over the old
one. A whole set is staged before any rename, so a failure leaves the old files and no
temp file. All paths are resolved relative to one directory descriptor: a swapped
directory or a planted symlink is never followed.

The app can open the output dir and anything in it its group may read, so it can hold
any lock on them. secret-init's own locks are files in `.secret-init/` that only root
can open (0600, made with O_EXCL once the dir is root's); anything else found under
those names was planted, and is removed first. No open here can block on what the app
planted (O_NONBLOCK, and a type check before any read), and no lock is waited on
without bound.
"""

import errno
import fcntl
import os
import shutil
import stat
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from hmac import compare_digest
from typing import NamedTuple

import structlog

from secret_init import fsinfo
from secret_init.errors import ExitCode, PermissionRefusedError, SecretInitError, WriteError
from secret_init.model import Hidden
from secret_init.status import STATUS_DIR

log = structlog.get_logger()

TEMP_PREFIX = ".si-tmp-"
OWNER_LOCK = "owner.lock"
WRITE_LOCK = "write.lock"  # held while one secret-init writes; the app cannot open it
LOCK_WAIT = 10.0  # seconds: another secret-init writes in milliseconds
LOCK_POLL = 0.01
DIR_MODE = 0o750
PRIVATE_MODE = 0o600
# A volume the app prepared may carry ACLs: a default one would hand every new file to users it names.
ACL_XATTRS = ("system.posix_acl_default", "system.posix_acl_access")


class Owner(NamedTuple):
    uid: int
    gid: int


class OutputFile(NamedTuple):
    name: str
    data: Hidden
    mode: int
    owner: Owner


class WriteResult(NamedTuple):
    name: str
    path: str
    changed: bool


class Sink:
    """Writes into one output directory.

    `dir_group` is the app's group: as root the directory becomes root:dir_group 0750, so
    the app can read its files but not create, replace or delete them.
    """

    def __init__(self, directory: str, dir_group: int, allow_non_tmpfs: bool, lock_wait: float = LOCK_WAIT) -> None:
        self.dir = directory.rstrip("/") or "/"
        self.dir_group = dir_group
        self.allow_non_tmpfs = allow_non_tmpfs
        self.lock_wait = lock_wait

    # -- the directory --------------------------------------------------------------

    def check_filesystem(self) -> fsinfo.FsInfo:
        try:
            fs = fsinfo.inspect(self.dir)
        except OSError as e:
            raise WriteError(f"output dir {self.dir}: cannot inspect its filesystem: {e.strerror}") from None
        if not fs.in_memory:
            if not self.allow_non_tmpfs:
                raise PermissionRefusedError(
                    f"output dir {self.dir} is on {fs.describe()}, not tmpfs or ramfs; "
                    "mount a tmpfs there or set [output] allow_non_tmpfs = true"
                )
            log.warning("output dir is not on tmpfs; secrets may reach a disk", dir=self.dir, filesystem=fs.describe())
        return fs

    def prepare(self) -> None:
        """Create or fix the directory, then remove temp files a crashed run left."""
        try:
            os.mkdir(self.dir, 0o700)
            log.info("output dir created", dir=self.dir)
        except FileExistsError:
            pass
        except OSError as e:
            raise WriteError(f"output dir {self.dir} cannot be created: {e.strerror}") from None
        with self._locked_dir() as dirs:
            try:
                for dfd in dirs:
                    for entry in os.scandir(dfd):
                        if entry.name.startswith(TEMP_PREFIX):
                            _unlink_quietly(entry.name, dfd)
            except OSError as e:
                raise WriteError(f"output dir {self.dir}: {e.strerror or e}") from None

    def _fix_dir(self, dfd: int) -> None:
        st = os.fstat(dfd)
        try:
            if os.geteuid() == 0:
                os.fchown(dfd, 0, self.dir_group)
                os.fchmod(dfd, DIR_MODE)
                _drop_acls(dfd)
            elif st.st_uid == os.geteuid():
                os.fchmod(dfd, 0o700)
            elif st.st_mode & 0o002:
                log.warning("output dir is writable by others and not ours to fix", dir=self.dir)
        except PermissionError as e:
            raise PermissionRefusedError(f"output dir {self.dir}: cannot set owner or mode: {e.strerror}") from None
        except OSError as e:
            raise WriteError(f"output dir {self.dir}: cannot set owner, mode or ACL: {e.strerror}") from None

    @contextmanager
    def _locked_dir(self) -> Iterator["Dirs"]:
        """The output dir and `.secret-init`, both fixed, locked against another secret-init writing.

        The lock is `.secret-init/write.lock`, never the dir itself: the app can open the dir.
        """
        with self._open_dir() as dfd:
            self._fix_dir(dfd)
            sfd = self._status_dir(dfd)
            try:
                lock = self._private_file(WRITE_LOCK, sfd)
                try:
                    self._wait_for_lock(lock)
                    yield Dirs(dfd, sfd)
                finally:
                    os.close(lock)  # releases the lock
            finally:
                os.close(sfd)

    def _wait_for_lock(self, fd: int) -> None:
        """flock `fd`, waiting at most lock_wait: only another secret-init can hold it, briefly."""
        deadline = time.monotonic() + self.lock_wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise SecretInitError(
                        f"output dir {self.dir}: another secret-init has held {STATUS_DIR}/{WRITE_LOCK} "
                        f"for {self.lock_wait:g} s",
                        ExitCode.TEMPFAIL,
                    ) from None
                time.sleep(LOCK_POLL)

    def _private_file(self, name: str, dfd: int) -> int:
        """Open NAME in `dfd` read-write: a regular file of ours, 0600, one link; a planted one is removed first.

        Called only once `dfd` is ours, so nobody else can plant it again meanwhile.
        """
        path = f"{self.dir}/{STATUS_DIR}/{name}"
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            found = _lstat(name, dfd)
            if found is not None and not _is_private(found):
                log.warning("removing a file planted in secret-init's state dir", path=path, kind=_kind(found))
                _remove_planted(name, dfd, path)
                found = None
            fd = os.open(name, flags | (os.O_CREAT | os.O_EXCL if found is None else 0), PRIVATE_MODE, dir_fd=dfd)
        except OSError as e:
            raise WriteError(f"{path}: {e.strerror or e}") from None
        st = os.fstat(fd)
        if not _is_private(st) or (found is not None and not _same_file(st, found)):
            os.close(fd)
            raise WriteError(f"{path}: changed while being opened")
        return fd

    @contextmanager
    def _open_dir(self) -> Iterator[int]:
        try:
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise PermissionRefusedError(f"output dir {self.dir} is a symlink or not a directory") from None
            raise WriteError(f"output dir {self.dir} cannot be opened: {e.strerror}") from None
        try:
            yield dfd
        finally:
            os.close(dfd)

    # -- the files ------------------------------------------------------------------

    def write(self, files: Sequence[OutputFile]) -> list[WriteResult]:
        """Write every changed file. A failure while staging leaves every old file in place.

        Renames within one directory fail only in odd cases (a mount on a destination);
        then the files renamed before it are already new.
        """
        with self._locked_dir() as dirs:
            changed = self._write_set(files, dirs.out)
        results = []
        for f in files:
            path = f"{self.dir}/{f.name}"
            event = "file written" if f.name in changed else "file unchanged"
            log.info(event, path=path, mode=f"{f.mode:04o}", uid=f.owner.uid, gid=f.owner.gid)
            results.append(WriteResult(f.name, path, f.name in changed))
        return results

    def claim(self) -> int:
        """Become the one owner of this directory's leases, or refuse (exit 75).

        An flock on `.secret-init/owner.lock`, held until this process exits (or execs:
        the descriptor is close-on-exec). It works across containers sharing the volume.
        """
        with self._locked_dir() as dirs:
            fd = self._private_file(OWNER_LOCK, dirs.state)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SecretInitError(
                f"output dir {self.dir} is already managed by another secret-init (pid {holder} in its namespace); "
                "one output dir has one lease owner",
                ExitCode.TEMPFAIL,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _status_dir(self, dfd: int) -> int:
        """Open (creating it if needed) `.secret-init`, 0750 with the app's group; anything else there is removed."""
        path = f"{self.dir}/{STATUS_DIR}"
        try:
            found = _lstat(STATUS_DIR, dfd)
            if found is not None and not stat.S_ISDIR(found.st_mode):
                log.warning("removing a file planted as secret-init's state dir", path=path, kind=_kind(found))
                os.unlink(STATUS_DIR, dir_fd=dfd)
                found = None
            if found is None:
                os.mkdir(STATUS_DIR, 0o700, dir_fd=dfd)
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            sfd = os.open(STATUS_DIR, flags, dir_fd=dfd)
        except OSError as e:
            raise WriteError(f"{path}: {e.strerror or e}") from None
        try:
            # Owner first, then mode: a mode the app set stops mattering once the dir is root's.
            if os.geteuid() == 0:
                os.fchown(sfd, 0, self.dir_group)
                _drop_acls(sfd)
            os.fchmod(sfd, DIR_MODE)
        except OSError as e:
            os.close(sfd)
            raise WriteError(f"{path}: {e.strerror}") from None
        return sfd

    def write_status(self, name: str, data: bytes, owner: Owner) -> None:
        """Write `.secret-init/NAME` (0440, readable by the app's group) the same atomic way."""
        with self._locked_dir() as dirs:
            found = _lstat(name, dirs.state)
            if found is not None and stat.S_ISDIR(found.st_mode):  # our own dir: a directory there was planted
                log.warning("removing a directory planted as a status file", name=name)
                _remove_planted(name, dirs.state, f"{self.dir}/{STATUS_DIR}/{name}")
            self._write_set([OutputFile(name, Hidden(data), 0o440, owner)], dirs.state)

    def _write_set(self, files: Sequence[OutputFile], dfd: int) -> set[str]:
        """Stage every changed file in the directory `dfd`, then rename them all; the changed names."""
        staged: list[tuple[OutputFile, str]] = []
        try:
            for f in files:
                if not _is_current(f, dfd):
                    staged.append((f, self._stage(f, dfd)))
            for f, temp in staged:
                os.replace(temp, f.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException as e:
            for _, temp in staged:
                _unlink_quietly(temp, dfd)
            if isinstance(e, OSError):
                raise WriteError(f"output dir {self.dir}: {e.strerror or e}") from None
            raise
        finally:
            _fsync_quietly(dfd)
        return {f.name for f, _ in staged}

    def _stage(self, f: OutputFile, dfd: int) -> str:
        temp = f"{TEMP_PREFIX}{os.urandom(8).hex()}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(temp, flags, 0o600, dir_fd=dfd)
        except OSError as e:
            raise self._error(f, "cannot create a temp file", e) from None
        try:
            # Owner and mode are final before the first byte lands. Mode first, while the
            # file is still ours: then no CAP_FOWNER is needed, only CAP_CHOWN.
            os.fchmod(fd, f.mode)
            os.fchown(fd, f.owner.uid, f.owner.gid)
            _write_all(fd, f.data.reveal())
            os.fsync(fd)
        except BaseException as e:  # a stop signal mid-write too: no temp file stays behind
            os.close(fd)
            _unlink_quietly(temp, dfd)
            if isinstance(e, OSError):
                raise self._error(f, "cannot be written", e) from None
            raise
        os.close(fd)
        return temp

    def _error(self, f: OutputFile, what: str, e: OSError) -> SecretInitError:
        path = f"{self.dir}/{f.name}"
        if e.errno in (errno.EPERM, errno.EACCES):
            return PermissionRefusedError(
                f"{path}: {what}: {e.strerror} (owner {f.owner.uid}:{f.owner.gid}, running as uid {os.geteuid()})"
            )
        return WriteError(f"{path}: {what}: {e.strerror}")


class Dirs(NamedTuple):
    """Descriptors of the output dir and of its `.secret-init`."""

    out: int
    state: int


def _is_current(f: OutputFile, dfd: int) -> bool:
    """True when the destination is a regular file with these bytes, owner and mode.

    Only a regular file is opened, and without blocking: an app's lease makes it "not current".
    """
    want = f.data.reveal()
    found = _lstat(f.name, dfd)
    if found is None:
        return False
    if stat.S_ISDIR(found.st_mode):
        raise WriteError(f"{f.name}: a directory is in the way of the file")
    if stat.S_ISLNK(found.st_mode):
        log.warning("replacing a symlink at the destination without following it", name=f.name)
    if not stat.S_ISREG(found.st_mode) or found.st_size != len(want):
        return False
    if (found.st_uid, found.st_gid, stat.S_IMODE(found.st_mode)) != (f.owner.uid, f.owner.gid, f.mode):
        return False
    try:
        fd = os.open(f.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return False  # e.g. EWOULDBLOCK: the app holds a lease on it; a new file replaces it
    try:
        return _same_file(os.fstat(fd), found) and compare_digest(os.read(fd, len(want) + 1), want)
    finally:
        os.close(fd)


def _lstat(name: str, dfd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise WriteError(f"{name}: {e.strerror}") from None


def _is_private(st: os.stat_result) -> bool:
    """A file only this uid can open, linked nowhere else: nobody else can hold it open or locked."""
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_uid == os.geteuid()
        and st.st_nlink == 1
        and stat.S_IMODE(st.st_mode) == PRIVATE_MODE
    )


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _kind(st: os.stat_result) -> str:
    kinds = {stat.S_IFLNK: "symlink", stat.S_IFDIR: "directory", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}
    if stat.S_IFMT(st.st_mode) in kinds:
        return kinds[stat.S_IFMT(st.st_mode)]
    if not stat.S_ISREG(st.st_mode):
        return "device"
    return f"file uid {st.st_uid} mode {stat.S_IMODE(st.st_mode):04o} links {st.st_nlink}"


def _remove_planted(name: str, dfd: int, path: str) -> None:
    """Remove what is at NAME without following it; a directory with everything in it."""
    found = _lstat(name, dfd)
    if found is None:
        return
    try:
        if stat.S_ISDIR(found.st_mode):
            shutil.rmtree(name, dir_fd=dfd)
        else:
            os.unlink(name, dir_fd=dfd)
    except OSError as e:
        raise WriteError(f"{path}: a planted {_kind(found)} cannot be removed: {e.strerror or e}") from None


def _drop_acls(fd: int) -> None:
    for name in ACL_XATTRS:
        try:
            os.removexattr(fd, name)
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _unlink_quietly(name: str, dfd: int) -> None:
    with suppress(OSError):
        os.unlink(name, dir_fd=dfd)


def _fsync_quietly(fd: int) -> None:
    with suppress(OSError):
        os.fsync(fd)
