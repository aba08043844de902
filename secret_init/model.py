"""The values that flow from sources to the sink. None of them prints its secret."""

from typing import NamedTuple

from secret_init.config import SecretSpec

MAX_TIMESTAMP = 253402300799  # 9999-12-31T23:59:59Z, the last second a datetime can show
# The parts of an issued certificate that every TLS client sees: not secrets, so not redacted
# (a 2-letter private_key_type would otherwise be cut out of every log line).
CERTIFICATE_PUBLIC = frozenset(
    {"certificate", "issuing_ca", "ca_chain", "serial_number", "expiration", "private_key_type"}
)


class Hidden:
    """Secret bytes whose str and repr never show them."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return f"Hidden(<{len(self._value)} bytes>)"

    __str__ = __repr__


class Lease(NamedTuple):
    """A Vault lease behind a dynamic secret; renewal and rotation work on this."""

    lease_id: str
    duration: float
    renewable: bool
    issued_at: float = 0.0  # when Vault answered, on the client's monotonic clock; its TTL runs from here
    revocable: bool = True  # False for an issued certificate without a Vault lease: lease_id is then its serial
    serial: str | None = None  # an issued certificate's serial number


class Material(NamedTuple):
    """One secret, read and rendered, ready for the sink."""

    spec: SecretSpec
    value: Hidden
    lease: Lease | None = None
