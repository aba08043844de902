"""`secret-init check`: validate everything a run needs without reading a value or writing a file.

It resolves users, inspects the output filesystem, stats source files and asks Vault's
sys/capabilities-self whether each path may be read, or written for one with `params`
(it is not written: that would issue a certificate). A token it logs in for is revoked
before it returns. A wrapped secret_id is only looked up: unwrapping it would spend it.
"""

import os
import socket
import stat
from collections.abc import Mapping
from typing import NamedTuple, TextIO

from secret_init import fsinfo, privileges
from secret_init.config import Config, Listen, SecretSpec
from secret_init.errors import ExitCode, SecretInitError
from secret_init.materialize import app_user, file_owner
from secret_init.redaction import REDACTOR
from secret_init.sources.files import source_path


class Row(NamedTuple):
    name: str
    source: str
    file: str
    mode: str
    owner: str
    problem: str | None = None
    code: ExitCode = ExitCode.OK

    @property
    def status(self) -> str:
        # Printed on stdout, outside the logger: redact here too.
        return "ok" if self.problem is None else REDACTOR.redact(self.problem)


def check(cfg: Config, environ: Mapping[str, str], out: TextIO) -> int:
    rows = check_rows(cfg, environ)
    print_table(rows, out)
    return next((int(r.code) for r in rows if r.code != ExitCode.OK), 0)


def check_rows(cfg: Config, environ: Mapping[str, str]) -> list[Row]:
    rows: list[Row] = []
    user_row, user = _check_user(cfg)
    rows.append(user_row)
    rows.append(_check_output_dir(cfg))
    if cfg.metrics.listen is not None:
        rows.append(_check_metrics(cfg.metrics.listen))
    vault_problem, capabilities = _check_vault(cfg, environ)
    if vault_problem is not None:
        rows.append(vault_problem)
    for spec in cfg.secrets:
        rows.append(_check_secret(cfg, spec, user, capabilities))
    return rows


def _check_user(cfg: Config) -> tuple[Row, privileges.AppUser | None]:
    label = cfg.output.user or "(current user)"
    try:
        user = app_user(cfg, for_app=True)
    except SecretInitError as e:
        return Row("(user)", label, "-", "-", "-", str(e), e.exit_code), None
    return Row("(user)", label, "-", "-", f"{user.uid}:{user.gid}"), user


def _check_output_dir(cfg: Config) -> Row:
    def row(problem: str | None = None, code: ExitCode = ExitCode.OK) -> Row:
        return Row("(output dir)", "-", cfg.output.dir, "0750", "-", problem, code)

    try:
        fs = fsinfo.inspect(cfg.output.dir)
    except OSError as e:
        return row(f"cannot inspect: {e.strerror}", ExitCode.CANT_CREATE)
    if os.path.islink(cfg.output.dir):
        return row("is a symlink", ExitCode.NO_PERMISSION)
    if not fs.in_memory and not cfg.output.allow_non_tmpfs:
        return row(f"on {fs.describe()}, not tmpfs or ramfs", ExitCode.NO_PERMISSION)
    return row()


def _check_metrics(listen: Listen) -> Row:
    """Whether the metrics port can be bound now (bound and closed at once, as `run` would bind it)."""
    from secret_init.metrics import bind_error

    try:
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the exporter: TIME_WAIT is no conflict
            probe.bind((listen.host, listen.port))
    except OSError as e:  # creating the socket too: a kernel without IPv6
        error = bind_error(listen, e)
        return Row("(metrics)", str(listen), "-", "-", "-", str(error), error.exit_code)
    return Row("(metrics)", str(listen), "-", "-", "-")


def _check_vault(cfg: Config, environ: Mapping[str, str]) -> tuple[Row | None, dict[str, list[str]] | None]:
    """A row when something is wrong or worth saying, and each path's capabilities (None: left unchecked)."""
    paths = cfg.vault_paths
    if not paths:
        return None, {}
    from secret_init.vault import VaultClient

    client = None
    try:
        client = VaultClient(cfg.vault, environ)
        if cfg.vault.secret_id_wrapped:  # a login would spend the wrapping token the start needs
            made_at = client.check_wrapping_token()
            note = f"wrapping token unused, from {made_at}; not unwrapped, so no capability is checked"
            return Row("(vault)", ", ".join(cfg.vault.addrs) or "-", "-", "-", "-", note), None
        client.login()
        return None, client.capabilities(paths)
    except SecretInitError as e:
        unchecked: dict[str, list[str]] | None = None if cfg.vault.secret_id_wrapped else {}  # no login: rows say why
        return Row("(vault)", ", ".join(cfg.vault.addrs) or "-", "-", "-", "-", str(e), e.exit_code), unchecked
    finally:
        if client is not None:
            client.revoke_own_token()


def _check_secret(
    cfg: Config, spec: SecretSpec, user: privileges.AppUser | None, caps: dict[str, list[str]] | None
) -> Row:
    owner = "?"
    problem: tuple[str, ExitCode] | None = None
    if user is not None:
        try:
            o = file_owner(spec, user)
            owner = f"{o.uid}:{o.gid}"
        except SecretInitError as e:
            problem = (str(e), e.exit_code)
    if problem is None:
        problem = _vault_capability(spec, caps) if spec.source.kind == "vault" else _source_file(cfg, spec)
    text, code = problem if problem else (None, ExitCode.OK)
    return Row(spec.name, str(spec.source), cfg.file_path(spec), f"{spec.mode:04o}", owner, text, code)


def _vault_capability(spec: SecretSpec, caps: dict[str, list[str]] | None) -> tuple[str, ExitCode] | None:
    if caps is None:
        return ("not checked: check does not spend the wrapped secret_id", ExitCode.OK)
    granted = caps.get(spec.source.path)
    if granted is None:
        return ("not checked: vault login failed", ExitCode.UNAVAILABLE)
    # A POST to a path without an existence check (pki/issue/ROLE) is an update: create alone is refused.
    needed, verb = ("update", "write") if spec.written else ("read", "read")
    if "root" in granted or needed in granted:
        if spec.params is None:
            return None
        keys = ", ".join(key for key, _ in spec.params) or "none"
        return (f"ok: will be written (POST, params: {keys}), not read; check writes nothing", ExitCode.OK)
    return (
        f"token may not {verb} {spec.source.path} (capabilities: {', '.join(granted) or 'none'})",
        ExitCode.NO_PERMISSION,
    )


def _source_file(cfg: Config, spec: SecretSpec) -> tuple[str, ExitCode] | None:
    path = source_path(spec, cfg.swarm_dir)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return (f"{path} does not exist", ExitCode.NO_INPUT)
    except OSError as e:
        return (f"{path}: {e.strerror}", ExitCode.NO_INPUT)
    if not stat.S_ISREG(st.st_mode):
        return (f"{path} is not a regular file", ExitCode.NO_INPUT)
    if st.st_size > cfg.output.max_secret_size:
        return (f"{path} is larger than max_secret_size", ExitCode.DATA)
    if not os.access(path, os.R_OK):
        return (f"{path} is not readable", ExitCode.NO_PERMISSION)
    return None


def print_table(rows: list[Row], out: TextIO) -> None:
    header = ("NAME", "SOURCE", "FILE", "MODE", "OWNER", "STATUS")
    table = [header] + [(r.name, r.source, r.file, r.mode, r.owner, r.status) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        out.write("  ".join([*cells, row[-1]]) + "\n")
