"""Start-up cost: the modules logs.configure defers still work, in full, once something uses them."""

import gc
import os
import subprocess
import sys
from pathlib import Path

from secret_init import cli, logs
from tests.conftest import REPO

USE_EVERY_DEFERRED_MODULE = """
import sys, types
from secret_init import logs

logs.configure("json")
stand_ins = {n for n in logs.DEFERRED if isinstance(sys.modules.get(n), logs._Deferred)}
assert stand_ins == set(logs.DEFERRED), stand_ins

import asyncio, dataclasses, inspect, logging, uuid
import structlog
from inspect import signature  # a from-import reads through the stand-in

@dataclasses.dataclass
class Point:  # no docstring: dataclasses calls inspect.signature for one
    x: int

assert Point.__doc__ == "Point(x: int)", Point.__doc__
assert str(signature(lambda a, b=1: None)) == "(a, b=1)"
assert asyncio.run(asyncio.sleep(0, result=7)) == 7
assert uuid.uuid4().version == 4
logging.getLogger("plain").warning("stdlib logging works")
structlog.stdlib.get_logger("std").info("structlog.stdlib works")
assert issubclass(structlog.stdlib.ProcessorFormatter, logging.Formatter)
import copy, linecache, textwrap
assert copy.deepcopy({"a": [1]}) == {"a": [1]} and textwrap.dedent("  x") == "x"
assert "Logging" in linecache.getline(logs.__file__, 1)
try:
    1 / 0
except ZeroDivisionError:
    structlog.get_logger().error("traceback with source lines", exc_info=True)  # traceback -> linecache
import logging.handlers  # a submodule, imported through its package's stand-in
from asyncio import subprocess as aio_subprocess
assert logging.handlers.RotatingFileHandler and aio_subprocess.PIPE == -1
for name in logs.DEFERRED:
    real = sys.modules[name]
    assert type(real) is types.ModuleType and real.__file__, name
print("ok")
"""

USE_EVERY_VAULT_DEFERRED_MODULE = """
import sys
from secret_init import app, logs

for name in app.VAULT_DEFERRED:
    logs.defer_import(name)
import hvac, requests
assert {n for n in app.VAULT_DEFERRED if isinstance(sys.modules[n], logs._Deferred)} == set(app.VAULT_DEFERRED)

import csv, io, mimetypes, zipfile
import idna
assert idna.encode("bücher.example") == b"xn--bcher-kva.example"
assert "bücher.example".encode("idna") == b"xn--bcher-kva.example"  # nameprep: stringprep
assert requests.Request("GET", "http://bücher.example/").prepare().url == "http://xn--bcher-kva.example/"
assert list(csv.reader(io.StringIO("a,b"))) == [["a", "b"]]
assert mimetypes.guess_type("x.json")[0] == "application/json"
buffer = io.BytesIO()
with zipfile.ZipFile(buffer, "w") as z:
    z.writestr("f", "x")
print("ok")
"""


def test_deferred_modules_load_for_real_on_first_use(tmp_path: Path) -> None:
    """Each stand-in imports its module on first use; code that uses it never sees a difference."""
    script = tmp_path / "use_deferred.py"  # a file, so a traceback can quote its lines
    script.write_text(USE_EVERY_DEFERRED_MODULE)
    result = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert "stdlib logging works" in result.stderr
    assert '"logger": "std"' not in result.stdout  # structlog's JSON lines go to stderr
    assert "1 / 0" in result.stderr  # the logged traceback quotes its source line


def test_vault_path_deferred_modules_load_for_real_on_first_use() -> None:
    """Those deferred before hvac imports requests work when a non-ASCII host or an upload needs them."""
    result = subprocess.run(
        [sys.executable, "-c", USE_EVERY_VAULT_DEFERRED_MODULE], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_missing_module_gets_no_stand_in() -> None:
    """`import` of an optional dependency that is not installed must still fail."""
    logs.defer_import("secret_init_no_such_module")
    assert "secret_init_no_such_module" not in sys.modules


def test_defer_import_leaves_an_imported_module_alone() -> None:
    """A module already imported is never replaced by a stand-in."""
    real = sys.modules["subprocess"]
    logs.defer_import("subprocess")
    assert sys.modules["subprocess"] is real


def test_help_lists_every_command_and_follows_columns(tmp_path: Path) -> None:
    """The help formatter asks os, not shutil, for the width; COLUMNS still wins."""
    narrow = subprocess.run(
        [sys.executable, "-m", "secret_init", "--help"],
        cwd=REPO, capture_output=True, text=True, check=False, env={"COLUMNS": "40", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert narrow.returncode == 0, narrow.stderr
    for command in ("run", "render", "sidecar", "check", "health"):
        assert f"    {command}" in narrow.stdout
    description = "Materialize secrets into tmpfs files, drop root, exec the app."
    assert description not in narrow.stdout  # wrapped at 38 columns
    wide = subprocess.run(
        [sys.executable, "-m", "secret_init", "--help"],
        cwd=REPO, capture_output=True, text=True, check=False, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert description in wide.stdout
    assert max(len(line) for line in wide.stdout.splitlines()) > 80


def test_main_turns_garbage_collection_back_on(tmp_path: Path) -> None:
    """main() pauses collection for the start-up only: a caller gets it back on return."""
    assert gc.isenabled()
    assert cli.main(["health", "--config", str(tmp_path / "missing.toml")]) == 1
    assert gc.isenabled()


OPENSSL_KEPT_OUT_ONLY_WITH_BUILTIN_HASHES = """
import sys
from secret_init import logs

logs.configure("json")  # as the CLI does first: structlog's asyncio (and its ssl) put off
from secret_init import app

missing = sys.argv[1]
real_is_installed = logs.is_installed
logs.is_installed = lambda name: name != missing and real_is_installed(name)
assert "_hashlib" not in sys.modules and "_ssl" not in sys.modules
app.prepare_vault_imports("http://127.0.0.1:8200")
import hashlib, random  # random takes sha512 from hashlib

def state(name):
    return "kept-out" if name in sys.modules and sys.modules[name] is None else "allowed"

print(state("_hashlib"), state("_ssl"), random.random() < 1, hashlib.sha512(b"").digest_size)
"""


def _openssl_states(missing_builtin: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", OPENSSL_KEPT_OUT_ONLY_WITH_BUILTIN_HASHES, missing_builtin],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_openssl_hashes_stay_where_python_has_no_builtin_ones() -> None:
    """Some builds (Fedora's, RHEL's) take every hash from OpenSSL: _hashlib must not be kept out there."""
    assert _openssl_states("_none_") == ["kept-out", "kept-out", "True", "64"], "builtin hashes here: OpenSSL kept out"
    assert _openssl_states("_sha512") == ["allowed", "kept-out", "True", "64"], "hashes need OpenSSL here"
