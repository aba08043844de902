"""Logging: structlog, JSON lines on stderr by default, every field redacted."""

import importlib
import sys
import threading
import types
from collections.abc import MutableMapping
from typing import Any, TextIO

from secret_init.redaction import REDACTOR

# Modules that structlog imports at import time and secret-init's calls never touch
# (found with -X importtime). configure() puts a stand-in in sys.modules for each; it
# imports the real module on first use. asyncio (~30-40 ms with ssl, socket and
# subprocess): structlog's async methods. inspect (~14 ms with ast, dis, tokenize):
# dataclasses asks it only for a class without a docstring, and structlog's have one.
# uuid (~5 ms with platform): the deprecated structlog.threadlocal. logging and
# structlog.stdlib (~6 ms): we log through structlog's own WriteLogger. linecache
# (with tokenize), textwrap and copy (~6 ms): traceback and dataclasses use them only
# to format a traceback or to copy, never to be defined.
DEFERRED = ("asyncio", "inspect", "uuid", "logging", "structlog.stdlib", "linecache", "textwrap", "copy")


def configure(fmt: str | None = None, level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog once per process; console format only when asked or on a terminal."""
    stream = stream or sys.stderr
    if fmt is None:
        fmt = "console" if stream.isatty() else "json"
    for name in DEFERRED:  # before structlog imports them
        defer_import(name)
    import structlog

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


_STAND_IN_LOCK = threading.Lock()


class _Deferred(types.ModuleType):
    """Stands in for a module in sys.modules until something reads an attribute of it.

    Unlike importlib.util.LazyLoader, it survives a plain `import name` elsewhere: the
    import system only looks at `__spec__`, which a fresh ModuleType has (None).
    """

    def __getattr__(self, attr: str) -> Any:
        real = self.__dict__.get("_deferred_real")
        if real is None:
            # Two threads may get here at once: only one takes the stand-in out, and the
            # other's import waits on the import system's lock for the module.
            with _STAND_IN_LOCK:
                if sys.modules.get(self.__name__) is self:
                    del sys.modules[self.__name__]
            real = importlib.import_module(self.__name__)
            self.__dict__["_deferred_real"] = real
        return getattr(real, attr)


def defer_import(name: str) -> None:
    """Put off importing `name` until it is really used, if ever.

    A top-level module that is not installed gets no stand-in, so `import name` still
    fails where code expects it to (an optional dependency). A dotted name must be one
    its package imports by `from package import name` (structlog does for stdlib).
    """
    if name in sys.modules:
        return
    if "." not in name and not is_installed(name):
        return
    sys.modules[name] = _Deferred(name)


def keep_out(name: str) -> None:
    """Make `import name` fail, as if it were not installed, for a dependency's optional import.

    Only for modules whose importers catch the ImportError and carry on without them.
    """
    sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # None in sys.modules: ImportError


def is_installed(name: str) -> bool:
    # importlib.util.find_spec's search, without importing importlib.util (~1 ms).
    finders = (getattr(finder, "find_spec", None) for finder in sys.meta_path)
    return any(find(name, None) is not None for find in finders if find is not None)


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
