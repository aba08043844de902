"""Which filesystem a path is on: statfs(2) decides, /proc/self/mountinfo names the mount.

statfs is asked about the path itself, so an overmount or a per-file mount (each Swarm
secret is its own tmpfs) is judged right; mountinfo only supplies a name for messages.
"""

import os
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ctypes

TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
MEMORY_FILESYSTEMS = frozenset({TMPFS_MAGIC, RAMFS_MAGIC})


class FsInfo:
    """The filesystem of one path. Its mount is looked up only when a message names it:
    every start checks the output dir and each source file, and nearly all are tmpfs."""

    __slots__ = ("_mount", "_probe", "magic", "path")

    def __init__(self, path: str, magic: int, probe: str) -> None:
        self.path = path
        self.magic = magic
        self._probe = probe  # the nearest existing ancestor that statfs was asked about
        self._mount: tuple[str, str] | None = None

    @property
    def in_memory(self) -> bool:
        return self.magic in MEMORY_FILESYSTEMS

    @property
    def fstype(self) -> str:
        """From mountinfo, e.g. "tmpfs", "ext4", "overlay"."""
        return self._mount_entry()[0]

    @property
    def mountpoint(self) -> str:
        return self._mount_entry()[1]

    def describe(self) -> str:
        return f"{self.fstype} mounted at {self.mountpoint}"

    def _mount_entry(self) -> tuple[str, str]:
        if self._mount is None:
            self._mount = _mount_of(os.path.realpath(self._probe))
        return self._mount

    def __repr__(self) -> str:
        return f"FsInfo(path={self.path!r}, magic={self.magic:#x})"


def inspect(path: str) -> FsInfo:
    """The filesystem of `path`, or of its nearest existing ancestor when it does not exist."""
    probe = nearest_existing(path)
    return FsInfo(path, _statfs_magic(probe), probe)


def nearest_existing(path: str) -> str:
    probe = os.path.abspath(path)
    while not os.path.lexists(probe) and probe != "/":
        probe = os.path.dirname(probe)
    return probe


def _statfs_magic(path: str) -> int:
    import ctypes

    # struct statfs starts with f_type, a native word on every Linux ABI.
    buf = ctypes.create_string_buffer(512)
    if libc().statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF


@cache
def libc() -> "ctypes.CDLL":
    """The C library, loaded once (statfs here, prctl in privileges)."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _mount_of(real_path: str) -> tuple[str, str]:
    """(fstype, mountpoint) of the last-mounted, longest mountpoint containing the path."""
    best = ("unknown", "/")
    best_len = -1
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return best
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or not rfields:
            continue
        mountpoint = _unescape(fields[4])
        inside = real_path == mountpoint or real_path.startswith(mountpoint.rstrip("/") + "/")
        if inside and len(mountpoint) >= best_len:
            best, best_len = (rfields[0], mountpoint), len(mountpoint)
    return best


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field
