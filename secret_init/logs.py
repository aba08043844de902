"""Logging: structlog, JSON lines on stderr by default, every field redacted."""

import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

from secret_init.redaction import REDACTOR


def configure(fmt: str | None = None, level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog once per process; console format only when asked or on a terminal."""
    import structlog

    stream = stream or sys.stderr
    if fmt is None:
        fmt = "console" if stream.isatty() else "json"
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    else:
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level.lower()),
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )


def redact_event(_logger: object, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor: no secret value survives in any field, nested or not."""
    for key, value in event.items():
        event[key] = _redact_value(value)
    return event


def _redact_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return REDACTOR.redact(value)
    if isinstance(value, dict):
        return {str(k): _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v) for v in value]
    # Exceptions, bytes and anything else are logged as redacted text.
    return REDACTOR.redact(str(value))
