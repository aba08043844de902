"""Redaction: every secret value and token read so far is replaced in log output.

Sources register values the moment they read them, before anything could log them;
the log processor in logs.py asks `REDACTOR.redact` to scrub every field.

Needles are indexed by their first few characters, so adding one is cheap and a field is
scanned in time linear in its length, however many secrets are held (hundreds of leases
each add their values).
"""

import json
import threading
from collections.abc import Iterable

REDACTED = "[redacted]"
# Lines of a multi-line secret (a PEM key) are redacted on their own from this length.
_MIN_LINE = 8
_KEY = 3  # needles are indexed by this many leading characters


class Redactor:
    """A set of secret strings, replaced leftmost-first and longest-first, in one pass."""

    def __init__(self) -> None:
        self._by_key: dict[str, list[str]] = {}  # first _KEY chars -> needles, longest first
        self._short: set[str] = set()  # needles shorter than _KEY
        self._lock = threading.Lock()

    def add(self, secret: str | bytes) -> None:
        text = secret.decode("utf-8", "backslashreplace") if isinstance(secret, bytes) else secret
        if text.startswith("-----BEGIN ") and "\n" in text:
            # A PEM block from its first body line on: needles are indexed by their first characters,
            # and every key and certificate starting "---" would share one index entry. The armor
            # lines ("-----BEGIN RSA PRIVATE KEY-----") are public and left as they are.
            text = text.split("\n", 1)[1]
        if not text:
            return
        forms = {text, json.dumps(text)[1:-1], repr(text)[1:-1]}
        lines = [line.strip() for line in text.splitlines()]
        forms.update(line for line in lines if len(line) >= _MIN_LINE and not line.startswith("-----"))
        with self._lock:
            for form in forms:
                self._add_form(form)

    def _add_form(self, form: str) -> None:
        if len(form) < _KEY:
            self._short.add(form)
            return
        # Copy on write: redact() reads the lists without the lock.
        bucket = self._by_key.get(form[:_KEY], [])
        if form not in bucket:
            self._by_key[form[:_KEY]] = sorted([*bucket, form], key=len, reverse=True)

    def redact(self, text: str) -> str:
        by_key, short = self._by_key, self._short
        # Lookups only, never iteration: the renewer thread may add needles meanwhile.
        if short:
            candidates: Iterable[int] = range(len(text))
        else:
            candidates = [i for i in range(len(text) - _KEY + 1) if text[i : i + _KEY] in by_key]
            if not candidates:
                return text  # the common case: no needle's first characters occur at all
        parts: list[str] = []
        start = 0
        for i in candidates:
            if i < start:
                continue  # inside a needle already replaced
            hit = _needle_at(text, i, by_key, short)
            if hit:
                parts += (text[start:i], REDACTED)
                start = i + hit
        parts.append(text[start:])
        return "".join(parts)


def _needle_at(text: str, i: int, by_key: dict[str, list[str]], short: set[str]) -> int:
    """The length of the longest needle starting at text[i], or 0."""
    for needle in by_key.get(text[i : i + _KEY], ()):
        if text.startswith(needle, i):
            return len(needle)
    for length in range(_KEY - 1, 0, -1):
        if text[i : i + length] in short:
            return length
    return 0


REDACTOR = Redactor()
