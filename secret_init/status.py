"""status.json: what the supervisor knows, for `secret-init health` and for people. No values.

Building and judging the status are pure: plain data and an explicit clock. Only
`health`, the command, reads the config and the file.
"""

import json
import math
import os
import stat
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple, TextIO

from secret_init.config import Config, load, unprintable
from secret_init.errors import SecretInitError

STATUS_DIR = ".secret-init"  # inside output.dir
STATUS_FILE = "status.json"
STATUS_VERSION = 1
MAX_STATUS_SIZE = 1024 * 1024  # ours is a few KiB; a bigger one was planted


class LeaseView(NamedTuple):
    """One lease as the status shows it; times are Unix seconds."""

    lease_id: str
    expires_at: float
    deadline: float
    rotate_at: float | None  # None until the lease's max TTL is known
    last_renewal: float | None
    last_rotation: float | None  # when the rotation that brought this lease finished
    rotating: bool
    revocable: bool = True  # False: an issued certificate without a Vault lease; lease_id is not shown
    serial: str | None = None  # an issued certificate's


def iso(ts: float | None) -> str | None:
    if ts is None or math.isinf(ts):
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def build(
    cfg: Config,
    leases: Mapping[str, LeaseView],
    supervisor_pid: int,
    app_pid: int | None,
    now: float,
    state: str = "running",
) -> dict[str, Any]:
    secrets = []
    for spec in cfg.secrets:
        lease = leases.get(spec.source.path) if spec.source.kind == "vault" else None
        secrets.append(
            {
                "name": spec.name,
                "source": str(spec.source),
                "file": cfg.file_path(spec),
                "lease_id": lease.lease_id if lease and lease.revocable else None,
                "serial": lease.serial if lease else None,
                "expires_at": iso(lease.expires_at) if lease else None,
                "deadline": iso(lease.deadline) if lease else None,
                "rotate_at": iso(lease.rotate_at) if lease else None,
                "last_renewal": iso(lease.last_renewal) if lease else None,
                "last_rotation": iso(lease.last_rotation) if lease else None,
                "rotating": lease.rotating if lease else False,
            }
        )
    return {
        "version": STATUS_VERSION,
        "state": state,
        "updated_at": iso(now),
        "supervisor_pid": supervisor_pid,
        "app_pid": app_pid,
        "secrets": secrets,
    }


def encode(doc: Mapping[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2) + "\n").encode()


def problems(cfg: Config, status: Mapping[str, Any] | None, now: float, exists: Callable[[str], bool]) -> list[str]:
    """Why the app's secrets are not healthy; empty when they are."""
    found = [f"{cfg.file_path(s)} does not exist" for s in cfg.secrets if not exists(cfg.file_path(s))]
    if status is None:
        return found
    if status.get("state") == "stopped":
        found.append("secret-init has stopped; the leases it held are gone")
    for entry in status.get("secrets", []):
        rotate_at, deadline = parse_iso(entry.get("rotate_at")), parse_iso(entry.get("deadline"))
        held = f"lease {entry.get('lease_id')}" if entry.get("lease_id") else f"certificate {entry.get('serial')}"
        lease = f"{held} of {entry.get('name')}"
        if deadline is not None and now >= deadline:
            found.append(f"{lease} is past its deadline")
        elif rotate_at is not None and now >= rotate_at and not entry.get("rotating"):
            found.append(f"{lease} is past rotate_before and no rotation is in progress")
    return found


def well_formed(doc: Any) -> dict[str, Any]:
    """The status as build() writes it; the file sits in the app's volume, so it may be anything (ValueError)."""
    if not isinstance(doc, dict):
        raise ValueError("not the shape secret-init writes")
    secrets = doc.get("secrets", [])
    if not isinstance(secrets, list) or not all(isinstance(e, dict) for e in secrets):
        raise ValueError("not the shape secret-init writes")
    for entry in secrets:
        for key in ("name", "lease_id", "serial", "rotate_at", "deadline"):
            value = entry.get(key)
            if value is not None and not (isinstance(value, str) and unprintable(value) is None and len(value) <= 4096):
                raise ValueError(f"{key} of an entry is not a printable string")
        for key in ("rotate_at", "deadline"):
            parse_iso(entry.get(key))  # ValueError if not ISO 8601
    return doc


def read_regular(path: str) -> bytes:
    """A regular file's bytes; anything else planted there (a FIFO, a device) is refused, never waited on."""
    # O_NOCTTY: a terminal planted there would become the controlling terminal of a session leader
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_STATUS_SIZE + 1)
        if len(data) > MAX_STATUS_SIZE:
            raise OSError(f"{path} is over {MAX_STATUS_SIZE} bytes")
        return data
    finally:
        os.close(fd)


def health(config_path: str, out: TextIO) -> int:
    """`secret-init health`: 0 when every file exists and no lease is overdue; no Vault call."""
    import time

    try:
        cfg = load(config_path, os.environ)
    except SecretInitError as e:
        print(f"unhealthy: {e}", file=out)
        return 1
    doc = None
    try:
        doc = well_formed(json.loads(read_regular(f"{cfg.output.dir}/{STATUS_DIR}/{STATUS_FILE}")))
    except FileNotFoundError:
        pass  # a one-shot run keeps no status: the files are all there is to check
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep to decode
        print(f"unhealthy: status file unreadable: {e}", file=out)
        return 1
    found = problems(cfg, doc, time.time(), os.path.exists)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        print(f"unhealthy: {found[0]}{more}", file=out)
        return 1
    print("healthy", file=out)
    return 0
