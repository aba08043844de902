"""The image on a real Docker engine: hardened `docker run`, a Swarm service, a Compose sidecar.

Everything stays on loopback: containers use `--network host` (or none), nothing is
published, and the engine has no bridge. The engine, the swarm and every container are
torn down by the fixtures.
"""

import json
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PROBE, REPO, Bao, Database, assert_no_leak, random_secret
from tests.engine import Engine, build_image, running_engine
from tests.test_leases import DB_APP

HARDENED = [
    "--pull", "never", "--read-only", "--cap-drop", "ALL",
    "--cap-add", "CHOWN", "--cap-add", "SETUID", "--cap-add", "SETGID",
    "--security-opt", "no-new-privileges",
]  # fmt: skip


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with running_engine() as engine:
        yield engine


@pytest.fixture(scope="module")
def image(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_image(engine, tmp_path_factory.mktemp("image"))


@pytest.fixture
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A world-readable dir for files the containers mount."""
    path = tmp_path_factory.mktemp("shared")
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        line = line[line.find("{") :] if "{" in line else ""
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def test_image_runs_hardened(engine: Engine, image: str, shared: Path) -> None:
    """Read-only rootfs, only CHOWN/SETUID/SETGID, no-new-privileges, a tmpfs for the files."""
    value = random_secret("img")
    (shared / "app_secret").write_text(value)
    (shared / "probe.py").write_text(PROBE)
    token = random_secret("tok")
    result = engine.docker(
        "run", "--rm", "--network", "none", *HARDENED,
        "--tmpfs", "/run/app-secrets:mode=1777,size=1m",
        "-v", f"{shared}/app_secret:/run/secrets/app_secret:ro",
        "-v", f"{shared}/probe.py:/probe.py:ro",
        "-e", f"VAULT_TOKEN={token}", "-e", "BAO_ADDR=http://127.0.0.1:1",
        image, "python3", "/probe.py", "/run/app-secrets",
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json_lines(result.stdout)[-1]
    assert report["resuid"] == [10001] * 3 and report["resgid"] == [10001] * 3
    assert report["setuid0"] == "denied"
    assert report["no_new_privs"] == "1"
    assert not [k for k in report["env"] if k.startswith(("VAULT_", "BAO_", "SECRET_INIT_"))]
    assert report["env"]["APP_SECRET_FILE"] == "/run/app-secrets/app_secret"
    assert report["stat"] == {"app_secret": [0o400, 10001]}
    assert report["create_in_dir"] == "Permission denied"
    # A bind-mounted file secret is on the host's disk: secret-init says so.
    assert any(e.get("event", "").startswith("source file is on a disk") for e in json_lines(result.stderr))
    assert_no_leak(result.stdout + result.stderr, value, token)


def test_image_refuses_a_disk_output_dir(engine: Engine, image: str, shared: Path) -> None:
    (shared / "app_secret").write_text(random_secret())
    result = engine.docker(
        "run", "--rm", "--network", "none", "--pull", "never",
        "-v", f"{shared}/app_secret:/run/secrets/app_secret:ro", image, "true",
        check=False,
    )  # fmt: skip
    assert result.returncode == 77
    assert "not tmpfs" in result.stderr


@pytest.fixture
def swarm(engine: Engine) -> Iterator[Engine]:
    engine.docker("swarm", "init", "--advertise-addr", "127.0.0.1", "--listen-addr", "127.0.0.1:2377")
    try:
        yield engine
    finally:
        engine.docker("swarm", "leave", "--force", check=False)
        engine.docker("network", "rm", "docker_gwbridge", check=False)


def test_swarm_service_with_approle_and_rotating_db_credentials(
    swarm: Engine, image: str, database: Database, shared: Path
) -> None:
    """AppRole credentials and a static password arrive as Swarm secrets; DB credentials rotate inside."""
    bao: Bao = database.bao
    creds = database.role("3s", "9s")
    role_id = bao.client.auth.approle.read_role_id("app")["data"]["role_id"]
    secret_id = bao.client.auth.approle.generate_secret_id("app")["data"]["secret_id"]
    password = random_secret("static")
    tag = secrets.token_hex(3)
    for name, value in (("vault_role_id", role_id), ("vault_secret_id", secret_id), ("static_password", password)):
        swarm.docker("secret", "create", f"{name}_{tag}", "-", input=value)
    config = f"""
[output]
dir = "/run/app-secrets"
user = "app"
[vault]
addr = "{bao.addr}"
auth = "approle"
role_id_file = "/run/secrets/vault_role_id"
secret_id_file = "/run/secrets/vault_secret_id"
request_timeout = "2s"
[process]
stop_timeout = "2s"
[[secret]]
name = "static_password"
source = "swarm:static_password"
[[secret]]
name = "db_user"
source = "vault:{creds}#username"
env = "DB_USER_FILE"
[[secret]]
name = "db_password"
source = "vault:{creds}#password"
env = "DB_PASSWORD_FILE"
"""
    swarm.docker("config", "create", f"si_config_{tag}", "-", input=config)
    (shared / "db_app.py").write_text(DB_APP)
    service = f"si-app-{tag}"
    swarm.docker(
        "service", "create", "--detach", "--name", service, "--no-resolve-image", "--network", "host",
        "--restart-condition", "none",
        "--secret", f"source=vault_role_id_{tag},target=vault_role_id,mode=0400",
        "--secret", f"source=vault_secret_id_{tag},target=vault_secret_id,mode=0400",
        "--secret", f"source=static_password_{tag},target=static_password,mode=0400",
        "--config", f"source=si_config_{tag},target=/etc/secret-init/config.toml,mode=0444",
        "--mount", "type=tmpfs,destination=/run/app-secrets",
        "--mount", f"type=bind,source={shared}/db_app.py,destination=/db_app.py,readonly",
        image, "python3", "/db_app.py", str(database.pg.port),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        app: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            logs = swarm.docker("service", "logs", "--raw", service, check=False)
            app = [e for e in json_lines(logs.stdout + logs.stderr) if "level" not in e and "event" in e]
            if len([e for e in app if e["event"] == "start"]) >= 3:
                break
            time.sleep(1)
        starts = [e for e in app if e["event"] == "start"]
        assert len(starts) >= 3, f"fewer than two rotations: {logs.stdout[-2000:]}{logs.stderr[-2000:]}"
        probes = [e for e in app if e["event"] == "probe"]
        assert probes and [p for p in probes if not p["ok"]] == []
        assert len({s["user"] for s in starts}) == len(starts)
        everything = logs.stdout + logs.stderr
        assert_no_leak(everything, secret_id, password)
        sources = [e for e in json_lines(everything) if e.get("event") == "source read"]
        assert {"static_password", "db_user", "db_password"} <= {e["secret"] for e in sources}
    finally:
        swarm.docker("service", "rm", service, check=False)
    deadline = time.monotonic() + 30
    while database.leases(creds) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert database.leases(creds) == [], "the task's secret-init revoked its lease when the service was removed"


def test_compose_sidecar_fills_a_shared_tmpfs_and_stays_the_only_owner(
    engine: Engine, image: str, database: Database, shared: Path
) -> None:
    """compose/sidecar.yml with this machine's overrides: the suite's OpenBao and PostgreSQL on
    127.0.0.1, host networking, the test image. The app waits for the sidecar to be healthy,
    becomes healthy itself, and keeps working across rotations; a second sidecar is refused."""
    bao = database.bao
    creds = database.role("3s", "9s")
    project = shared / "compose"
    shutil.copytree(REPO / "compose", project)
    (project / "postgres_password.txt").write_text(random_secret())
    approle = shared / "approle"
    approle.mkdir()
    (approle / "vault_role_id").write_text(bao.client.auth.approle.read_role_id("app")["data"]["role_id"])
    secret_id = bao.client.auth.approle.generate_secret_id("app")["data"]["secret_id"]
    (approle / "vault_secret_id").write_text(secret_id)
    (project / "sidecar.toml").write_text(
        (project / "sidecar.toml")
        .read_text()
        .replace("http://openbao:8200", bao.addr)
        .replace("database/creds/app", creds)
        + '\n[process]\nstop_timeout = "2s"\n'
    )
    (shared / "db_app.py").write_text(DB_APP)
    override = project / "override.test.yml"
    override.write_text(f"""
services:
  secret-init:
    image: {image}
    build: !reset null
    pull_policy: never
    network_mode: host
    depends_on: !reset {{}}
    volumes:
      - {approle}:/run/secrets:ro
  app:
    image: {image}
    build: !reset null
    pull_policy: never
    network_mode: host
    environment:
      DB_JSON_FILE: /run/app-secrets/db.json
    entrypoint: ["python3", "/db_app.py", "{database.pg.port}"]
    volumes:
      - {shared}/db_app.py:/db_app.py:ro
""")
    name = f"si{secrets.token_hex(3)}"
    files = ["-p", name, "-f", str(project / "sidecar.yml"), "-f", str(override)]
    try:
        engine.compose(*files, "up", "-d", "app", timeout=300)
        app_id = engine.compose(*files, "ps", "-q", "app").stdout.strip()
        deadline = time.monotonic() + 60
        while engine.docker("inspect", "-f", "{{.State.Health.Status}}", app_id).stdout.strip() != "healthy":
            assert time.monotonic() < deadline, "the app never became healthy"
            time.sleep(1)
        second = engine.compose(*files, "run", "--rm", "--no-deps", "secret-init", check=False, timeout=120)
        assert second.returncode == 75, second.stdout + second.stderr
        assert "already managed by another secret-init" in second.stdout + second.stderr
        deadline = time.monotonic() + 60
        while True:
            logs = engine.compose(*files, "logs", "--no-log-prefix", "app").stdout
            probes = [e for e in json_lines(logs) if e.get("event") == "probe"]
            if len({p["user"] for p in probes}) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert len({p["user"] for p in probes}) >= 3, "the app saw two rotations"
        assert [p for p in probes if not p["ok"]] == []
        sidecar_logs = engine.compose(*files, "logs", "--no-log-prefix", "secret-init").stdout
        assert_no_leak(logs + sidecar_logs, secret_id)
    finally:
        engine.compose(*files, "down", "-v", "--timeout", "20", check=False, timeout=180)
    assert database.leases(creds) == [], "the sidecar revoked its leases when Compose stopped it"


def test_compose_entrypoint_file_runs_hardened(engine: Engine, image: str, shared: Path) -> None:
    """compose/entrypoint.yml as users run it, only with the test image instead of a build."""
    project = shared / "compose"
    shutil.copytree(REPO / "compose", project)
    value = random_secret("compose")
    (project / "app_secret.txt").write_text(value)
    override = project / "override.test.yml"
    override.write_text(f"services:\n  app:\n    image: {image}\n    build: !reset null\n    pull_policy: never\n")
    name = f"si{secrets.token_hex(3)}"
    files = ["-p", name, "-f", str(project / "entrypoint.yml"), "-f", str(override)]
    try:
        result = engine.compose(*files, "run", "--rm", "app", check=False, timeout=120)
    finally:
        engine.compose(*files, "down", "-v", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(10001, 10001, 10001)" in result.stdout, "the demo app runs as the app user"
    assert "app_secret       mode 0400  owner 10001:10001" in result.stdout
    assert "setuid(0): Operation not permitted" in result.stdout
    assert_no_leak(result.stdout + result.stderr, value)


def test_compose_stack_file_is_valid(engine: Engine) -> None:
    result = engine.compose("-f", str(REPO / "compose" / "stack.yml"), "config", check=False)
    assert result.returncode == 0, result.stderr
    assert "/run/app-secrets" in result.stdout and "vault_role_id" in result.stdout


def test_image_supervises_hardened_with_kill_added(engine: Engine, image: str, shared: Path) -> None:
    """Supervise mode under the same hardening plus KILL: the app's exit code comes through."""
    (shared / "app_secret").write_text(random_secret("sup"))
    config = (REPO / "compose" / "image-config.toml").read_text() + "\n[process]\nsupervise = true\n"
    (shared / "config.toml").write_text(config)
    result = engine.docker(
        "run", "--rm", "--network", "none", *HARDENED, "--cap-add", "KILL",
        "--tmpfs", "/run/app-secrets:mode=1777,size=1m",
        "-v", f"{shared}/app_secret:/run/secrets/app_secret:ro",
        "-v", f"{shared}/config.toml:/etc/secret-init/config.toml:ro",
        image, "sh", "-c", 'test "$(id -u)" = 10001 && test -r "$APP_SECRET_FILE" && exit 7',
        check=False,
    )  # fmt: skip
    assert result.returncode == 7, result.stderr
    events = [e.get("event") for e in json_lines(result.stderr)]
    assert "app started" in events and "supervisor exiting" in events
