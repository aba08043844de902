"""Start-up and residency: plain imports, a trimmed import path, and nothing imported once the app runs."""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from secret_init import cli
from tests.conftest import (
    REPO,
    UnixUser,
    base_env,
    free_port,
    log_events,
    needs_root,
    random_secret,
    write_config,
)


def test_help_lists_every_command_and_follows_columns(tmp_path: Path) -> None:
    """argparse's own help formatter, wrapped to COLUMNS."""
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


EVERY_MODULE_IS_REAL = """
import importlib.util, sys, types
from secret_init import cli
code = cli.main(sys.argv[1:])
assert None not in sys.modules.values(), [n for n, m in sys.modules.items() if m is None]
touched = ("asyncio", "inspect", "uuid", "logging", "copy", "linecache", "textwrap", "idna", "zipfile", "csv",
           "mimetypes", "charset_normalizer", "_ssl", "_hashlib")  # what start-up tricks once replaced
fakes = [n for n in touched if n in sys.modules and type(sys.modules[n]) is not types.ModuleType]
assert not fakes, fakes
assert importlib.util.find_spec("uuid") is not None and importlib.util.find_spec("asyncio") is not None
import requests.packages, idna
assert requests.packages.idna is idna, "requests sees the real idna"
print("ok", code)
"""


def test_no_module_is_a_stand_in(tmp_path: Path) -> None:
    """Every entry in sys.modules is a real module after a run: no stand-ins, no None entries."""
    value = random_secret()
    (tmp_path / "s").write_text(value)
    cfg = write_config(
        tmp_path,
        f'[output]\ndir = "{tmp_path / "out"}"\nallow_non_tmpfs = true\n'
        f'[[secret]]\nname = "s"\nsource = "file:{tmp_path / "s"}"\n',
    )
    result = subprocess.run(
        [sys.executable, "-c", EVERY_MODULE_IS_REAL, "render", "--config", str(cfg)],
        cwd=REPO, capture_output=True, text=True, check=False, env=base_env(PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "0"]
    assert (tmp_path / "out" / "s").read_text() == value


def _tree(root: Path, mode: int, owner: int = 0) -> Path:
    """root/a/b, with `mode` and `owner` on root/a."""
    leaf = root / "a" / "b"
    leaf.mkdir(parents=True)
    for path in (root, root / "a", leaf):
        os.chmod(path, 0o755)  # noqa: S103 - the safe case under test
    os.chmod(root / "a", mode)
    os.chown(root / "a", owner, 0)
    return leaf


@pytest.mark.hostile("filesystem")
@needs_root
def test_import_paths_others_could_change_are_forgotten(tmp_path: Path, app_user: UnixUser) -> None:
    """Group- or world-writable, owned by another user, or under such a directory: all dropped."""
    root = tmp_path / "t"
    root.mkdir()
    os.chmod(tmp_path, 0o755)  # noqa: S103 - root-owned and not group-writable: the safe base
    safe = _tree(root / "safe", 0o755)
    group_writable = _tree(root / "group", 0o775)
    others = _tree(root / "other-owner", 0o755, owner=app_user.uid)
    sticky = _tree(root / "sticky", 0o1777)  # /tmp's case: its root-owned entries cannot be replaced
    assert cli._only_root_writes(str(safe))
    assert cli._only_root_writes(str(sticky))
    assert not cli._only_root_writes(str(group_writable)), "under a group-writable parent"
    assert not cli._only_root_writes(str(group_writable.parent)), "group-writable itself"
    assert not cli._only_root_writes(str(others)), "under a directory another user owns"
    assert not cli._only_root_writes(str(root / "missing"))
    link = root / "link"
    link.symlink_to(group_writable)
    assert not cli._only_root_writes(str(link)), "judged by where it leads too"


IMPORTS_AFTER_THE_APP_STARTS = """
import json, sys
started, late = [], []

def hook(event, args):
    if event == "subprocess.Popen":
        started.append(True)
    elif event == "import" and started:
        late.append(args[0])

sys.addaudithook(hook)
from secret_init import cli
code = cli.main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump({"started": bool(started), "late": sorted(set(late))}, f)
sys.exit(code)
"""


@pytest.mark.hostile("app-user")
@needs_root
def test_a_supervisor_imports_nothing_once_the_app_runs(tmp_path: Path, app_user: UnixUser) -> None:
    """Every module the supervisor needs (psutil at shutdown, status, renewal) is imported before the app starts."""
    (tmp_path / "s").write_text(random_secret())
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path,
        f'[output]\ndir = "{out}"\nuser = "{app_user.name}"\nallow_non_tmpfs = true\n'
        f'[process]\nsupervise = true\n[[secret]]\nname = "s"\nsource = "file:{tmp_path / "s"}"\n',
    )
    report = tmp_path / "imports.json"
    result = subprocess.run(
        [sys.executable, "-c", IMPORTS_AFTER_THE_APP_STARTS, str(report), "run", "--config", str(cfg), "--",
         "/bin/sh", "-c", "sleep 0.2 & exit 3"],
        cwd=REPO, capture_output=True, text=True, check=False, env=base_env(PYTHONPATH=str(REPO)), timeout=60,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    events = [e["event"] for e in log_events(result.stderr)]
    assert "app exited" in events and "supervisor exiting" in events
    imports = json.loads(report.read_text())
    assert imports["started"], "the hook saw the app start"
    assert imports["late"] == [], f"imported as root after the app started: {imports['late']}"


SCRAPE_THEN_EXIT = """
import sys, urllib.request
body = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
sys.exit(3 if "secret_init_rotations_total" in body else 9)
"""


@pytest.mark.hostile("app-user")
@needs_root
def test_a_supervisor_serving_metrics_imports_nothing_once_the_app_runs(tmp_path: Path, app_user: UnixUser) -> None:
    """The exporter (prometheus-client, wsgiref, the HTTP parsing of a scrape) is imported before the app starts."""
    (tmp_path / "s").write_text(random_secret())
    port = free_port()
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path,
        f'[output]\ndir = "{out}"\nuser = "{app_user.name}"\nallow_non_tmpfs = true\n'
        f'[process]\nsupervise = true\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
        f'[[secret]]\nname = "s"\nsource = "file:{tmp_path / "s"}"\n',
    )
    report = tmp_path / "imports.json"
    result = subprocess.run(
        [sys.executable, "-c", IMPORTS_AFTER_THE_APP_STARTS, str(report), "run", "--config", str(cfg), "--",
         "/usr/bin/python3", "-c", SCRAPE_THEN_EXIT, str(port)],
        cwd=REPO, capture_output=True, text=True, check=False, env=base_env(PYTHONPATH=str(REPO)), timeout=60,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr  # 3: the app's scrape was answered with the metrics
    imports = json.loads(report.read_text())
    assert imports["started"], "the hook saw the app start"
    assert imports["late"] == [], f"imported as root after the app started: {imports['late']}"


@pytest.mark.hostile("filesystem")
@needs_root
def test_a_library_found_only_on_a_path_others_could_change_is_a_clear_error(tmp_path: Path) -> None:
    """structlog reachable only through a group-writable directory: exit 78 and one line naming it, no traceback."""
    import structlog

    untrusted = tmp_path / "untrusted"
    untrusted.mkdir(mode=0o775)
    os.chmod(untrusted, 0o775)  # noqa: S103 - the group-writable case under test
    os.symlink(Path(structlog.__file__).parent, untrusted / "structlog")
    result = subprocess.run(
        [sys.executable, "-S", "-m", "secret_init", "render", "--config", str(tmp_path / "none.toml")],
        cwd=REPO, capture_output=True, text=True, check=False,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO}:{untrusted}"},
    )  # fmt: skip
    assert result.returncode == 78, result.stderr
    assert "cannot import structlog" in result.stderr and str(untrusted) in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
