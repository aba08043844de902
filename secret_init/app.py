"""The one-shot flow, top to bottom: user -> filesystem -> sources -> sink -> drop -> exec."""

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import structlog

from secret_init import execute, logs, privileges
from secret_init.config import Config, SecretSpec, is_plain_http_loopback
from secret_init.errors import PermissionRefusedError
from secret_init.model import Material
from secret_init.privileges import AppUser
from secret_init.sink import OutputFile, Owner, Sink, WriteResult
from secret_init.sources.files import read_files

if TYPE_CHECKING:
    from secret_init.vault import VaultClient

log = structlog.get_logger()


class Materialized:
    """What materialize() made. A plain class: a dataclass costs ~0.7 ms of start-up to define."""

    __slots__ = ("client", "materials", "owner_lock", "owners", "sink", "user", "written")

    def __init__(
        self,
        user: AppUser,
        materials: list[Material],
        written: list[WriteResult],
        sink: Sink,
        owners: dict[str, Owner],
        client: "VaultClient | None" = None,  # kept only when the caller asked for it
        owner_lock: int | None = None,  # held open for as long as this process owns the dir
    ) -> None:
        self.user = user
        self.materials = materials
        self.written = written
        self.sink = sink
        self.owners = owners
        self.client = client
        self.owner_lock = owner_lock

    @property
    def leased(self) -> bool:
        return any(m.lease for m in self.materials)


def run(cfg: Config, command: list[str], environ: Mapping[str, str]) -> int:
    """Materialize, then exec the app as its user; or, with leases or `supervise`, supervise it."""
    done = materialize(cfg, environ, for_app=True, keep_client=True)
    file_vars = {s.env: cfg.file_path(s) for s in cfg.secrets if s.env}
    user_env = done.user.environment() if privileges.is_root() else {}
    values = [m.value.reveal() for m in done.materials]
    env = execute.child_environment(environ, cfg.process.scrub_env, user_env, file_vars, values)
    if cfg.process.supervise or done.leased:
        from secret_init.loop import Supervised

        return Supervised(cfg, done, command, env).run()
    if done.client is not None:
        done.client.revoke_own_token()
    privileges.drop(done.user)
    execute.exec_app(command, env)


def sidecar(cfg: Config, environ: Mapping[str, str]) -> int:
    """Materialize, then stay: the same renewal, rotation and refresh, with no child."""
    from secret_init.loop import Supervised

    done = materialize(cfg, environ, for_app=False, keep_client=True)
    return Supervised(cfg, done, None, {}).run()


def render(cfg: Config, environ: Mapping[str, str]) -> None:
    done = materialize(cfg, environ, for_app=False)
    changed = sum(1 for w in done.written if w.changed)
    log.info("render done", files=len(done.written), changed=changed)


def materialize(cfg: Config, environ: Mapping[str, str], for_app: bool, keep_client: bool = False) -> Materialized:
    """Read every secret, then write them all; nothing is written if any read fails."""
    user = app_user(cfg, for_app)
    owners = {s.name: file_owner(s, user) for s in cfg.secrets}
    sink = Sink(cfg.output.dir, user.gid, cfg.output.allow_non_tmpfs)
    sink.check_filesystem()
    sink.prepare()
    owner_lock = sink.claim()  # before any lease exists: one output dir, one lease owner
    # Local files first: cheap, and a mistake there is found before Vault is asked.
    materials = read_files(cfg, [s for s in cfg.secrets if s.source.kind != "vault"])
    vault_specs = [s for s in cfg.secrets if s.source.kind == "vault"]
    client = _vault_login(cfg, environ) if vault_specs else None
    try:
        if client is not None:
            from secret_init.sources.vault import read_vault

            materials += read_vault(client, vault_specs, cfg.output.max_secret_size)
        order = {s.name: i for i, s in enumerate(cfg.secrets)}
        materials.sort(key=lambda m: order[m.spec.name])
        written = sink.write(output_files(materials, owners))
    except BaseException:
        if client is not None:
            from secret_init.sources.vault import revoke_leases

            revoke_leases(client, materials)  # with a supplied token they would outlive us
            client.revoke_own_token()
        raise
    done = Materialized(user, materials, written, sink, owners, client, owner_lock)
    if client is not None and not keep_client:
        _release_token(client, done)
        done.client = None
    return done


def output_files(materials: list[Material], owners: Mapping[str, Owner]) -> list[OutputFile]:
    return [OutputFile(m.spec.name, m.value, m.spec.mode, owners[m.spec.name]) for m in materials]


def app_user(cfg: Config, for_app: bool) -> AppUser:
    """Who the app runs as and who owns its files; refuses root unless allowed."""
    if not privileges.is_root():
        current = privileges.resolve(None)
        if cfg.output.user is not None and privileges.resolve(cfg.output.user).uid != current.uid:
            raise PermissionRefusedError(
                f"running as uid {current.uid} without root: cannot become {cfg.output.user!r}; "
                "unset [output] user or start secret-init as root"
            )
        return current
    user = privileges.resolve(cfg.output.user)
    if for_app and user.uid == 0 and not cfg.process.allow_root:
        raise PermissionRefusedError(
            "refusing to run the app as root: set [output] user, or [process] allow_root = true"
        )
    return user


def file_owner(spec: SecretSpec, app: AppUser) -> Owner:
    if spec.user is None:
        return Owner(app.uid, app.gid)
    user = privileges.resolve(spec.user)
    if not privileges.is_root() and user.uid != os.geteuid():
        raise PermissionRefusedError(f"secret {spec.name!r}: cannot give the file to {spec.user!r} without root")
    return Owner(user.uid, user.gid)


# requests and urllib3 import these at import time and never touch them here: IDNA for
# non-ASCII host names, zip and CSV for package metadata, MIME types for uploads (~8 ms
# of -X importtime). Stand-ins as in logs.DEFERRED; each loads for real on first use.
VAULT_DEFERRED = ("idna", "stringprep", "zipfile", "csv", "mimetypes")
# requests guesses the encoding of a body that names no charset with one of these.
# Vault answers JSON, which requests decodes without them, and without them requests
# falls back to UTF-8 (requests.compat allows for their absence). Kept out: about
# 2.7 MiB of RSS and 11 ms of start-up.
CHARSET_GUESSERS = ("charset_normalizer", "chardet")
# Plain http to a Vault on this host needs no TLS, so OpenSSL (libssl and libcrypto)
# is kept out: about 4.8 MiB of RSS and 10 ms. ssl and hashlib allow for its absence;
# hashlib and hmac then use their built-in code, if this Python has it (some builds,
# Fedora's and RHEL's, take every hash from OpenSSL: there _hashlib stays).
OPENSSL = ("_ssl", "_hashlib")
BUILTIN_HASHES = (("_md5",), ("_sha1",), ("_sha2", "_sha256"), ("_sha2", "_sha512"), ("_blake2",), ("_sha3",))


def prepare_vault_imports(addr: str | None) -> None:
    """Before hvac is imported: defer or keep out what this process will never use."""
    import warnings

    for name in VAULT_DEFERRED:
        logs.defer_import(name)
    for name in CHARSET_GUESSERS:
        logs.keep_out(name)
    warnings.filterwarnings("ignore", message="Unable to find acceptable character detection dependency")
    if addr is not None and is_plain_http_loopback(addr):
        logs.keep_out("_ssl")
        # 3.12 has _sha2; 3.11 has _sha256 and _sha512.
        if all(any(logs.is_installed(name) for name in names) for names in BUILTIN_HASHES):
            logs.keep_out("_hashlib")


def _vault_login(cfg: Config, environ: Mapping[str, str]) -> "VaultClient":
    prepare_vault_imports(cfg.vault.addr)
    from secret_init.vault import VaultClient

    client = VaultClient(cfg.vault, environ)
    client.login()
    return client


def _release_token(client: "VaultClient", done: Materialized) -> None:
    leased = sorted({m.lease.lease_id for m in done.materials if m.lease})
    if leased:
        # The leases die with the token, so it must outlive this process.
        log.warning("leased secrets are not renewed after render; they expire with their TTL", leases=leased)
    else:
        client.revoke_own_token()
