"""The sink on real tmpfs mounts: modes, owners, atomic replacement, symlinks, full disks."""

import fcntl
import os
import stat
import threading
from pathlib import Path

import pytest

from secret_init import fsinfo
from secret_init.errors import ExitCode, PermissionRefusedError, SecretInitError, WriteError
from secret_init.model import Hidden
from secret_init.sink import TEMP_PREFIX, OutputFile, Owner, Sink
from tests.conftest import needs_root

pytestmark = needs_root

OWNER = Owner(10001, 10002)


def out_file(name: str, data: bytes, mode: int = 0o400, owner: Owner = OWNER) -> OutputFile:
    return OutputFile(name, Hidden(data), mode, owner)


def ready_sink(directory: Path, group: int = 10002, allow_non_tmpfs: bool = False) -> Sink:
    sink = Sink(str(directory), group, allow_non_tmpfs)
    sink.check_filesystem()
    sink.prepare()
    return sink


def temp_files(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(TEMP_PREFIX)]


def test_files_get_owner_and_mode_and_dir_is_root_group_0750(tmpfs: Path) -> None:
    out = tmpfs / "secrets"
    sink = ready_sink(out)
    sink.write([out_file("a", b"alpha"), out_file("b", b"beta", 0o440, Owner(10003, 10002))])
    st_dir = out.stat()
    assert (st_dir.st_uid, st_dir.st_gid, stat.S_IMODE(st_dir.st_mode)) == (0, 10002, 0o750)
    a, b = (out / "a").stat(), (out / "b").stat()
    assert (a.st_uid, a.st_gid, stat.S_IMODE(a.st_mode)) == (10001, 10002, 0o400)
    assert (b.st_uid, b.st_gid, stat.S_IMODE(b.st_mode)) == (10003, 10002, 0o440)
    assert (out / "a").read_bytes() == b"alpha"
    assert temp_files(out) == []


def test_an_existing_tmpfs_mountpoint_is_tightened(tmpfs: Path) -> None:
    """A --tmpfs mount comes as 1777; the sink makes it root:group 0750."""
    tmpfs.chmod(0o1777)
    ready_sink(tmpfs)
    st = tmpfs.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 10002, 0o750)


def test_identical_content_is_not_rewritten(tmpfs: Path) -> None:
    sink = ready_sink(tmpfs / "s")
    first = sink.write([out_file("a", b"same")])
    inode = (tmpfs / "s" / "a").stat().st_ino
    second = sink.write([out_file("a", b"same")])
    assert first[0].changed and not second[0].changed
    assert (tmpfs / "s" / "a").stat().st_ino == inode
    third = sink.write([out_file("a", b"different")])
    assert third[0].changed
    assert (tmpfs / "s" / "a").stat().st_ino != inode


def test_changed_mode_alone_rewrites(tmpfs: Path) -> None:
    sink = ready_sink(tmpfs / "s")
    sink.write([out_file("a", b"same", 0o400)])
    assert sink.write([out_file("a", b"same", 0o440)])[0].changed
    assert stat.S_IMODE((tmpfs / "s" / "a").stat().st_mode) == 0o440


@pytest.mark.hostile("filesystem")
def test_a_symlink_at_the_destination_is_replaced_not_followed(tmpfs: Path) -> None:
    victim = tmpfs / "victim"
    victim.write_text("do not touch")
    out = tmpfs / "s"
    sink = ready_sink(out)
    (out / "a").symlink_to(victim)
    sink.write([out_file("a", b"secret-data")])
    assert victim.read_text() == "do not touch"
    assert not (out / "a").is_symlink()
    assert (out / "a").read_bytes() == b"secret-data"


@pytest.mark.hostile("filesystem")
def test_a_symlinked_output_dir_is_refused(tmpfs: Path) -> None:
    real = tmpfs / "real"
    real.mkdir()
    link = tmpfs / "link"
    link.symlink_to(real)
    with pytest.raises(PermissionRefusedError) as info:
        Sink(str(link), 0, False).prepare()
    assert info.value.exit_code == ExitCode.NO_PERMISSION


@pytest.mark.hostile("filesystem")
def test_a_directory_in_the_way_fails_before_anything_changes(tmpfs: Path) -> None:
    sink = ready_sink(tmpfs / "s")
    sink.write([out_file("a", b"old")])
    (tmpfs / "s" / "b").mkdir()
    with pytest.raises(WriteError):
        sink.write([out_file("a", b"new"), out_file("b", b"x")])
    assert (tmpfs / "s" / "a").read_bytes() == b"old"
    assert temp_files(tmpfs / "s") == []


@pytest.mark.hostile("filesystem")
def test_full_disk_keeps_old_files_and_leaves_no_temp(small_tmpfs: Path) -> None:
    """A real 64 KiB tmpfs runs out of space: every old file stays, no temp file remains."""
    sink = ready_sink(small_tmpfs / "s")
    sink.write([out_file("a", b"old-a"), out_file("b", b"old-b")])
    with pytest.raises(WriteError) as info:
        sink.write([out_file("a", b"new-a"), out_file("b", b"x" * 200_000)])
    assert info.value.exit_code == ExitCode.CANT_CREATE
    assert "No space left" in str(info.value)
    assert (small_tmpfs / "s" / "a").read_bytes() == b"old-a"
    assert (small_tmpfs / "s" / "b").read_bytes() == b"old-b"
    assert temp_files(small_tmpfs / "s") == []


class InterruptedOnStage(Hidden):
    """A stand-in for a stop signal landing mid-write (a signal cannot be timed to that instant):
    the first reveal() is the up-to-date check, the second is the staging write."""

    __slots__ = ("calls",)

    def __init__(self, value: bytes) -> None:
        super().__init__(value)
        self.calls = 0

    def reveal(self) -> bytes:
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return super().reveal()


def test_a_stop_signal_while_staging_leaves_no_temp_file(tmpfs: Path) -> None:
    sink = ready_sink(tmpfs / "s")
    sink.write([out_file("a", b"old-a")])
    with pytest.raises(KeyboardInterrupt):
        sink.write([OutputFile("a", InterruptedOnStage(b"new-a"), 0o400, OWNER)])
    assert (tmpfs / "s" / "a").read_bytes() == b"old-a"
    assert temp_files(tmpfs / "s") == []


def hold_write_lock(out: Path) -> int:
    """What another secret-init does while it writes: an flock on .secret-init/write.lock."""
    fd = os.open(out / ".secret-init" / "write.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_a_second_writer_waits_for_the_first(tmpfs: Path) -> None:
    """The sink locks .secret-init/write.lock: a write waits while another secret-init holds it."""
    out = tmpfs / "s"
    sink = ready_sink(out)
    lock = hold_write_lock(out)
    writer = threading.Thread(target=sink.write, args=([out_file("a", b"x")],))
    writer.start()
    writer.join(0.5)
    assert writer.is_alive() and not (out / "a").exists()
    os.close(lock)  # releases the lock
    writer.join(10)
    assert not writer.is_alive() and (out / "a").read_bytes() == b"x"


def test_a_write_lock_held_too_long_is_a_75_not_a_hang(tmpfs: Path) -> None:
    out = tmpfs / "s"
    ready_sink(out)
    lock = hold_write_lock(out)
    try:
        with pytest.raises(SecretInitError) as info:
            Sink(str(out), 10002, False, lock_wait=0.3).write([out_file("a", b"x")])
    finally:
        os.close(lock)
    assert info.value.exit_code == ExitCode.TEMPFAIL
    assert "write.lock" in str(info.value) and "\n" not in str(info.value)
    assert not (out / "a").exists()


def test_stale_temp_files_are_removed(tmpfs: Path) -> None:
    out = tmpfs / "s"
    out.mkdir()
    (out / f"{TEMP_PREFIX}deadbeef").write_text("left by a crash")
    ready_sink(out)
    assert temp_files(out) == []


@pytest.mark.hostile("filesystem")
def test_non_tmpfs_is_refused_naming_the_mount(disk_dir: Path) -> None:
    with pytest.raises(PermissionRefusedError) as info:
        Sink(str(disk_dir / "out"), 0, False).check_filesystem()
    assert info.value.exit_code == ExitCode.NO_PERMISSION
    assert "not tmpfs" in str(info.value) and "mounted at" in str(info.value)


def test_non_tmpfs_is_allowed_when_configured(disk_dir: Path) -> None:
    sink = ready_sink(disk_dir / "out", allow_non_tmpfs=True)
    sink.write([out_file("a", b"x")])
    assert (disk_dir / "out" / "a").read_bytes() == b"x"


def test_fsinfo_tells_tmpfs_from_disk(tmpfs: Path, disk_dir: Path) -> None:
    mem = fsinfo.inspect(str(tmpfs / "not-yet-created"))
    disk = fsinfo.inspect(str(disk_dir))
    assert mem.in_memory and mem.fstype == "tmpfs" and mem.mountpoint == str(tmpfs)
    assert not disk.in_memory
