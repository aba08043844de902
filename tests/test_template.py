"""The ${field} template language: fields in, $$ for a dollar, anything else refused."""

import pytest

from secret_init.errors import ConfigError, ExitCode, MissingFieldError
from secret_init.template import parse_template


def test_renders_fields_and_literal_dollars() -> None:
    t = parse_template("postgresql://${username}:${password}@db:5432/app?cost=$$5")
    assert t.fields == ("username", "password")
    assert t.render({"username": "u", "password": "p"}) == "postgresql://u:p@db:5432/app?cost=$5"


def test_field_names_may_hold_dots_and_dashes() -> None:
    assert parse_template("${api-key}/${a.b}").render({"api-key": "1", "a.b": "2"}) == "1/2"


@pytest.mark.hostile("config")
def test_missing_field_is_an_error_not_an_empty_string() -> None:
    t = parse_template("${username}:${password}")
    with pytest.raises(MissingFieldError) as info:
        t.render({"username": "u"})
    assert info.value.exit_code == ExitCode.DATA
    assert "password" in str(info.value)


@pytest.mark.hostile("config")
@pytest.mark.parametrize("bad", ["$x", "${}", "${a b}", "${unclosed", "trailing $", "${a}$"])
def test_stray_dollars_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_template(bad)
