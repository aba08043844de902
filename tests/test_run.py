"""The real CLI end to end with swarm: and file: sources: materialize, drop, exec, exit codes."""

import json
import os
import re
import resource
import signal
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    REPO,
    UnixUser,
    app_command,
    assert_no_leak,
    base_env,
    free_port,
    log_events,
    needs_root,
    random_secret,
    record_output,
    run_cli,
    secret_files,
    write_config,
)

pytestmark = needs_root


class Scene:
    """A swarm dir and a file source holding fresh random secrets, and an output dir on tmpfs."""

    def __init__(self, tmpfs: Path, workdir: Path) -> None:
        self.swarm = tmpfs / "run-secrets"
        self.swarm.mkdir()
        self.out = tmpfs / "app-secrets"
        self.workdir = workdir
        self.db_password = random_secret("db")
        self.api_key = random_secret("api")
        (self.swarm / "db_password").write_text(self.db_password)
        self.api_file = workdir / "api.key"
        self.api_file.write_text(self.api_key)

    def config(self, output_extra: str = "", process: str = "", secrets_extra: str = "") -> Path:
        return write_config(
            self.workdir,
            f"""
[output]
dir = "{self.out}"
{output_extra}

[process]
{process}

[[secret]]
name = "db_password"
source = "swarm:db_password"
env = "DB_PASSWORD_FILE"

[[secret]]
name = "api.key"
source = "file:{self.api_file}"
env = "API_KEY_FILE"
{secrets_extra}
""",
        )

    def env(self, **extra: str) -> dict[str, str]:
        return base_env(SECRET_INIT_SWARM_DIR=str(self.swarm), **extra)


@pytest.fixture
def scene(tmpfs: Path, workdir: Path) -> Scene:
    return Scene(tmpfs, workdir)


CORE_LIMIT = 4096


def _core_limit_for_test() -> None:
    """A known core limit: secret-init runs with 0 and must hand this back to the app."""
    resource.setrlimit(resource.RLIMIT_CORE, (CORE_LIMIT, resource.getrlimit(resource.RLIMIT_CORE)[1]))


def run_probe(scene: Scene, cfg: Path, probe: list[str], env: dict[str, str]) -> tuple[dict[str, Any], str, str]:
    """Start secret-init with Popen so the test knows its pid, and return the probe's report."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "secret_init", "run", "--config", str(cfg), "--", *probe, str(scene.out), "--flag"],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_core_limit_for_test,
    )  # fmt: skip
    stdout, stderr = proc.communicate(timeout=60)
    record_output(stdout, "app stdout through secret-init")
    record_output(stderr, "secret-init stderr")
    assert proc.returncode == 0, stderr
    report = json.loads(stdout)
    assert report["pid"] == proc.pid, "the app must replace secret-init (exec), not run as its child"
    return report, stdout, stderr


@pytest.mark.hostile("app-user")
def test_run_materializes_drops_and_execs(scene: Scene, app_user: UnixUser, probe: list[str]) -> None:
    """The app runs as the user, cannot regain root, sees paths in *_FILE and no Vault settings."""
    cfg = scene.config(f'user = "{app_user.name}"', 'scrub_env = ["INTERNAL_*", "EXTRA_SECRET"]')
    env = scene.env(
        VAULT_TOKEN=random_secret("tok"),
        BAO_ADDR="http://127.0.0.1:1",
        INTERNAL_DEBUG="1",
        EXTRA_SECRET="x",
        DB_PASSWORD=scene.db_password,  # an env-var copy of a materialized secret is removed
        KEEP_ME="yes",
    )
    report, stdout, stderr = run_probe(scene, cfg, probe, env)

    assert report["resuid"] == [app_user.uid] * 3
    assert report["resgid"] == [app_user.gid] * 3
    assert set(report["groups"]) == {app_user.gid, app_user.extra_gid}
    assert report["setuid0"] == "denied"
    assert report["no_new_privs"] == "1"
    assert int(report["cap_eff"], 16) == 0
    assert report["core_limit"][0] == CORE_LIMIT, "the app gets its core limit back"
    assert report["argv"][-1] == "--flag"

    child_env = report["env"]
    assert not [k for k in child_env if k.startswith(("VAULT_", "BAO_", "SECRET_INIT_"))]
    assert "INTERNAL_DEBUG" not in child_env and "EXTRA_SECRET" not in child_env
    assert "DB_PASSWORD" not in child_env
    assert child_env["KEEP_ME"] == "yes"
    assert child_env["DB_PASSWORD_FILE"] == f"{scene.out}/db_password"
    assert child_env["API_KEY_FILE"] == f"{scene.out}/api.key"
    assert (child_env["HOME"], child_env["USER"], child_env["LOGNAME"]) == (app_user.home, app_user.name, app_user.name)

    assert report["files"]["DB_PASSWORD_FILE"] == {
        "path": f"{scene.out}/db_password", "readable": True, "bytes": len(scene.db_password)
    }  # fmt: skip
    assert report["files"]["API_KEY_FILE"]["readable"]
    assert report["create_in_dir"] == "Permission denied"
    assert report["unlink_file"] == "Permission denied"
    assert report["listing"] == ["api.key", "db_password"]

    for name in ("db_password", "api.key"):
        st = (scene.out / name).stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (app_user.uid, app_user.gid, 0o400)
    assert (scene.out / "db_password").read_text() == scene.db_password
    assert_no_leak(stdout + stderr, scene.db_password, scene.api_key, env["VAULT_TOKEN"])

    on_disk = [e["secret"] for e in log_events(stderr) if e["event"].startswith("source file is on a disk")]
    assert on_disk == ["api.key"], "the file source under /tmp is on disk; the swarm one is on tmpfs"
    events = [e["event"] for e in log_events(stderr)]
    for expected in ("config loaded", "source read", "file written", "privileges dropped", "exec"):
        assert expected in events


def test_bare_uid_gid_gets_no_supplementary_groups(scene: Scene, probe: list[str]) -> None:
    """A uid with no passwd entry: no groups, HOME=/, and root's USER/LOGNAME do not pass through."""
    cfg = scene.config('user = "54321:54321"')
    report, _, _ = run_probe(scene, cfg, probe, scene.env(USER="root", LOGNAME="root", HOME="/root"))
    assert report["resuid"] == [54321] * 3
    assert report["resgid"] == [54321] * 3
    assert report["groups"] == []
    assert report["setuid0"] == "denied"
    assert report["env"]["HOME"] == "/"
    assert "USER" not in report["env"] and "LOGNAME" not in report["env"]


@pytest.mark.hostile("config")
def test_root_app_is_refused_unless_allowed(scene: Scene, probe: list[str]) -> None:
    refused = run_cli("run", "--config", str(scene.config()), "--", "/bin/true", env=scene.env())
    assert refused.returncode == 77, refused.stderr
    assert "refusing to run the app as root" in refused.stderr
    assert not scene.out.exists()
    allowed = scene.config(process="allow_root = true")
    report, _, _ = run_probe(scene, allowed, probe, scene.env())
    assert report["resuid"] == [0, 0, 0]


def test_per_secret_mode_and_owner(scene: Scene, app_user: UnixUser) -> None:
    extra = (
        '\n[[secret]]\nname = "shared"\nsource = "swarm:db_password"\nmode = "0440"\nuser = "65534:'
        + str(app_user.gid)
        + '"\n'
    )
    result = run_cli("render", "--config", str(scene.config(f'user = "{app_user.name}"', secrets_extra=extra)),
                     env=scene.env())  # fmt: skip
    assert result.returncode == 0, result.stderr
    st = (scene.out / "shared").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, app_user.gid, 0o440)


def test_render_twice_leaves_unchanged_files_alone(scene: Scene, app_user: UnixUser) -> None:
    cfg = scene.config(f'user = "{app_user.name}"')
    assert run_cli("render", "--config", str(cfg), env=scene.env()).returncode == 0
    inode = (scene.out / "db_password").stat().st_ino
    second = run_cli("render", "--config", str(cfg), env=scene.env())
    assert second.returncode == 0
    assert (scene.out / "db_password").stat().st_ino == inode
    unchanged = [e for e in log_events(second.stderr) if e["event"] == "file unchanged"]
    assert len(unchanged) == 2


def _replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


@pytest.mark.hostile("config")
@pytest.mark.parametrize(
    ("mutate", "code", "message"),
    [
        (lambda s: (s.swarm / "db_password").unlink(), 66, "does not exist"),
        (lambda s: _replace_with_fifo(s.swarm / "db_password"), 66, "not a regular"),
        (lambda s: s.api_file.write_bytes(b"x" * 2_000_000), 65, "larger than max_secret_size"),
    ],
)
def test_bad_sources_fail_without_writing_anything(
    scene: Scene, app_user: UnixUser, mutate: Any, code: int, message: str
) -> None:
    mutate(scene)
    result = run_cli("render", "--config", str(scene.config(f'user = "{app_user.name}"')), env=scene.env())
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert next(e for e in log_events(result.stderr) if e["level"] == "error")["exit_code"] == code
    assert secret_files(scene.out) == []


@pytest.mark.hostile("config")
def test_every_failing_source_is_reported_and_the_first_sets_the_code(
    scene: Scene, app_user: UnixUser, bao_unreachable_addr: str
) -> None:
    """A missing swarm file, an oversized file and an unreachable Vault: three errors in one run, exit 66."""
    (scene.swarm / "db_password").unlink()
    scene.api_file.write_bytes(b"x" * 2_000_000)
    vault = '[[secret]]\nname = "kv"\nsource = "vault:secret/data/app#k"\n'
    cfg = scene.config(f'user = "{app_user.name}"', secrets_extra=vault)
    cfg.write_text(cfg.read_text() + f'[vault]\naddr = "{bao_unreachable_addr}"\nstartup_timeout = "1s"\n')
    result = run_cli("render", "--config", str(cfg), env=scene.env(VAULT_TOKEN=random_secret("tok")))
    assert result.returncode == 66, result.stderr
    errors = [e for e in log_events(result.stderr) if e["level"] == "error"]
    assert sorted(e["exit_code"] for e in errors) == [65, 66, 69], errors
    assert errors[-1]["exit_code"] == 66 and "db_password" in errors[-1]["event"], "the first in config order"
    assert secret_files(scene.out) == []


@pytest.fixture
def bao_unreachable_addr() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.mark.hostile("filesystem")
def test_non_tmpfs_output_is_refused(scene: Scene, disk_dir: Path, app_user: UnixUser) -> None:
    scene.out = disk_dir / "out"
    result = run_cli("render", "--config", str(scene.config(f'user = "{app_user.name}"')), env=scene.env())
    assert result.returncode == 77
    assert "not tmpfs" in result.stderr and "mounted at" in result.stderr
    assert not scene.out.exists()
    allowed = scene.config(f'user = "{app_user.name}"\nallow_non_tmpfs = true')
    assert run_cli("render", "--config", str(allowed), env=scene.env()).returncode == 0
    assert (scene.out / "db_password").read_text() == scene.db_password


@pytest.mark.hostile("config")
@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["run", "--"], 64, "run needs a command"),
        (["frobnicate"], 64, "invalid choice"),
        (["run", "--", "/nonexistent/app"], 127, "not found"),
        (["run", "--", "no-such-command-anywhere"], 127, "not found"),
    ],
)
def test_exit_codes(scene: Scene, app_user: UnixUser, args: list[str], code: int, message: str) -> None:
    cfg = scene.config(f'user = "{app_user.name}"')
    if args[0] != "frobnicate":
        args = [args[0], "--config", str(cfg), *args[1:]]
    result = run_cli(*args, env=scene.env())
    assert result.returncode == code, result.stderr
    assert message in result.stderr


@pytest.mark.hostile("config")
def test_not_executable_is_126(scene: Scene, app_user: UnixUser) -> None:
    script = scene.workdir / "not-executable.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    cfg = scene.config(f'user = "{app_user.name}"')
    result = run_cli("run", "--config", str(cfg), "--", str(script), env=scene.env())
    assert result.returncode == 126, result.stderr


@pytest.mark.hostile("config")
def test_unknown_user_is_67(scene: Scene) -> None:
    result = run_cli("render", "--config", str(scene.config('user = "no-such-user-xyz"')), env=scene.env())
    assert result.returncode == 67
    assert "no-such-user-xyz" in result.stderr


@pytest.mark.hostile("config")
def test_config_errors_are_78_and_one_line(scene: Scene) -> None:
    cfg = scene.config(secrets_extra='\n[[secret]]\nname = "../escape"\nsource = "swarm:x"\n')
    result = run_cli("render", "--config", str(cfg), env=scene.env())
    assert result.returncode == 78
    errors = [e for e in log_events(result.stderr) if e["level"] == "error"]
    assert len(errors) == 1 and "without '/'" in errors[0]["event"]
    assert len(result.stderr.strip().splitlines()) == 1
    missing = run_cli("render", env=base_env(SECRET_INIT_CONFIG=str(scene.workdir / "absent.toml")))
    assert missing.returncode == 78 and "absent.toml does not exist" in missing.stderr


def test_check_reports_rows_and_writes_nothing(scene: Scene, app_user: UnixUser) -> None:
    cfg = scene.config(f'user = "{app_user.name}"')
    good = run_cli("check", "--config", str(cfg), env=scene.env())
    assert good.returncode == 0, good.stdout + good.stderr
    lines = good.stdout.splitlines()
    assert lines[0].split() == ["NAME", "SOURCE", "FILE", "MODE", "OWNER", "STATUS"]
    db_row = next(line for line in lines if line.startswith("db_password"))
    assert db_row.split() == [
        "db_password", "swarm:db_password", f"{scene.out}/db_password", "0400", f"{app_user.uid}:{app_user.gid}", "ok"
    ]  # fmt: skip
    assert not scene.out.exists()
    assert_no_leak(good.stdout + good.stderr, scene.db_password, scene.api_key)

    (scene.swarm / "db_password").unlink()
    bad = run_cli("check", "--config", str(cfg), env=scene.env())
    assert bad.returncode == 66
    assert "does not exist" in next(line for line in bad.stdout.splitlines() if line.startswith("db_password"))


@pytest.mark.hostile("filesystem")
def test_check_reports_a_non_tmpfs_dir(scene: Scene, disk_dir: Path, app_user: UnixUser) -> None:
    scene.out = disk_dir / "out"
    result = run_cli("check", "--config", str(scene.config(f'user = "{app_user.name}"')), env=scene.env())
    assert result.returncode == 77
    assert "not tmpfs" in next(line for line in result.stdout.splitlines() if line.startswith("(output dir)"))


def test_files_only_start_does_not_import_hvac(scene: Scene, app_user: UnixUser) -> None:
    """`python -X importtime` is the judge: no hvac, requests or urllib3 without a vault: source."""
    cfg = scene.config(f'user = "{app_user.name}"')
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "secret_init", "render", "--config", str(cfg)],
        env=scene.env(), cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "secret_init.sink" in imported  # the measurement itself works
    assert not {m for m in imported if m.split(".")[0] in ("hvac", "requests", "urllib3")}


def test_health_is_fast_and_imports_no_vault_or_logging(scene: Scene, app_user: UnixUser) -> None:
    cfg = scene.config(f'user = "{app_user.name}"')
    missing = run_cli("health", "--config", str(cfg), env=scene.env())
    assert missing.returncode == 1 and "does not exist" in missing.stdout
    assert run_cli("render", "--config", str(cfg), env=scene.env()).returncode == 0
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "secret_init", "health", "--config", str(cfg)],
        env=scene.env(), cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == "healthy"
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "secret_init.status" in imported
    assert not {m for m in imported if m.split(".")[0] in ("hvac", "requests", "structlog", "tenacity")}


def _pythonpath() -> str:
    paths = sysconfig.get_paths()
    return f"{REPO}:{paths['purelib']}:{paths['platlib']}"


def as_user(user: UnixUser, *argv: str) -> list[str]:
    return ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups", *argv]


@pytest.fixture
def user_can_run_secret_init(app_user: UnixUser) -> str:
    """PYTHONPATH with which the unprivileged user runs this checkout under Debian's python."""
    pythonpath = _pythonpath()
    check = subprocess.run(
        as_user(app_user, "/usr/bin/python3", "-c", "import secret_init.cli, structlog, hvac"),
        env=base_env(PYTHONPATH=pythonpath), capture_output=True, check=False,
    )  # fmt: skip
    if check.returncode != 0:
        pytest.skip("the app user cannot reach this checkout's Python packages")
    return pythonpath


def test_without_root_files_belong_to_the_caller_and_no_drop_happens(
    scene: Scene, app_user: UnixUser, probe: list[str], user_can_run_secret_init: str
) -> None:
    """Started as the app user (like `docker run --user`), secret-init writes files as itself."""
    os.chown(scene.swarm / "db_password", app_user.uid, app_user.gid)
    os.chown(scene.out.parent, app_user.uid, app_user.gid)

    def run_as_user(cfg: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            as_user(app_user, "/usr/bin/python3", "-m", "secret_init", "run", "--config", str(cfg), "--",
                    *probe, str(scene.out)),
            env=scene.env(PYTHONPATH=user_can_run_secret_init), cwd=REPO, capture_output=True, text=True, check=False,
        )  # fmt: skip

    result = run_as_user(scene.config())
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["resuid"] == [app_user.uid] * 3
    assert report["no_new_privs"] == "1"
    st = (scene.out / "db_password").stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (app_user.uid, 0o400)
    assert stat.S_IMODE(scene.out.stat().st_mode) == 0o700

    other = run_as_user(scene.config('user = "65534:65534"'))
    assert other.returncode == 77
    assert "without root" in other.stderr


@pytest.mark.hostile("app-user")
def test_same_uid_cannot_read_secret_init_memory_or_environ(
    scene: Scene, app_user: UnixUser, user_can_run_secret_init: str
) -> None:
    """While secret-init holds a token, a process of the same uid cannot read its /proc files.

    secret-init runs as the unprivileged user and waits on a Vault that is down, with its
    token in VAULT_TOKEN; another process of that user then tries /proc/PID/environ.
    """
    token = random_secret("tok")
    cfg = write_config(
        scene.workdir,
        f'[output]\ndir = "{scene.out}"\n[vault]\naddr = "http://127.0.0.1:{free_port()}"\n'
        'startup_timeout = "4s"\n[[secret]]\nname = "k"\nsource = "vault:secret/data/x#k"\n',
    )
    os.chown(scene.out.parent, app_user.uid, app_user.gid)
    proc = subprocess.Popen(
        as_user(app_user, "/usr/bin/python3", "-m", "secret_init", "render", "--config", str(cfg)),
        env=scene.env(PYTHONPATH=user_can_run_secret_init, VAULT_TOKEN=token), cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_core_limit_for_test,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        seen = ""
        while "retrying" not in seen:  # secret-init is past start-up and holds the token
            line = proc.stderr.readline()
            assert line, f"secret-init ended early: {seen}"
            seen += line
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        assert re.search(r"Max core file size\s+0\s", limits), "core dumps are off while secrets are held"
        peek = subprocess.run(as_user(app_user, "cat", f"/proc/{proc.pid}/environ"), capture_output=True, check=False)
        assert peek.returncode != 0 and b"Permission denied" in peek.stderr
        assert token.encode() not in peek.stdout
    finally:
        _, rest = proc.communicate(timeout=30)
    assert proc.returncode == 69, seen + rest
    assert_no_leak(seen + rest, token)


@pytest.mark.hostile("filesystem")
def test_full_output_tmpfs_is_73_and_keeps_old_files(small_tmpfs: Path, workdir: Path, app_user: UnixUser) -> None:
    big = workdir / "big"
    big.write_bytes(os.urandom(200_000))
    small = workdir / "small"
    small.write_text("v1")
    out = small_tmpfs / "out"
    body = f'[[secret]]\nname = "small"\nsource = "file:{small}"\n'
    cfg = write_config(workdir, f'[output]\ndir = "{out}"\nuser = "{app_user.name}"\n{body}')
    assert run_cli("render", "--config", str(cfg)).returncode == 0
    small.write_text("v2")
    cfg.write_text(cfg.read_text() + f'[[secret]]\nname = "big"\nsource = "file:{big}"\n')
    result = run_cli("render", "--config", str(cfg))
    assert result.returncode == 73, result.stderr
    errors = [e for e in log_events(result.stderr) if e["level"] == "error"]
    assert len(errors) == 1 and "No space left on device" in errors[0]["event"]
    assert secret_files(out) == ["small"]
    assert (out / "small").read_text() == "v1"


def test_version_and_console_log_format(scene: Scene, app_user: UnixUser) -> None:
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("secret-init ")
    cfg = scene.config(f'user = "{app_user.name}"')
    result = run_cli("--log-format", "console", "render", "--config", str(cfg), env=scene.env())
    assert result.returncode == 0, result.stderr
    assert log_events(result.stderr) == []  # no JSON lines
    assert "config loaded" in result.stderr and "file written" in result.stderr
    quiet = run_cli("render", "--config", str(cfg), "--log-level", "error", env=scene.env())
    assert quiet.returncode == 0 and quiet.stderr == ""


LIMITS_APP = """
import json, os, resource
with open(f"/proc/{os.getppid()}/limits") as f:
    core = next(line for line in f if line.startswith("Max core file size"))
print(json.dumps({"pid": os.getpid(), "core_limit": resource.getrlimit(resource.RLIMIT_CORE)[0],
                  "supervisor_core_soft": core.split()[4]}))
"""


def test_a_supervised_app_gets_its_core_limit_back(scene: Scene, app_user: UnixUser, workdir: Path) -> None:
    """As on the exec path, the app gets the limit it was started with; the supervisor keeps 0."""
    cfg = scene.config(f'user = "{app_user.name}"', "supervise = true")
    proc = subprocess.Popen(
        [sys.executable, "-m", "secret_init", "run", "--config", str(cfg), "--",
         *app_command(workdir, "limits", LIMITS_APP)],
        env=scene.env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_core_limit_for_test,
    )  # fmt: skip
    stdout, stderr = proc.communicate(timeout=60)
    record_output(stdout, "app stdout through secret-init")
    record_output(stderr, "secret-init stderr")
    assert proc.returncode == 0, stderr
    report = json.loads(stdout)
    assert report["pid"] != proc.pid, "supervised: the app is a child, not an exec"
    assert report["core_limit"] == CORE_LIMIT
    assert report["supervisor_core_soft"] == "0"


STOP_DURING_RESTART = """
import json, signal, sys, threading, time
from queue import SimpleQueue
from secret_init.supervisor import Supervisor

app = sys.argv[1:]  # the last argument is the app's readiness file
ready = app[-1]
sup = Supervisor(SimpleQueue())
first = sup.start(app, {"PATH": "/usr/bin:/bin"}, None)
for _ in range(500):  # the app's readiness file: its handlers are in place
    try:
        open(ready).close()
        break
    except OSError:
        time.sleep(0.01)
threading.Timer(0.3, sup._enqueue, (signal.SIGTERM, None)).start()  # as the handler would, mid-restart
began = time.monotonic()
restarted = sup.restart(app, {"PATH": "/usr/bin:/bin"}, None, signal.SIGUSR1, 5.0)
print(json.dumps({"restarted": restarted, "seconds": time.monotonic() - began, "same_pid": sup.pid == first,
                  "status": sup.exit_status}))
"""

STUBBORN_APP = """
import signal, sys, time
signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # ignores the configured stop_signal; dies of SIGTERM
open(sys.argv[1], "w").close()
time.sleep(60)
"""


@pytest.mark.hostile("signals")
def test_a_stop_requested_during_a_restart_is_acted_on_at_once(workdir: Path) -> None:
    """SIGTERM mid-restart: forwarded at once, no new app started, no wait for stop_timeout (5 s)."""
    ready = workdir / "ready"
    app = app_command(workdir, "stubborn", STUBBORN_APP)
    result = subprocess.run(
        [sys.executable, "-c", STOP_DURING_RESTART, *app, str(ready)],
        cwd=REPO, capture_output=True, text=True, check=False, env=base_env(PYTHONPATH=str(REPO)), timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])  # after structlog's default output
    assert report["restarted"] is False and report["same_pid"], "no new app once a stop is requested"
    assert os.WTERMSIG(report["status"]) == signal.SIGTERM, "the forwarded SIGTERM ended the old app"
    assert report["seconds"] < 2.5, "the stop did not wait out stop_timeout"
