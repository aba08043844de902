"""The command line: secure the import path, parse arguments, run one command, map every failure to its exit code.

Only os and sys, which the interpreter loaded before us, are imported before
trust_only_root_import_paths has run: every other module is found on the trimmed path.
"""

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from typing import NoReturn


def main(argv: "Sequence[str] | None" = None) -> int:
    dropped = trust_only_root_import_paths()
    import gc

    # Start-up allocates enough objects to trigger ~20 collections (~20 ms) and makes few
    # cycles: a one-shot run execs or exits first. loop.py turns collection back on.
    gc.disable()
    try:
        return _main(argv)
    except ModuleNotFoundError as e:
        if not dropped:
            raise  # a broken install
        print(f"secret-init: cannot import {e.name}: as root it ignores import paths that others could change "
              f"({', '.join(dropped)}); install it where only root can write", file=sys.stderr)  # fmt: skip
        return 78
    finally:
        gc.enable()


def trust_only_root_import_paths() -> list[str]:
    """As root, forget import paths that another user could change; the ones forgotten.

    A module planted there (the app's working directory under `python -m`, say) would
    run as root. A path counts only when it and every directory above it are root's and
    writable by no group or other user (a sticky directory may be, as /tmp is).
    """
    if os.geteuid() != 0:
        return []
    dropped = [p for p in sys.path if not _only_root_writes(os.path.abspath(p or os.curdir))]
    sys.path[:] = [p for p in sys.path if p not in dropped]
    return dropped


def _only_root_writes(path: str) -> bool:
    for spelling in {path, os.path.realpath(path)}:
        current, first = spelling, True
        while True:
            try:
                st = os.stat(current)
            except OSError:
                return False  # nothing there yet: nobody may put something there later
            sticky_dir = not first and st.st_mode & 0o1000
            if st.st_uid != 0 or (st.st_mode & 0o022 and not sticky_dir):
                return False
            parent = os.path.dirname(current)
            if parent == current:
                break
            current, first = parent, False
    return True


def build_parser() -> "argparse.ArgumentParser":
    import argparse

    from secret_init import __version__
    from secret_init.errors import ExitCode

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> "NoReturn":
            self.print_usage(sys.stderr)
            self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")

    # Common options are accepted before and after the command name.
    common = Parser(add_help=False)
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="config file (default: $SECRET_INIT_CONFIG, then /etc/secret-init/config.toml)",
    )
    common.add_argument(
        "--log-format",
        choices=("json", "console"),
        default=argparse.SUPPRESS,
        help="json lines, or console (the default on a terminal)",
    )
    common.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=argparse.SUPPRESS)

    parser = Parser(
        prog="secret-init",
        parents=[common],
        description="Materialize secrets into tmpfs files, drop root, exec the app.",
    )
    parser.add_argument("--version", action="version", version=f"secret-init {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True
    run = commands.add_parser("run", parents=[common], help="materialize, drop to the app user, exec CMD")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    commands.add_parser("render", parents=[common], help="materialize, then exit 0")
    commands.add_parser(
        "sidecar",
        parents=[common],
        help="materialize, then keep the files fresh (renew, rotate, refresh) until stopped",
    )
    commands.add_parser("check", parents=[common], help="validate config, user, filesystem and Vault access")
    commands.add_parser(
        "health", parents=[common], help="exit 0 when every file exists and no lease is overdue (no Vault call)"
    )
    return parser


def _main(argv: "Sequence[str] | None") -> int:
    from secret_init import interrupt
    from secret_init.errors import ExitCode, SecretInitError

    args = build_parser().parse_args(argv)
    if args.command == "health":
        from secret_init import status

        return status.health(_config_path(args), sys.stdout)  # no logging setup, no Vault
    from secret_init import logs

    logs.configure(getattr(args, "log_format", None), getattr(args, "log_level", "info"))
    import structlog

    log = structlog.get_logger()
    try:
        return _dispatch(args)
    except SecretInitError as e:
        log.error(str(e), exit_code=int(e.exit_code))
        return int(e.exit_code)
    except interrupt.StartInterrupted as e:
        code = 128 + e.signum
        log.error(f"start interrupted by signal {e.signum}; what it made was revoked", exit_code=code)
        return code
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError:
        raise  # main() explains it, when a path was forgotten
    except Exception as e:
        log.error("internal error", error=f"{type(e).__name__}: {e}", exc_info=True, exit_code=int(ExitCode.SOFTWARE))
        return int(ExitCode.SOFTWARE)


def _config_path(args: "argparse.Namespace") -> str:
    from secret_init import config

    return config.config_path(getattr(args, "config", None), os.environ)


def _dispatch(args: "argparse.Namespace") -> int:
    import structlog

    from secret_init import config, interrupt, privileges
    from secret_init.errors import UsageError

    command = list(getattr(args, "argv", []) or [])
    if command[:1] == ["--"]:
        command = command[1:]
    if args.command == "run" and not command:
        raise UsageError("run needs a command: secret-init run [--config PATH] -- CMD [ARG...]")

    privileges.protect_process()
    interrupt.install()
    path = _config_path(args)
    cfg = config.load(path, os.environ)
    log = structlog.get_logger()
    for note in cfg.notes:
        log.debug(note)
    log.info("config loaded", path=path, secrets=len(cfg.secrets), vault=cfg.uses_vault)

    if args.command == "check":
        from secret_init.check import check

        return check(cfg, os.environ, sys.stdout)
    if args.command == "render":
        from secret_init import app

        app.render(cfg, os.environ)
        return 0
    from secret_init.metrics import open_recorder

    metrics = open_recorder(cfg)  # bound before any Vault request: a port in use fails the start first
    if args.command == "sidecar":
        from secret_init.loop import sidecar

        return sidecar(cfg, os.environ, metrics)
    from secret_init import app

    return app.run(cfg, command, os.environ, metrics)
