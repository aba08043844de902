"""`swarm:NAME` and `file:/PATH` sources: a regular file, read whole, with a size limit."""

import os
import stat
from collections.abc import Sequence

import structlog

from secret_init import fsinfo
from secret_init.config import SecretSpec
from secret_init.errors import DataError, PermissionRefusedError, SecretInitError, SourceError
from secret_init.model import Hidden, Material
from secret_init.redaction import REDACTOR
from secret_init.sources import Reading

log = structlog.get_logger()


def source_path(spec: SecretSpec, swarm_dir: str) -> str:
    if spec.source.kind == "swarm":
        return os.path.join(swarm_dir, spec.source.path)
    return spec.source.path


class FileSource:
    def __init__(self, swarm_dir: str, max_size: int) -> None:
        self.swarm_dir = swarm_dir
        self.max_size = max_size

    def read(self, specs: Sequence[SecretSpec]) -> Reading:
        reading = Reading([], [])
        for spec in specs:
            try:
                reading.materials.append(self._read_one(spec))
            except SecretInitError as e:
                reading.failures.append((spec, e))
        return reading

    def _read_one(self, spec: SecretSpec) -> Material:
        path = source_path(spec, self.swarm_dir)
        data = read_regular_file(path, self.max_size, f"secret {spec.name!r} ({spec.source})")
        REDACTOR.add(data)
        log.info("source read", secret=spec.name, source=str(spec.source), bytes=len(data))
        warn_if_on_disk(path, spec.name)
        return Material(spec, Hidden(data))


def read_regular_file(path: str, max_size: int, what: str, limit: str = "max_secret_size") -> bytes:
    """Read a whole regular file; FIFOs, devices and directories are refused, not opened blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise SourceError(f"{what}: {path} does not exist") from None
    except PermissionError:
        raise PermissionRefusedError(f"{what}: {path} is not readable by uid {os.geteuid()}") from None
    except OSError as e:
        raise SourceError(f"{what}: {path} cannot be opened: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SourceError(f"{what}: {path} is not a regular file")
        chunks, size = [], 0
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_size:
                raise DataError(f"{what}: {path} is larger than {limit} ({max_size} bytes)")
        return b"".join(chunks)
    except OSError as e:
        raise SourceError(f"{what}: {path} cannot be read: {e.strerror}") from None
    finally:
        os.close(fd)


def warn_if_on_disk(path: str, name: str) -> None:
    try:
        fs = fsinfo.inspect(path)
    except OSError:
        return
    if not fs.in_memory:
        log.warning("source file is on a disk filesystem, not tmpfs", secret=name, path=path, filesystem=fs.describe())
