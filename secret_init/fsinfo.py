"""Which filesystem a path is on: statfs(2) decides, /proc/self/mountinfo names the mount.

statfs is asked about the path itself, so an overmount or a per-file mount (each Swarm
secret is its own tmpfs) is judged right; mountinfo only supplies a name for messages.
"""

import os
from dataclasses import dataclass

TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
MEMORY_FILESYSTEMS = frozenset({TMPFS_MAGIC, RAMFS_MAGIC})


@dataclass(frozen=True)
class FsInfo:
    path: str
    magic: int
    fstype: str  # from mountinfo, e.g. "tmpfs", "ext4", "overlay"
    mountpoint: str

    @property
    def in_memory(self) -> bool:
        return self.magic in MEMORY_FILESYSTEMS

    def describe(self) -> str:
        return f"{self.fstype} mounted at {self.mountpoint}"


def inspect(path: str) -> FsInfo:
    """The filesystem of `path`, or of its nearest existing ancestor when it does not exist."""
    probe = nearest_existing(path)
    magic = _statfs_magic(probe)
    fstype, mountpoint = _mount_of(os.path.realpath(probe))
    return FsInfo(path, magic, fstype, mountpoint)


def nearest_existing(path: str) -> str:
    probe = os.path.abspath(path)
    while not os.path.lexists(probe) and probe != "/":
        probe = os.path.dirname(probe)
    return probe


def _statfs_magic(path: str) -> int:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    # struct statfs starts with f_type, a native word on every Linux ABI.
    buf = ctypes.create_string_buffer(512)
    if libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF


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
