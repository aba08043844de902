"""Certificates from a real OpenBao PKI engine, as files, rotated under a real nginx (issue 12, part 1).

`bao_own_ca` (conftest) is a real OpenBao dev server with a second, TLS listener whose CA the
fixture made with openssl; secret-init talks to that https listener only (`ca_cert`), as it
would to a production Vault. This module mounts the `pki` engine on it, generates a root CA
inside OpenBao and makes two roles for `*.internal`: `web` (certificates without a Vault
lease) and `web-lease` (`generate_lease = true`). The token secret-init uses is supplied in a
file, so it is not revoked at exit: a lease that is gone afterwards was revoked by itself.

The acceptance test runs Debian's nginx as the app user under `secret-init run`, serving the
certificate files from the output dir on a free loopback port, while a client thread completes
a TLS handshake against OpenBao's root CA every 200 ms across three rotations.
"""

import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.conftest import (
    REPO,
    TlsBao,
    UnixUser,
    app_command,
    assert_no_leak,
    base_env,
    free_port,
    log_events,
    needs_root,
    record_output,
    register_secret,
    run_cli,
    write_config,
)

pytestmark = needs_root

NGINX = "/usr/sbin/nginx"
COMMON_NAME = "web.internal"
PKI_POLICY = """
path "pki/issue/web" { capabilities = ["update"] }
path "pki/issue/web-lease" { capabilities = ["update"] }
path "sys/leases/revoke" { capabilities = ["update"] }
"""
READ_ONLY_POLICY = 'path "pki/issue/web" { capabilities = ["read"] }\n'


# -- the PKI engine ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    tls: TlsBao
    root_pem: str  # the root CA OpenBao generated: the issuing CA of every certificate here
    root_file: Path  # the same, for ssl.create_default_context(cafile=...)

    @property
    def client(self) -> Any:
        return self.tls.bao.client

    def token_file(self, directory: Path, policy: str = "pki-app") -> tuple[Path, str]:
        """A fresh token (registered as a secret) in a 0600 file; secret-init does not revoke a supplied token."""
        token = self.client.auth.token.create(policies=[policy], ttl="10m")["auth"]["client_token"]
        register_secret(token, "pki test token")
        path = directory / f"vault-token-{secrets.token_hex(3)}"
        path.write_text(token)
        path.chmod(0o600)
        return path, token

    def issued_serials(self) -> set[str]:
        """Every certificate the mount has issued (LIST pki/certs), the root's included."""
        return set(self.client.list("pki/certs")["data"]["keys"])

    def lease_alive(self, lease_id: str) -> bool:
        """sys/leases/lookup: False once the lease is revoked (or never was)."""
        import hvac

        try:
            self.client.sys.read_lease(lease_id)
        except hvac.exceptions.InvalidRequest:
            return False
        return True

    def revoked(self, serial: str) -> bool:
        return int(self.client.read(f"pki/cert/{serial}")["data"]["revocation_time"]) > 0


@pytest.fixture(scope="module")
def pki(bao_own_ca: TlsBao, tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """`pki/` on the module's OpenBao: an internal root CA, roles `web` and `web-lease`, policy `pki-app`."""
    client = bao_own_ca.bao.client
    client.sys.enable_secrets_engine("pki", path="pki", config={"max_lease_ttl": "2h"})
    root = client.write(
        "pki/root/generate/internal", common_name="secret-init test PKI root", ttl="2h", key_type="ec", key_bits=256
    )["data"]["certificate"]
    role = {"allowed_domains": "internal", "allow_subdomains": True, "ttl": "30s", "max_ttl": "1h",
            "key_type": "ec", "key_bits": 256}  # fmt: skip
    client.write("pki/roles/web", **role)
    client.write("pki/roles/web-lease", **role, generate_lease=True)
    client.sys.create_or_update_policy("pki-app", PKI_POLICY)
    client.sys.create_or_update_policy("pki-read-only", READ_ONLY_POLICY)
    root_file = tmp_path_factory.mktemp("pki-root") / "root.pem"
    root_file.write_text(root)
    return Pki(bao_own_ca, root, root_file)


def cert_secret(name: str, source: str, params: str, extra: str = "") -> str:
    return f'\n[[secret]]\nname = "{name}"\nsource = "{source}"\nparams = {params}\n{extra}'


def pki_config(
    workdir: Path,
    out: Path,
    pki: Pki,
    user: str,
    *,
    role: str = "web",
    ttl: str = "30s",
    process: str = "",
    secrets_text: str | None = None,
    policy: str = "pki-app",
) -> tuple[Path, str]:
    """The four files of the issue's example (plus ca_chain), from pki/issue/ROLE over https; and the token."""
    token_file, token = pki.token_file(workdir, policy)
    params = f'{{ common_name = "{COMMON_NAME}", ttl = "{ttl}" }}'
    reordered = f'{{ ttl = "{ttl}", common_name = "{COMMON_NAME}" }}'  # the same table: the same request
    path = f"pki/issue/{role}"
    if secrets_text is None:
        secrets_text = (
            cert_secret("tls.crt", f"vault:{path}#certificate", params)
            + cert_secret("tls.key", f"vault:{path}#private_key", params)
            + cert_secret("ca.pem", f"vault:{path}#issuing_ca", params, 'mode = "0440"\n')
            + cert_secret("chain.pem", f"vault:{path}#ca_chain", reordered)
            + cert_secret("fullchain.pem", f"vault:{path}", params, 'template = "${certificate}\\n${issuing_ca}\\n"\n')
        )
    cfg = write_config(
        workdir,
        f"""
[output]
dir = "{out}"
user = "{user}"

[vault]
addr = "{pki.tls.tls_addr}"
ca_cert = "{pki.tls.ca.ca_cert}"
auth = "token"
token_file = "{token_file}"
request_timeout = "3s"

[process]
stop_timeout = "2s"
{process}
{secrets_text}
""",
    )
    return cfg, token


def serial_int(text: str) -> int:
    """Vault's "3a:5b:..." (or a bare hex string) as a number, to compare with x509's serial."""
    return int(text.replace(":", ""), 16)


def key_forms(*pems: str) -> list[str]:
    """What to search outputs for, for each PEM key: as it is, JSON-escaped (a log line), and each
    line of its base64 body on its own (a key in a JSON string has no newline to match)."""
    forms: list[str] = []
    for pem in pems:
        forms += [pem, json.dumps(pem)[1:-1]]
        forms += [line for line in pem.splitlines() if len(line) >= 16 and not line.startswith("-----")]
    return forms


def wall(text: str) -> float:
    """A log line's ISO timestamp (UTC) as a Unix time."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# -- secret-init resident, with an app that writes plain lines to stderr ---------------------


class Resident:
    """`secret-init run -- APP` as a real process. Its stderr carries secret-init's JSON log lines
    and the app's own lines (nginx logs to stderr); a thread reads both streams as they come."""

    def __init__(self, cfg: Path, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "secret_init", "run", "--config", str(cfg), "--", *argv],
            env=base_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        self._lock = threading.Lock()
        self._err: list[str] = []
        self._out: list[str] = []
        self._readers = [
            threading.Thread(target=self._pump, args=(self.proc.stderr, self._err), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stdout, self._out), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self.code: int | None = None

    def _pump(self, stream: Any, into: list[str]) -> None:
        for raw in iter(stream.readline, b""):
            with self._lock:
                into.append(raw.decode(errors="replace"))

    @property
    def stderr(self) -> str:
        with self._lock:
            return "".join(self._err)

    @property
    def stdout(self) -> str:
        with self._lock:
            return "".join(self._out)

    @property
    def logs(self) -> list[dict[str, Any]]:
        return log_events(self.stderr)

    def logged(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.logs if e.get("event") == name]

    def until(self, done: Callable[["Resident"], bool], timeout: float, also: Callable[[], None] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not done(self):
            if also is not None:
                also()
            assert self.proc.poll() is None, f"secret-init ended early ({self.proc.returncode}): {self.stderr[-3000:]}"
            assert time.monotonic() < deadline, f"timed out; last lines: {self.stderr[-3000:]}"
            time.sleep(0.1)

    def finish(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(10)
        record_output(self.stdout, "app stdout through secret-init (pki)")
        record_output(self.stderr, "secret-init and app stderr (pki)")
        return self.code


# -- the acceptance test: nginx serving rotated certificates -----------------------------------


NGINX_CONF = """
daemon off;
master_process on;
worker_processes 1;
pid {state}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {state}/body;
    proxy_temp_path {state}/proxy;
    fastcgi_temp_path {state}/fastcgi;
    uwsgi_temp_path {state}/uwsgi;
    scgi_temp_path {state}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name {name};
        ssl_certificate {out}/fullchain.pem;
        ssl_certificate_key {out}/tls.key;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


@pytest.fixture
def nginx(workdir: Path, app_user: UnixUser) -> Callable[[Path], tuple[list[str], int, Path]]:
    """argv of Debian's nginx (run as the app user by secret-init) serving OUT's files; its port and state dir."""
    if not os.access(NGINX, os.X_OK):
        pytest.skip(f"needs Debian's nginx at {NGINX} (scripts/bootstrap installs it)")

    def make(out: Path) -> tuple[list[str], int, Path]:
        state = workdir / "nginx"
        state.mkdir(mode=0o700)
        os.chown(state, app_user.uid, app_user.gid)
        port = free_port()
        conf = workdir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(state=state, port=port, name=COMMON_NAME, out=out))
        conf.chmod(0o644)
        return [NGINX, "-e", "stderr", "-p", str(state), "-c", str(conf)], port, state

    return make


@dataclass
class Handshake:
    at: float  # wall time the handshake finished (or failed)
    serial: int | None
    error: str | None = None


@dataclass
class Prober:
    """A TLS client: one full handshake against the PKI root every `every` seconds, verifying the name."""

    port: int
    cafile: Path
    every: float = 0.2
    seen: list[Handshake] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def handshake(self) -> Handshake:
        context = ssl.create_default_context(cafile=str(self.cafile))
        try:
            with (
                socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw,
                context.wrap_socket(raw, server_hostname=COMMON_NAME) as tls,
            ):
                der = tls.getpeercert(binary_form=True)
                assert der is not None
                return Handshake(time.time(), x509.load_der_x509_certificate(der).serial_number)
        except (OSError, ssl.SSLError) as e:
            return Handshake(time.time(), None, f"{type(e).__name__}: {e}")

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                self.seen.append(self.handshake())
                self._stop.wait(self.every)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def serials(self) -> list[int]:
        """Distinct serials in the order first served."""
        order: list[int] = []
        for h in self.seen:
            if h.serial is not None and h.serial not in order:
                order.append(h.serial)
        return order

    def first_seen(self, serial: int) -> float:
        return next(h.at for h in self.seen if h.serial == serial)


def test_nginx_serves_each_rotated_certificate_with_no_failed_handshake(
    pki: Pki,
    tmpfs: Path,
    workdir: Path,
    app_user: UnixUser,
    nginx: Callable[[Path], tuple[list[str], int, Path]],
) -> None:
    """30 s certificates, on_rotate = signal:SIGHUP: nginx (one master, never restarted) serves each new
    certificate after each rotation; a handshake every 200 ms for three rotations never fails."""
    out = tmpfs / "out"
    argv, port, state = nginx(out)
    cfg, token = pki_config(workdir, out, pki, app_user.name, process='on_rotate = "signal:SIGHUP"')
    keys: list[str] = []  # every private key served, read from the output dir during the run

    def collect_key() -> None:
        try:
            key = (out / "tls.key").read_text()
        except OSError:
            return
        if key and key not in keys:
            keys.append(register_secret(key.strip(), "pki private key (nginx run)"))

    statuses: list[str] = []
    run = Resident(cfg, argv)
    prober = Prober(port, pki.root_file)
    try:
        run.until(lambda r: bool(r.logged("app started")) and prober.handshake().serial is not None, 30, collect_key)
        master = run.logged("app started")[0]["pid"]
        prober.start()

        def rotated_and_served(r: Resident) -> bool:
            collect_key()
            return len(r.logged("lease rotated")) >= 3 and len(prober.serials()) >= 4 and len(prober.seen) > 10

        run.until(rotated_and_served, 110, collect_key)
        n = len(prober.seen)
        run.until(lambda r: len(prober.seen) >= n + 5, 10)  # a few more on the last certificate
        statuses.append((out / ".secret-init" / "status.json").read_text())
        assert (state / "nginx.pid").read_text().strip() == str(master), "nginx's own pid file names the master"
        assert "nginx: master process" in Path(f"/proc/{master}/cmdline").read_bytes().decode(errors="replace")
        assert os.stat(f"/proc/{master}").st_uid == app_user.uid, "nginx runs as the app user"
        prober.stop()
        assert run.proc.poll() is None
    finally:
        prober.stop()
        code = run.finish()
    collect_key()

    # secret-init ended on SIGTERM with nginx's own exit status, and nginx with it.
    exited = run.logged("app exited")
    assert [e["pid"] for e in exited] == [master], exited
    assert code == exited[0]["exit_code"] == 0, run.stderr[-3000:]
    assert not Path(f"/proc/{master}").exists(), "the nginx master is gone"

    # One master the whole time: started once, signalled at each rotation, never restarted.
    assert [e["pid"] for e in run.logged("app started")] == [master]
    assert not run.logged("app restarted")
    rotations = run.logged("lease rotated")
    signalled = run.logged("app signalled")
    assert len(signalled) >= 3 and {(e["signal"], e["pid"]) for e in signalled} == {("SIGHUP", master)}
    assert run.stderr.count("reconfiguring") >= 3, "nginx itself logged each reload"

    # Zero failed handshakes; each rotation brought a new serial, served only after it happened.
    failed = [h for h in prober.seen if h.error is not None]
    assert failed == [], failed[:5]
    served = prober.serials()
    issued = [serial_int(e["serial"]) for e in run.logged("certificate issued")]
    assert len(served) >= 4, served
    assert served == issued[: len(served)], "served in the order issued, each one of them"
    for i, serial in enumerate(served[1:]):
        assert rotations[i]["path"] == "pki/issue/web"
        assert rotations[i]["old_lease"] != rotations[i]["new_lease"]
        assert prober.first_seen(serial) > wall(rotations[i]["timestamp"]), f"serial {i + 2} served before its rotation"
    for serial in served:
        assert len([h for h in prober.seen if h.serial == serial]) >= 3, "each certificate was served a while"
    # Over https, with the test's own CA for OpenBao's listener: the only address secret-init used.
    assert [e["addr"] for e in run.logged("vault token loaded")] == [pki.tls.tls_addr]

    # A certificate without a Vault lease: nothing to revoke, nothing revoked; status shows its serial.
    assert not run.logged("lease revoked") and not run.logged("lease revoke failed; it expires by itself")
    for write in run.logged("vault write"):
        assert write["path"] == "pki/issue/web" and write["lease_id"] is None
    entries = json.loads(statuses[0])["secrets"]
    assert {e["lease_id"] for e in entries} == {None}
    assert {serial_int(e["serial"]) for e in entries} <= set(issued)

    # Every private key was read and registered; none is in any output.
    assert len(keys) >= 4, "a new key came with each certificate"
    assert_no_leak(run.stderr + run.stdout + "".join(statuses), *key_forms(*keys), token)
    assert_no_leak((out / ".secret-init" / "status.json").read_text(), *key_forms(*keys))


# -- one start: every kind of file from one certificate --------------------------------------


def test_one_start_writes_every_file_from_one_certificate(
    pki: Pki, tmpfs: Path, workdir: Path, app_user: UnixUser
) -> None:
    """certificate, private_key, issuing_ca, ca_chain and a template: one issue, consistent files, 0400/0440."""
    out = tmpfs / "out"
    before = pki.issued_serials()
    cfg, token = pki_config(workdir, out, pki, app_user.name)
    result = run_cli("run", "--config", str(cfg), "--", "/bin/true")
    assert result.returncode == 0, result.stderr[-3000:]
    key_pem = register_secret((out / "tls.key").read_text().strip(), "pki private key (one start)")

    # One request for the one path: one certificate issued, all files from it.
    logs = log_events(result.stderr)
    writes = [e for e in logs if e["event"] == "vault write"]
    assert [(w["path"], w["fields"] >= 5, w["lease_id"]) for w in writes] == [("pki/issue/web", True, None)]
    issued = [e for e in logs if e["event"] == "certificate issued"]
    assert len(issued) == 1 and issued[0]["path"] == "pki/issue/web"
    new = pki.issued_serials() - before
    assert new == {issued[0]["serial"]}, "exactly one certificate issued, the one logged"
    assert datetime.fromisoformat(issued[0]["expires_at"]).timestamp() > time.time()

    certificate = (out / "tls.crt").read_text()
    cert = x509.load_pem_x509_certificate(certificate.encode())
    assert cert.serial_number == serial_int(issued[0]["serial"])
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == COMMON_NAME
    # The key is the certificate's: a TLS server loads them as a pair, and the public keys match.
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(out / "tls.crt", out / "tls.key")
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    public = load_pem_private_key(key_pem.encode(), None).public_key()
    spki = (Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    assert public.public_bytes(*spki) == cert.public_key().public_bytes(*spki)
    # issuing_ca is OpenBao's root, and it verifies the certificate.
    ca_text = (out / "ca.pem").read_text()
    assert ca_text.strip() == pki.root_pem.strip()
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_text.encode()))
    # ca_chain: PEM blocks one after another, each ending with a newline; not JSON.
    chain = (out / "chain.pem").read_text()
    assert chain.startswith("-----BEGIN CERTIFICATE-----\n") and chain.endswith("-----END CERTIFICATE-----\n")
    blocks = x509.load_pem_x509_certificates(chain.encode())
    assert [b.subject for b in blocks] == [cert.issuer], "the chain up to the root"
    assert chain.count("-----BEGIN ") == len(blocks) and "\n\n" not in chain
    # The template, from the same answer.
    assert (out / "fullchain.pem").read_text() == f"{certificate}\n{ca_text}\n"

    # Modes and owners: 0400 by default, the secret's own mode when it has one; the app user's.
    for name in ("tls.crt", "tls.key", "chain.pem", "fullchain.pem", "ca.pem"):
        st = (out / name).stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (
            0o440 if name == "ca.pem" else 0o400,
            app_user.uid,
            app_user.gid,
        ), name

    # The key is in no output; status.json shows the serial, no lease id, no key.
    status = (out / ".secret-init" / "status.json").read_text()
    entries = json.loads(status)["secrets"]
    assert [(e["name"], e["lease_id"], serial_int(e["serial"])) for e in entries] == [
        (n, None, cert.serial_number) for n in ("tls.crt", "tls.key", "ca.pem", "chain.pem", "fullchain.pem")
    ]
    assert_no_leak(result.stdout + result.stderr + status, *key_forms(key_pem), token)
    revokes = [e for e in logs if e["event"] in ("lease revoked", "lease revoke failed; it expires by itself")]
    assert revokes == [], "nothing to revoke without a Vault lease"


# -- config errors ----------------------------------------------------------------------------


PARAMS_MISTAKES = [
    (
        "different params on one path",
        cert_secret("tls.crt", "vault:pki/issue/web#certificate", '{ common_name = "web.internal", ttl = "30s" }')
        + cert_secret("tls.key", "vault:pki/issue/web#private_key", '{ ttl = "60s", common_name = "web.internal"}'),
        "tls.key",
    ),
    (
        "one secret of the path without params",
        cert_secret("tls.crt", "vault:pki/issue/web#certificate", '{ common_name = "web.internal" }')
        + '\n[[secret]]\nname = "tls.key"\nsource = "vault:pki/issue/web#private_key"\n',
        "tls.key",
    ),
    ("params on a file: source", cert_secret("plain", "file:/etc/hostname", '{ common_name = "x" }'), "plain"),
    (
        "a nested table",
        cert_secret("tls.crt", "vault:pki/issue/web#certificate", '{ common_name = "w", ext = { a = "b" } }'),
        "tls.crt",
    ),
    (
        "a list of tables",
        cert_secret("tls.crt", "vault:pki/issue/web#certificate", '{ common_name = "w", alt = [{ a = "b" }] }'),
        "tls.crt",
    ),
    (
        "a list of booleans",
        cert_secret("tls.crt", "vault:pki/issue/web#certificate", '{ common_name = "w", alt = [true] }'),
        "tls.crt",
    ),
    ("not a table", cert_secret("tls.crt", "vault:pki/issue/web#certificate", '"common_name=w"'), "tls.crt"),
]


@pytest.mark.hostile("config")
@pytest.mark.parametrize(("case", "secrets_text", "named"), PARAMS_MISTAKES, ids=[m[0] for m in PARAMS_MISTAKES])
def test_params_mistakes_are_78_in_one_line_naming_the_secret(
    pki: Pki, tmpfs: Path, workdir: Path, app_user: UnixUser, case: str, secrets_text: str, named: str
) -> None:
    before = pki.issued_serials()
    cfg, _ = pki_config(workdir, tmpfs / "out", pki, app_user.name, secrets_text=secrets_text)
    for command in (["run", "--config", str(cfg), "--", "/bin/true"], ["check", "--config", str(cfg)]):
        result = run_cli(*command)
        assert result.returncode == 78, (case, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, (case, lines)
        message = log_events(result.stderr)[0]["event"]
        assert "params" in message and f"[[secret]] '{named}'" in message, (case, message)
    assert pki.issued_serials() == before, "nothing issued"
    assert not (tmpfs / "out").exists() or not [p for p in (tmpfs / "out").iterdir() if not p.name.startswith(".")]


# -- check -------------------------------------------------------------------------------------


def test_check_says_the_path_will_be_written_and_issues_nothing(
    pki: Pki, tmpfs: Path, workdir: Path, app_user: UnixUser
) -> None:
    out = tmpfs / "out"
    before = pki.issued_serials()
    cfg, token = pki_config(workdir, out, pki, app_user.name)
    audit_before = len(pki.tls.bao.audit_entries())
    result = run_cli("check", "--config", str(cfg))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if "pki/issue/web" in line]
    assert len(rows) == 5, result.stdout
    for row in rows:
        assert "will be written" in row and "POST" in row, row
    assert pki.issued_serials() == before, "check issued no certificate"
    requests = [e["request"]["path"] for e in pki.tls.bao.audit_entries()[audit_before:] if e["type"] == "request"]
    assert "pki/issue/web" not in requests and "sys/capabilities-self" in requests, requests
    assert not out.exists() or secret_names(out) == []
    assert_no_leak(result.stdout + result.stderr, token)

    # A token that may only read the path: check refuses with 77 and says why.
    cfg, token = pki_config(workdir, out, pki, app_user.name, policy="pki-read-only")
    refused = run_cli("check", "--config", str(cfg))
    assert refused.returncode == 77, refused.stdout + refused.stderr
    assert "may not write pki/issue/web" in refused.stdout, refused.stdout
    assert pki.issued_serials() == before


def secret_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


# -- generate_lease = true: the old certificate's lease revoked ---------------------------------


SLEEPER = r"""
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
signal.signal(signal.SIGHUP, lambda *_: None)  # a reload, for on_rotate = "signal:SIGHUP"
while True:
    time.sleep(0.1)
"""


@pytest.mark.parametrize("on_rotate", ["restart", "signal:SIGHUP"])
def test_a_certificate_lease_is_revoked_after_its_rotation_and_at_exit(
    pki: Pki, tmpfs: Path, workdir: Path, app_user: UnixUser, on_rotate: str
) -> None:
    """Role web-lease (generate_lease): each answer has a lease_id; the rotated-away one is revoked
    (restart: once the old app is gone; signal: stop_timeout after the signal), the last one at exit;
    the supplied token itself lives on."""
    out = tmpfs / "out"
    process = f'on_rotate = "{on_rotate}"'
    cfg, token = pki_config(workdir, out, pki, app_user.name, role="web-lease", ttl="10s", process=process)
    run = Resident(cfg, app_command(workdir, "sleeper", SLEEPER))
    keys: list[str] = []
    try:
        run.until(lambda r: bool(r.logged("lease tracked")), 20)
        keys.append(register_secret((out / "tls.key").read_text().strip(), "pki private key (lease run)"))
        first = run.logged("vault write")[0]["lease_id"]
        assert first and first.startswith("pki/issue/web-lease/"), first
        assert pki.lease_alive(first)
        first_serial = run.logged("certificate issued")[0]["serial"]

        run.until(lambda r: any(e["lease_id"] == first for e in r.logged("lease revoked")), 25)
        keys.append(register_secret((out / "tls.key").read_text().strip(), "pki private key (lease run)"))
        rotated = run.logged("lease rotated")[0]
        second = run.logged("vault write")[1]["lease_id"]
        assert (rotated["old_lease"], rotated["new_lease"]) == (first, second)
        assert not pki.lease_alive(first), "the old certificate's lease is gone"
        assert pki.revoked(first_serial), "and OpenBao revoked the old certificate with it"
        assert pki.lease_alive(second)
        status = (out / ".secret-init" / "status.json").read_text()
        assert {e["lease_id"] for e in json.loads(status)["secrets"]} == {second}
    finally:
        code = run.finish()
    assert code == 0, run.stderr[-3000:]
    events = [e["event"] for e in run.logs]
    revoked_first = next(e for e in run.logged("lease revoked") if e["lease_id"] == first)
    if on_rotate == "restart":
        assert run.logged("app restarted") and not run.logged("app signalled")
        assert events.index("app restarted") < events.index("lease revoked"), "revoked once the old app is gone"
    else:
        assert run.logged("app signalled") and not run.logged("app restarted")
        signalled = run.logged("app signalled")[0]
        assert events.index("app signalled") < events.index("lease revoked")
        waited = wall(revoked_first["timestamp"]) - wall(signalled["timestamp"])
        assert waited >= 2 - 0.05, f"revoked {waited:.2f}s after the signal, before stop_timeout (2s)"
    current = run.logged("vault write")[-1]["lease_id"]
    revoked = [e["lease_id"] for e in run.logged("lease revoked")]
    assert revoked[-1] == current and not pki.lease_alive(current), "the current lease is revoked at exit"
    assert pki.revoked(run.logged("certificate issued")[-1]["serial"])
    assert pki.client.auth.token.lookup(token)["data"]["ttl"] > 0, "the supplied token was not revoked"
    assert_no_leak(run.stderr + run.stdout + status, *key_forms(*keys), token)
