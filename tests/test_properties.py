"""Property tests (hypothesis) for reference parsing, name validation and templates."""

import contextlib
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secret_init.config import MAX_NAME_BYTES, parse_reference, validate_name
from secret_init.errors import ConfigError, MissingFieldError
from secret_init.template import parse_template
from tests.conftest import record_cases

segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.@", min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..")
)
vault_path = st.lists(segment, min_size=1, max_size=5).map("/".join)
field = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-", min_size=1, max_size=12)
field_name = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,10}", fullmatch=True)


@given(vault_path, st.none() | field)
def test_vault_references_round_trip(path: str, field_or_none: str | None) -> None:
    text = f"vault:{path}" + (f"#{field_or_none}" if field_or_none is not None else "")
    ref = parse_reference(text)
    assert (ref.kind, ref.path, ref.field) == ("vault", path, field_or_none)
    assert str(ref) == text


@pytest.mark.hostile("config")
@given(st.text(max_size=80))
def test_any_text_parses_or_raises_config_error(text: str) -> None:
    """No input crashes the parser; what it accepts never escapes upwards or hides."""
    try:
        ref = parse_reference(text)
    except ConfigError as e:
        record_cases("config", 1, [e.exit_code])
        return
    record_cases("config")
    assert ref.kind in ("swarm", "file", "vault")
    if ref.kind == "vault":
        assert ".." not in ref.path.split("/") and not ref.path.startswith("/")
    if ref.kind == "swarm":
        assert validate_name(ref.path) is None


@pytest.mark.hostile("filesystem")
@given(st.text(min_size=0, max_size=300))
def test_an_accepted_name_stays_inside_the_output_dir(name: str) -> None:
    """A valid name is one path component: joined to the dir, it names a child of the dir."""
    record_cases("filesystem")
    if validate_name(name) is not None:
        return
    joined = os.path.normpath(os.path.join("/run/app-secrets", name))
    assert os.path.dirname(joined) == "/run/app-secrets"
    assert os.path.basename(joined) == name
    assert not name.startswith(".") and "\x00" not in name
    assert 0 < len(name.encode("utf-8", "surrogatepass")) <= MAX_NAME_BYTES


@pytest.mark.hostile("filesystem")
@given(st.text(alphabet="./\x00ab", min_size=1, max_size=6))
def test_traversal_shapes_are_refused(name: str) -> None:
    record_cases("filesystem")
    if "/" in name or "\x00" in name or name.startswith("."):
        assert validate_name(name) is not None


literal = st.text(max_size=10)
parts = st.lists(st.one_of(literal.map(lambda s: ("lit", s)), field_name.map(lambda s: ("field", s))), max_size=8)


@given(parts, st.dictionaries(field_name, st.text(max_size=10)))
def test_templates_render_literals_and_fields_in_order(pieces: list[tuple[str, str]], values: dict[str, str]) -> None:
    """Escaping literals with $$ and inserting ${f} renders exactly the intended text."""
    source = "".join(p.replace("$", "$$") if kind == "lit" else "${" + p + "}" for kind, p in pieces)
    template = parse_template(source)
    needed = {p for kind, p in pieces if kind == "field"}
    if needed <= set(values):
        expected = "".join(p if kind == "lit" else values[p] for kind, p in pieces)
        assert template.render(values) == expected
    else:
        try:
            template.render(values)
        except MissingFieldError as e:
            assert sorted(needed - set(values))[0] in str(e)
        else:
            raise AssertionError("a missing field rendered")


@pytest.mark.hostile("config")
@given(st.text(max_size=40))
def test_template_parsing_never_crashes(text: str) -> None:
    record_cases("config")
    with contextlib.suppress(ConfigError):
        parse_template(text)
