"""The `${field}` template language for composing one file from several Vault fields.

Deliberately tiny: `${name}` inserts a field, `$$` is a literal dollar, and any other
`$` is a config error. A missing field is an error at render time, never an empty
string or `<no value>`.
"""

import re
from collections.abc import Mapping
from typing import NamedTuple

from secret_init.errors import ConfigError, MissingFieldError

FIELD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_TOKEN = re.compile(r"\$\$|\$\{([^}]*)\}|\$")


class Field(NamedTuple):
    name: str


class Template(NamedTuple):
    """A parsed template: literal text and field names, alternating."""

    parts: tuple[str | Field, ...]

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parts if isinstance(p, Field))

    def render(self, values: Mapping[str, str]) -> str:
        missing = [name for name in self.fields if name not in values]
        if missing:
            raise MissingFieldError(
                f"template needs field(s) {', '.join(sorted(set(missing)))}; "
                f"available: {', '.join(sorted(values)) or 'none'}"
            )
        return "".join(p if isinstance(p, str) else values[p.name] for p in self.parts)


def parse_template(text: str) -> Template:
    parts: list[str | Field] = []
    literal: list[str] = []
    pos = 0
    for match in _TOKEN.finditer(text):
        literal.append(text[pos : match.start()])
        pos = match.end()
        if match.group(0) == "$$":
            literal.append("$")
            continue
        name = match.group(1)
        if name is None or not FIELD_NAME.fullmatch(name):
            raise ConfigError(
                f"template: bad placeholder at offset {match.start()}: "
                "use ${field} for a field and $$ for a literal $"
            )
        parts.append("".join(literal))
        literal = []
        parts.append(Field(name))
    literal.append(text[pos:])
    parts.append("".join(literal))
    return Template(tuple(p for p in parts if p != ""))
