"""The one-shot flow, top to bottom: user -> filesystem -> sources -> sink -> drop -> exec."""

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from secret_init import execute, privileges
from secret_init.config import Config, SecretSpec
from secret_init.errors import PermissionRefusedError
from secret_init.model import Material
from secret_init.privileges import AppUser
from secret_init.sink import OutputFile, Owner, Sink, WriteResult
from secret_init.sources.files import read_files

if TYPE_CHECKING:
    from secret_init.vault import VaultClient

log = structlog.get_logger()


@dataclass(frozen=True)
class Materialized:
    user: AppUser
    materials: list[Material]
    written: list[WriteResult]


def run(cfg: Config, command: list[str], environ: Mapping[str, str]) -> int:
    """Materialize, then exec the app as its user, or start it and supervise it."""
    done = materialize(cfg, environ, for_app=True)
    file_vars = {s.env: cfg.file_path(s) for s in cfg.secrets if s.env}
    user_env = done.user.environment() if privileges.is_root() else {}
    values = [m.value.reveal() for m in done.materials]
    env = execute.child_environment(environ, cfg.process.scrub_env, user_env, file_vars, values)
    if cfg.process.supervise:
        return supervise(cfg, command, env, done.user if privileges.is_root() else None)
    privileges.drop(done.user)
    execute.exec_app(command, env)


def supervise(cfg: Config, command: list[str], env: Mapping[str, str], user: AppUser | None) -> int:
    """Stay resident: forward signals, reap, and exit with the app's status (128+N for signal N)."""
    from queue import Empty, SimpleQueue

    from secret_init.supervisor import SignalEvent, Supervisor, exit_code

    events: SimpleQueue[object] = SimpleQueue()
    supervisor = Supervisor(events)
    supervisor.install()
    privileges.set_no_new_privs()  # inherited by the app
    supervisor.start(command, env, user)
    while supervisor.exit_status is None:
        try:
            event = events.get(timeout=1.0)
        except Empty:
            supervisor.reap()  # a lost SIGCHLD must not leave a zombie
            continue
        if isinstance(event, SignalEvent):
            if event.signum == signal.SIGCHLD:
                supervisor.reap()
            else:
                supervisor.forward(event.signum)
    supervisor.stop_leftovers(cfg.process.stop_timeout)
    code = exit_code(supervisor.exit_status)
    log.info("supervisor exiting", exit_code=code)
    return code


def render(cfg: Config, environ: Mapping[str, str]) -> None:
    done = materialize(cfg, environ, for_app=False)
    changed = sum(1 for w in done.written if w.changed)
    log.info("render done", files=len(done.written), changed=changed)


def materialize(cfg: Config, environ: Mapping[str, str], for_app: bool) -> Materialized:
    """Read every secret, then write them all; nothing is written if any read fails."""
    user = app_user(cfg, for_app)
    owners = {s.name: file_owner(s, user) for s in cfg.secrets}
    sink = Sink(cfg.output.dir, user.gid, cfg.output.allow_non_tmpfs)
    sink.check_filesystem()
    sink.prepare()
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
        files = [OutputFile(m.spec.name, m.value, m.spec.mode, owners[m.spec.name]) for m in materials]
        written = sink.write(files)
    except BaseException:
        if client is not None:
            client.revoke_own_token()  # any lease created so far dies with it
        raise
    if client is not None:
        _release_token(client, materials)
    return Materialized(user, materials, written)


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


def _vault_login(cfg: Config, environ: Mapping[str, str]) -> "VaultClient":
    from secret_init.vault import VaultClient

    client = VaultClient(cfg.vault, environ)
    client.login()
    return client


def _release_token(client: "VaultClient", materials: list[Material]) -> None:
    leased = sorted({m.lease.lease_id for m in materials if m.lease})
    if leased:
        # The leases die with the token, so it must outlive this process.
        log.warning("leased secrets will not be renewed after exec; they expire with their TTL", leases=leased)
    else:
        client.revoke_own_token()
