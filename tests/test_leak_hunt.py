"""The session-wide leak hunt (tests/figures.py): it finds planted leaks in every encoding, and runs last.

`test_no_recorded_output_holds_a_secret` is moved to the end of the session by the plugin, so it
searches what every other test recorded; pytest_sessionfinish searches once more after the
fixtures' teardowns and fails the session if anything new turned up there.
"""

import base64
import json
import os
import secrets
import subprocess
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import figures
from tests.conftest import REPO, base_env, random_secret, run_cli
from tests.figures import LeakRegistry, encodings, find_leaks, harvest_output_dir

# Each encoding, applied to a value, as a careless log line would carry it.
PLANTED: dict[str, Callable[[str], str]] = {
    "raw": lambda v: v,
    "base64": lambda v: base64.b64encode(v.encode()).decode(),
    "base64, one byte in": lambda v: base64.b64encode(b"x" + v.encode()).decode(),
    "base64, two bytes in": lambda v: base64.b64encode(b"xy" + v.encode() + b"z").decode(),
    "base64url": lambda v: base64.urlsafe_b64encode(b"\xff\xfe" + v.encode()).decode(),
    "basic auth header": lambda v: "Basic " + base64.b64encode(f"user:{v}".encode()).decode(),
    "hex": lambda v: v.encode().hex(),
    "HEX": lambda v: v.encode().hex().upper(),
    "url-encoded": lambda v: urllib.parse.quote(v, safe=""),
    "form-encoded": lambda v: urllib.parse.urlencode({"password": v}),
    "json-escaped": lambda v: json.dumps({"error": v}),
    "json-escaped, ascii": lambda v: json.dumps({"error": v}, ensure_ascii=True),
}

# Values that change under encoding: URL and JSON escapes only show with such characters.
AWKWARD = ("p@ss w/rd+100%&ok=1", 'quote " backslash \\ tab \t end', "é-ünïcode-ß-€-密码-x", "line\nbreak\r\nend")


@pytest.mark.parametrize("encoding", sorted(PLANTED))
@pytest.mark.parametrize("value", [random_secret("plant"), *AWKWARD], ids=["random", *range(len(AWKWARD))])
def test_a_planted_leak_is_found(encoding: str, value: str) -> None:
    text = f"2026-12-04 event=read path=secret/app {PLANTED[encoding](value)} done\n"
    leaks = find_leaks({value: "planted"}, [("earlier", "nothing here"), ("log", text)])
    assert leaks, f"the {encoding} form of a secret in a log was not found"
    assert {leak.text_label for leak in leaks} == {"log"}


def test_a_pem_key_in_a_json_log_is_found(tmp_path: Path) -> None:
    pem = "-----BEGIN PRIVATE KEY-----\n" + base64.b64encode(os.urandom(96)).decode() + "\n-----END PRIVATE KEY-----"
    log = json.dumps({"event": "tls", "error": f"bad key {pem}"})
    assert find_leaks({pem: "key"}, [("log", log)])


def test_clean_output_has_no_finding() -> None:
    values = {random_secret("clean"): "t" for _ in range(50)}
    texts = [("log", json.dumps({"event": "wrote", "file": "/run/secrets/db", "mode": "0400"}))]
    texts += [("other", random_secret("unrelated") * 20)]
    assert find_leaks(values, texts) == []


def test_a_leak_is_reported_with_its_text_and_offset() -> None:
    value = random_secret("where")
    texts = [("first", "a" * 100), ("second", "b" * 7 + value)]
    [leak] = [leak for leak in find_leaks({value: "planted"}, texts) if leak.encoding == "raw"]
    assert (leak.text_label, leak.offset) == ("second", 7)


def test_a_match_across_two_texts_is_not_a_leak() -> None:
    value = random_secret("split")
    half = len(value) // 2
    assert find_leaks({value: "planted"}, [("a", value[:half]), ("b", value[half:])]) == []


def test_short_values_are_counted_not_searched() -> None:
    registry = LeakRegistry()
    registry.add_value("short", "test")
    assert (registry.values, registry.too_short) == ({}, 1)


def test_every_needle_is_long_enough_to_mean_something() -> None:
    for value in (random_secret(), *AWKWARD):
        assert all(len(needle) >= figures.MIN_NEEDLE for needle in encodings(value).values())


def test_output_files_register_their_credentials_and_are_not_searched(tmp_path: Path) -> None:
    """A password in the output dir is where it belongs; the same password in status.json is a leak."""
    plugin = figures.current()
    assert plugin is not None, "conftest installs the plugin"
    password, user = f"harvested-{secrets.token_urlsafe(18)}", f"user-{secrets.token_urlsafe(18)}"
    (tmp_path / "db_password").write_text(password)
    (tmp_path / "db_user").write_text(user)  # not a credential: apps print their user names
    (tmp_path / "creds.json").write_text(json.dumps({"username": user, "api_token": password + "x"}))
    (tmp_path / "out" / ".secret-init").mkdir(parents=True)
    (tmp_path / "out" / ".secret-init" / "status.json").write_text(json.dumps({"ok": True, "note": password}))
    (tmp_path / "out" / ".secret-init" / "owner.lock").write_text("")
    (tmp_path / "status.json").write_text(json.dumps({"api_token": password + "y"}))  # an app's file named so
    (tmp_path / "elsewhere").symlink_to("/etc/passwd")
    os.mkfifo(tmp_path / "a_secret_fifo")  # nobody writes to it: opening it must not block
    before = len(plugin.leaks.texts)
    try:
        harvest_output_dir(tmp_path)
        assert plugin.leaks.values.get(password) == "output file:db_password"
        assert plugin.leaks.values.get(password + "x") == "output file:creds.json.api_token"
        assert plugin.leaks.values.get(password + "y") == "output file:status.json.api_token"
        assert user not in plugin.leaks.values
        new_texts = plugin.leaks.texts[before:]
        assert [label.split(":")[0] for label, _ in new_texts] == ["status.json"]
        assert find_leaks({password: "t"}, new_texts), "the planted status.json leak is found"
    finally:
        del plugin.leaks.texts[before:]  # planted on purpose: not a leak of this session


def test_run_cli_output_is_recorded_for_the_hunt() -> None:
    plugin = figures.current()
    assert plugin is not None
    before = len(plugin.leaks.texts)
    run_cli("--help")
    assert [label.split(":")[0] for label, _ in plugin.leaks.texts[before:]] == ["run_cli stdout"]


def test_the_bao_root_token_is_registered(bao: object) -> None:
    plugin = figures.current()
    assert plugin is not None
    assert "bao root token" in plugin.leaks.values.values()


INNER_CONFTEST = """
from tests.figures import install
def pytest_configure(config):
    install(config)
"""

# A leak recorded by a fixture's teardown, after the session's last test: only pytest_sessionfinish sees it.
INNER_TESTS = """
import pytest
from tests.figures import record_output, register_secret
@pytest.fixture(scope="module")
def late_leak():
    value = register_secret("late-" + "Zq8xW3vB9kPm2RtY7nLs4Hd", "planted")
    yield
    record_output(LEAKED_FORM, "teardown log")
def test_passes(late_leak):
    pass
"""


@pytest.mark.parametrize(("leaked_form", "code"), [("f'token={value}'", 1), ("'nothing to see'", 0)])
def test_a_leak_recorded_after_the_last_test_fails_the_session(tmp_path: Path, leaked_form: str, code: int) -> None:
    (tmp_path / "conftest.py").write_text(INNER_CONFTEST)
    (tmp_path / "test_inner.py").write_text(INNER_TESTS.replace("LEAKED_FORM", leaked_form))
    figures_dir = tmp_path / "figures"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        env=base_env(PYTHONPATH=str(REPO), SITEST_FIGURES_DIR=str(figures_dir)),
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == code, result.stdout[-2000:]
    assert ("LEAK HUNT" in result.stdout) == bool(code)
    hunt = json.loads((figures_dir / "leak-hunt.json").read_text())
    assert (hunt["values_collected"], hunt["leaks_found"]) == (1, code)
    assert hunt["texts_searched"] == 1


INNER_HOSTILE_TESTS = """
import sys, subprocess, pytest
from tests.conftest import record_cases, run_cli

@pytest.mark.hostile("config")
@pytest.mark.parametrize("n", [1, 2])
def test_fuzz(n):
    for _ in range(n):
        record_cases("config", 3, [78, 78, 65])

@pytest.mark.hostile("config")
def test_plain_fails():
    assert False

@pytest.mark.hostile("faults")
def test_skipped():
    pytest.skip("not here")

@pytest.mark.hostile("filesystem")
def test_plain_run_cli_codes():
    assert run_cli("no-such-command").returncode == 64

def test_unmarked_fuzz():
    record_cases("signals", 5)

def test_not_hostile():
    pass
"""


def test_hostile_figures_count_tests_cases_and_exit_codes(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(INNER_CONFTEST)
    (tmp_path / "test_inner.py").write_text(INNER_HOSTILE_TESTS)
    figures_dir = tmp_path / "figures"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        env=base_env(PYTHONPATH=str(REPO), SITEST_FIGURES_DIR=str(figures_dir)),
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert "1 failed, 5 passed, 1 skipped" in result.stdout, result.stdout[-2000:]
    hostile = json.loads((figures_dir / "hostile.json").read_text())
    assert hostile["config"] == {
        "tests": {"passed": 2, "failed": 1},
        "cases_tried": 3 + 6 + 1,
        "cases_by_test_outcome": {"passed": 9, "failed": 1},
        "rejected_exit_codes": {"65": 3, "78": 6},
    }
    assert hostile["faults"]["tests"] == {"skipped": 1} and hostile["faults"]["cases_tried"] == 0
    assert hostile["filesystem"]["rejected_exit_codes"] == {"64": 1}
    assert hostile["signals"]["cases_tried"] == 5
    assert set(hostile) == set(figures.HOSTILE_CLASSES)


def test_an_unknown_hostile_class_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(INNER_CONFTEST)
    (tmp_path / "test_inner.py").write_text('import pytest\n@pytest.mark.hostile("sql")\ndef test_x():\n    pass\n')
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        env=base_env(PYTHONPATH=str(REPO), SITEST_FIGURES_DIR=str(tmp_path / "figures")),
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert "'sql'" in result.stderr


@pytest.mark.leak_hunt_last
def test_no_recorded_output_holds_a_secret() -> None:
    """Runs last: every value registered this session, in every encoding, against every recorded output."""
    plugin = figures.current()
    assert plugin is not None
    leaks = find_leaks(plugin.leaks.values, plugin.leaks.texts)
    plugin.hunted = leaks
    assert not leaks, "secret values found in outputs:\n" + "\n".join(map(str, leaks))
