"""The command line: parse arguments, run one command, map every failure to its exit code."""

import argparse
import gc
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from secret_init import __version__
from secret_init.errors import ExitCode, SecretInitError, UsageError


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, minus its `import shutil` (with zlib, bz2, lzma: ~4 ms).

    argparse builds a formatter for every add_argument, and HelpFormatter asks shutil
    for the terminal width; this asks os the same way shutil.get_terminal_size does.
    """

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_terminal_columns() - 2)


def _terminal_columns() -> int:
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


class _Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(formatter_class=_Formatter, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> _Parser:
    # Common options are accepted before and after the command name.
    common = _Parser(add_help=False)
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

    parser = _Parser(
        prog="secret-init",
        parents=[common],
        description="Materialize secrets into tmpfs files, drop root, exec the app.",
    )
    parser.add_argument("--version", action="version", version=f"secret-init {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
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


def main(argv: Sequence[str] | None = None) -> int:
    # Start-up makes few reference cycles, but its imports allocate enough objects to
    # trigger ~20 collections: ~20 ms here. A one-shot run execs or exits long before
    # garbage matters; app.py turns collection back on before it supervises.
    gc.disable()
    try:
        return _main(argv)
    finally:
        gc.enable()


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "health":
        return _health(args)  # fast: no logging setup, no Vault
    from secret_init import logs

    logs.configure(getattr(args, "log_format", None), getattr(args, "log_level", "info"))
    import structlog

    log = structlog.get_logger()
    try:
        return _dispatch(args)
    except SecretInitError as e:
        log.error(str(e), exit_code=int(e.exit_code))
        return int(e.exit_code)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        log.error("internal error", error=f"{type(e).__name__}: {e}", exc_info=True, exit_code=int(ExitCode.SOFTWARE))
        return int(ExitCode.SOFTWARE)


def _health(args: argparse.Namespace) -> int:
    import json
    import time

    from secret_init import config, status

    try:
        cfg = config.load(config.config_path(getattr(args, "config", None), os.environ), os.environ)
    except SecretInitError as e:
        print(f"unhealthy: {e}")
        return 1
    doc = None
    try:
        with open(f"{cfg.output.dir}/{status.STATUS_DIR}/{status.STATUS_FILE}", "rb") as f:
            doc = json.loads(f.read())
    except FileNotFoundError:
        pass  # a one-shot run keeps no status: the files are all there is to check
    except (OSError, ValueError) as e:
        print(f"unhealthy: status file unreadable: {e}")
        return 1
    problems = status.problems(cfg, doc, time.time(), os.path.exists)
    if problems:
        print(f"unhealthy: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        return 1
    print("healthy")
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    import structlog

    from secret_init import config

    command = list(getattr(args, "argv", []) or [])
    if command[:1] == ["--"]:
        command = command[1:]
    if args.command == "run" and not command:
        raise UsageError("run needs a command: secret-init run [--config PATH] -- CMD [ARG...]")

    from secret_init import privileges

    privileges.protect_process()
    privileges.trust_only_root_import_paths()
    path = config.config_path(getattr(args, "config", None), os.environ)
    cfg = config.load(path, os.environ)
    structlog.get_logger().info("config loaded", path=path, secrets=len(cfg.secrets), vault=cfg.uses_vault)

    if args.command == "check":
        from secret_init.check import check

        return check(cfg, os.environ, sys.stdout)
    from secret_init import app

    if args.command == "render":
        app.render(cfg, os.environ)
        return 0
    if args.command == "sidecar":
        return app.sidecar(cfg, os.environ)
    return app.run(cfg, command, os.environ)
