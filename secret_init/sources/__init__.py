"""Sources only read. Each kind lives in one module behind the small `Source` protocol.

A source reads every secret it is given and reports each failure instead of stopping at
the first, so one run names every broken secret. It revokes nothing: the Vault source
records the leases it made (`VaultSource.issued`), and the caller decides what to keep.
"""

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import structlog

from secret_init.config import SecretSpec
from secret_init.errors import SecretInitError
from secret_init.model import Material


class Reading(NamedTuple):
    materials: list[Material]
    failures: list[tuple[SecretSpec, SecretInitError]]

    def raise_first(self) -> None:
        """Log every failure but the first, then raise the first (its code is the exit code)."""
        if not self.failures:
            return
        log = structlog.get_logger()
        for _, error in self.failures[1:]:
            log.error(str(error), exit_code=int(error.exit_code))
        raise self.failures[0][1]


class Source(Protocol):
    def read(self, specs: Sequence[SecretSpec]) -> Reading: ...


def read_all(specs: Sequence[SecretSpec], sources: Sequence[tuple[tuple[str, ...], Source]]) -> Reading:
    """Each source reads the specs of its kinds, in the order given; results in config order."""
    order = {spec.name: i for i, spec in enumerate(specs)}
    total = Reading([], [])
    for kinds, source in sources:
        chosen = [spec for spec in specs if spec.source.kind in kinds]
        if chosen:
            reading = source.read(chosen)
            total.materials.extend(reading.materials)
            total.failures.extend(reading.failures)
    total.materials.sort(key=lambda m: order[m.spec.name])
    total.failures.sort(key=lambda f: order[f[0].name])
    return total
