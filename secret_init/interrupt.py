"""Stop signals during the start: noted at once, acted on only where nothing is in flight.

A SIGTERM that raised out of a Vault request would lose the answer, and with it a lease
Vault had just issued; one that raised inside a clean-up would stop the revokes. So the
handler only notes the signal. The start acts on it at checkpoints: between reads, in
retry waits, and before the app is exec'd or supervised. Each request is bounded by
request_timeout, so a stop is acted on within that. Clean-ups are never interrupted.
"""

import signal
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_SLICE = 0.05  # how often a retry wait looks for a stop


class StartInterrupted(BaseException):
    """A stop signal before the app runs. A BaseException, so no `except Exception` on the way
    (retries, error mapping) swallows it, and every clean-up on the way revokes what it made."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_noted: list[int] = []  # the first stop signal, once one arrived


def _note(signum: int, _frame: object) -> None:
    if not _noted:
        _noted.append(signum)


def install() -> None:
    """In the main thread, until the supervisor installs its own handlers or the app is exec'd."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _note)


def pending() -> int | None:
    return _noted[0] if _noted else None


def checkpoint() -> None:
    """Raise StartInterrupted if a stop signal arrived: call only where nothing is in flight."""
    if _noted:
        raise StartInterrupted(_noted[0])


def sleep(seconds: float) -> None:
    """A retry wait that ends early, with StartInterrupted, when a stop signal arrives."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        checkpoint()
        time.sleep(min(left, _SLICE))
    checkpoint()


def restore_defaults() -> None:
    """Just before exec: a stop from now on ends this process as it would end the app."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
