"""`vault:PATH[#FIELD]` sources: one request per path, shared by every secret that names it.

One request per path means one lease per path: a username file and a password file from
`database/creds/app` always belong to the same database user, and a certificate file and
its key file from `pki/issue/web` (a path written with `params`) to the same certificate.
"""

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from secret_init import interrupt
from secret_init.config import SecretSpec
from secret_init.errors import DataError, MissingFieldError, SecretInitError, VaultUnavailableError
from secret_init.model import CERTIFICATE_PUBLIC, Hidden, Material
from secret_init.redaction import REDACTOR
from secret_init.sources import Reading

if TYPE_CHECKING:
    from secret_init.vault import VaultClient, VaultSecret

log = structlog.get_logger()


class VaultSource:
    """Reads through a client that `connect` logs in, on the first read that needs one."""

    def __init__(self, connect: "Callable[[], VaultClient]", max_size: int) -> None:
        self.connect = connect
        self.max_size = max_size
        self.client: VaultClient | None = None
        self.issued: list[str] = []  # every lease any read made, as it arrived

    def read(self, specs: Sequence[SecretSpec]) -> Reading:
        reading = Reading([], [])
        try:
            if self.client is None:
                self.client = self.connect()
        except SecretInitError as e:
            reading.failures.append((specs[0], e))
            return reading
        interrupt.checkpoint()  # a stop that came during the login: the token is ours to revoke now
        groups: dict[str, list[SecretSpec]] = {}
        for spec in specs:
            groups.setdefault(spec.source.path, []).append(spec)
        for path, group in groups.items():
            try:
                secret = self._fetch(path, group)
            except VaultUnavailableError as e:
                reading.failures.append((group[0], e))
                break  # the next paths would each wait out the same outage
            except SecretInitError as e:
                reading.failures.append((group[0], e))
                continue
            if secret.lease is not None and secret.lease.revocable:
                self.issued.append(secret.lease.lease_id)
            interrupt.checkpoint()  # between reads: what this one issued is known, so it is revoked
            try:
                reading.materials.extend(self._render_group(secret, group))
            except SecretInitError as e:
                reading.failures.append((group[0], e))
        return reading

    def _fetch(self, path: str, group: list[SecretSpec]) -> "VaultSecret":
        """Read the path, or write it when its secrets carry params (the config made them all equal)."""
        assert self.client is not None
        purpose = f"for {', '.join(s.name for s in group)}"
        params = group[0].params
        if params is None:
            return self.client.read(path, purpose, self.max_size)
        body = {key: list(value) if isinstance(value, tuple) else value for key, value in params}
        return self.client.write(path, body, purpose, self.max_size)

    def _render_group(self, secret: "VaultSecret", group: list[SecretSpec]) -> list[Material]:
        """Every secret of one path, or none: half a set is no use."""
        lease = secret.lease
        log.info(
            "vault write" if group[0].written else "vault read",
            path=secret.path,
            fields=len(secret.fields),
            lease_id=lease.lease_id if lease and lease.revocable else None,
            lease_duration=lease.duration if lease else None,
            renewable=lease.renewable if lease else None,
        )
        if lease is not None and lease.serial is not None:
            not_after = secret.fields["expiration"]  # from 1970 to 9999: parse_response checked it
            expires = datetime.fromtimestamp(not_after, UTC).isoformat(timespec="seconds")
            log.info("certificate issued", path=secret.path, serial=lease.serial, expires_at=expires)
        for warning in secret.warnings:
            log.warning("vault warning", path=secret.path, warning=warning)
        rendered = []
        issued = lease is not None and lease.serial is not None
        for spec in group:
            value = render(spec, secret)
            # Numbers and templates included, not only string fields; but not the public parts of an issued
            # certificate (a 2-letter key type would be cut out of every log line); its key is registered.
            if not issued or (spec.template is None and spec.source.field not in CERTIFICATE_PUBLIC):
                REDACTOR.add(value)
            if len(value) > self.max_size:
                raise DataError(f"secret {spec.name!r} ({spec.source}): {len(value)} bytes is over max_secret_size")
            log.info("source read", secret=spec.name, source=str(spec.source), bytes=len(value))
            rendered.append(Material(spec, Hidden(value), lease))
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
    """Strings as they are; a list of PEM blocks (a `ca_chain`) as a PEM bundle; the rest as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v.startswith("-----BEGIN ") for v in value):
        return "".join(v if v.endswith("\n") else v + "\n" for v in value)
    return json.dumps(value, sort_keys=True)
