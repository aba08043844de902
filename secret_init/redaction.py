"""Redaction: every secret value and token read so far is replaced in log output.

Sources register values the moment they read them, before anything could log them;
the log processor in logs.py asks `REDACTOR.redact` to scrub every field.
"""

import json
import re
import threading

REDACTED = "[redacted]"
# Lines of a multi-line secret (a PEM key) are redacted on their own from this length.
_MIN_LINE = 8


class Redactor:
    """A set of secret strings and one regex that replaces them all."""

    def __init__(self) -> None:
        self._needles: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()

    def add(self, secret: str | bytes) -> None:
        text = secret.decode("utf-8", "backslashreplace") if isinstance(secret, bytes) else secret
        if not text:
            return
        forms = {text, json.dumps(text)[1:-1], repr(text)[1:-1]}
        lines = [line.strip() for line in text.splitlines()]
        forms.update(line for line in lines if len(line) >= _MIN_LINE)
        with self._lock:
            if not forms <= self._needles:
                self._needles |= forms
                self._pattern = None

    def redact(self, text: str) -> str:
        pattern = self._compiled()
        return text if pattern is None else pattern.sub(REDACTED, text)

    def _compiled(self) -> re.Pattern[str] | None:
        with self._lock:
            if self._pattern is None and self._needles:
                # Longest first, so a secret containing another is replaced whole.
                alternatives = sorted(self._needles, key=len, reverse=True)
                self._pattern = re.compile("|".join(map(re.escape, alternatives)))
            return self._pattern


REDACTOR = Redactor()
