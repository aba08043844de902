"""`vault:PATH[#FIELD]` sources: one read per path, shared by every secret that names it.

One read per path means one lease per path: a username file and a password file from
`database/creds/app` always belong to the same database user.
"""

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog

from secret_init.config import SecretSpec
from secret_init.errors import DataError, MissingFieldError, SecretInitError
from secret_init.model import Hidden, Material
from secret_init.redaction import REDACTOR

if TYPE_CHECKING:
    from secret_init.vault import VaultClient, VaultSecret

log = structlog.get_logger()


def group_by_path(specs: Sequence[SecretSpec]) -> dict[str, list[SecretSpec]]:
    groups: dict[str, list[SecretSpec]] = {}
    for spec in specs:
        groups.setdefault(spec.source.path, []).append(spec)
    return groups


def read_vault(client: "VaultClient", specs: Sequence[SecretSpec], max_size: int) -> list[Material]:
    """Read each path once and render its secrets; on any failure, revoke the leases made here."""
    materials: list[Material] = []
    try:
        for path, group in group_by_path(specs).items():
            materials += _read_path(client, path, group, max_size)
    except SecretInitError:
        revoke_leases(client, materials)  # unusable or half a set: do not leave credentials alive
        raise
    return materials


def revoke_leases(client: "VaultClient", materials: Sequence[Material]) -> None:
    for lease_id in sorted({m.lease.lease_id for m in materials if m.lease}):
        client.revoke_lease_quietly(lease_id)


def _read_path(client: "VaultClient", path: str, group: list[SecretSpec], max_size: int) -> list[Material]:
    secret = client.read(path, f"for {', '.join(s.name for s in group)}")
    lease = secret.lease
    log.info(
        "vault read",
        path=path,
        fields=len(secret.fields),
        lease_id=lease.lease_id if lease else None,
        lease_duration=lease.duration if lease else None,
        renewable=lease.renewable if lease else None,
    )
    for warning in secret.warnings:
        log.warning("vault warning", path=path, warning=warning)
    rendered = []
    try:
        for spec in group:
            value = render(spec, secret)
            REDACTOR.add(value)  # numbers and templates included, not only string fields
            if len(value) > max_size:
                raise DataError(f"secret {spec.name!r} ({spec.source}): {len(value)} bytes is over max_secret_size")
            log.info("source read", secret=spec.name, source=str(spec.source), bytes=len(value))
            rendered.append(Material(spec, Hidden(value), lease))
    except SecretInitError:
        if lease is not None:
            client.revoke_lease_quietly(lease.lease_id)
        raise
    return rendered


def render(spec: SecretSpec, secret: "VaultSecret") -> bytes:
    """The file content for one secret: a field, a template over fields, or all fields as JSON."""
    fields = secret.fields
    where = f"secret {spec.name!r} ({spec.source})"
    if spec.template is not None:
        try:
            return spec.template.render({k: field_text(v) for k, v in fields.items()}).encode("utf-8")
        except MissingFieldError as e:
            raise MissingFieldError(f"{where}: {e}") from None
    if spec.source.field is not None:
        if spec.source.field not in fields:
            available = ", ".join(sorted(fields)) or "none"
            raise MissingFieldError(f"{where}: no field {spec.source.field!r} at {secret.path}; fields: {available}")
        return field_text(fields[spec.source.field]).encode("utf-8")
    return json.dumps(fields, sort_keys=True).encode("utf-8")


def field_text(value: Any) -> str:
    """Strings as they are; numbers, booleans, lists and objects as JSON."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
