"""Redaction: a secret registered once is replaced in every field the logger renders."""

import io
import json
import re
import secrets

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from secret_init import logs
from secret_init.model import Hidden
from secret_init.redaction import REDACTED, Redactor


def test_redactor_replaces_every_form_of_a_value() -> None:
    r = Redactor()
    secret = 'pa"ss\nword-with-quote'
    r.add(secret)
    assert r.redact(f"before {secret} after") == f"before {REDACTED} after"
    escaped = json.dumps(secret)[1:-1]
    assert secret not in r.redact(escaped) and REDACTED in r.redact(escaped)
    assert r.redact(repr(secret)) == f"'{REDACTED}'"


def test_lines_of_multi_line_secrets_are_redacted_alone() -> None:
    r = Redactor()
    key = "-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END KEY-----"
    r.add(key.encode())
    assert "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC" not in r.redact("error near MIIEvQIBADANBgkqhkiG9w0BAQEFAASC")


def test_longer_secret_wins_over_its_prefix() -> None:
    r = Redactor()
    r.add("abc")
    r.add("abcdef")
    assert r.redact("xabcdefx") == f"x{REDACTED}x"


def _regex_redact(needles: set[str], text: str) -> str:
    """The reference: one alternation of every form, longest first (the old implementation)."""
    pattern = "|".join(map(re.escape, sorted(needles, key=len, reverse=True)))
    return re.sub(pattern, REDACTED, text) if needles else text


def _forms(secret: str) -> set[str]:
    forms = {secret, json.dumps(secret)[1:-1], repr(secret)[1:-1]}
    forms.update(line.strip() for line in secret.splitlines() if len(line.strip()) >= 8)
    return {f for f in forms if f}


@given(
    st.lists(st.text(alphabet="ab'\\\nc", min_size=1, max_size=6), max_size=6),
    st.text(alphabet="ab'\\\ncx", max_size=40),
)
def test_redaction_matches_one_longest_first_alternation(secrets: list[str], text: str) -> None:
    """Leftmost match, longest needle first, one pass: exactly what a regex alternation does."""
    r = Redactor()
    for secret in secrets:
        r.add(secret)
    needles = set().union(*map(_forms, secrets)) if secrets else set()
    assert r.redact(text) == _regex_redact(needles, text)


def test_many_secrets_are_all_redacted() -> None:
    r = Redactor()
    secrets = [f"{i:04d}-{'x' * (i % 7)}-secret" for i in range(2000)]
    for secret in secrets:
        r.add(secret)
    text = " | ".join(secrets[::97])
    assert r.redact(text) == " | ".join([REDACTED] * len(secrets[::97]))


def test_empty_redactor_returns_text_unchanged() -> None:
    assert Redactor().redact("nothing to hide") == "nothing to hide"


def test_hidden_never_prints_its_value() -> None:
    h = Hidden(b"topsecret")
    assert "topsecret" not in repr(h) and "topsecret" not in str(h) and "topsecret" not in f"{h}"
    assert h.reveal() == b"topsecret"


@pytest.fixture
def captured() -> io.StringIO:
    stream = io.StringIO()
    logs.configure("json", "debug", stream)
    return stream


def test_logger_redacts_nested_fields_and_exception_text(captured: io.StringIO) -> None:
    """The real processor chain: values in strings, nested dicts, lists and tracebacks are scrubbed."""
    from secret_init.redaction import REDACTOR

    secret = "value-8f3a9c1d2e"
    REDACTOR.add(secret)
    log = structlog.get_logger()
    log.info(f"event with {secret}", field=secret, nested={"k": [secret, 1]}, obj=Hidden(secret.encode()))
    try:
        raise ValueError(f"bad thing: {secret}")
    except ValueError:
        log.exception("failed")
    output = captured.getvalue()
    assert secret not in output
    assert output.count(REDACTED) >= 4
    first = json.loads(output.splitlines()[0])
    assert first["nested"] == {"k": [REDACTED, 1]}


def test_a_pem_block_is_indexed_by_its_body_and_its_armor_stays_readable() -> None:
    """Keys rotated every 30 s must not pile up under one "---" index entry that every log line with "---" scans."""
    r = Redactor()
    armor = ("-----BEGIN EC PRIVATE KEY-----", "-----END EC PRIVATE KEY-----")
    keys = [f"{armor[0]}\n{secrets.token_urlsafe(48)}\n{secrets.token_urlsafe(9)}\n{armor[1]}" for _ in range(50)]
    for key in keys:
        r.add(key)
    line = json.dumps({"event": "x", "key": keys[7]})
    redacted = r.redact(line)
    body = keys[7].split("\n")[1:3]
    assert all(part not in redacted for part in body), redacted
    assert "-----BEGIN EC PRIVATE KEY-----" in redacted, "the public armor line is left readable"
    assert "---" not in r._by_key, "no needle starts with the armor"
    assert r.redact("a --- b -----END x") == "a --- b -----END x"
