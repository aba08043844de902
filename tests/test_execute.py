"""The app's environment and command lookup, as pure functions."""

from pathlib import Path

import pytest

from secret_init.errors import ExitCode, SecretInitError
from secret_init.execute import child_environment, resolve_command


def test_environment_rules() -> None:
    env = child_environment(
        {
            "PATH": "/bin", "VAULT_TOKEN": "t", "BAO_ADDR": "a", "SECRET_INIT_CONFIG": "c",
            "AWS_SECRET": "x", "DEBUG_A": "1", "DEBUG": "1", "COPY": "long-secret-value", "HOME": "/root",
            "LOGNAME": "root",
        },
        scrub=["AWS_SECRET", "DEBUG_*"],
        user_env={"HOME": "/home/app", "USER": "app", "LOGNAME": None},
        file_vars={"DB_PASSWORD_FILE": "/run/app-secrets/db_password"},
        secret_values=[b"long-secret-value\n", b"1"],
    )  # fmt: skip
    assert env == {
        "PATH": "/bin",
        "DEBUG": "1",  # a 1-character secret does not strip unrelated variables
        "HOME": "/home/app",
        "USER": "app",
        "DB_PASSWORD_FILE": "/run/app-secrets/db_password",
    }


def test_command_lookup(tmp_path: Path) -> None:
    runnable = tmp_path / "app"
    runnable.write_text("#!/bin/sh\n")
    runnable.chmod(0o755)
    plain = tmp_path / "data"
    plain.write_text("")
    plain.chmod(0o644)
    assert resolve_command("app", f"/nonexistent:{tmp_path}") == str(runnable)
    assert resolve_command(str(runnable), "") == str(runnable)
    with pytest.raises(SecretInitError) as missing:
        resolve_command("absent", str(tmp_path))
    assert missing.value.exit_code == ExitCode.NOT_FOUND
    with pytest.raises(SecretInitError) as denied:
        resolve_command("data", str(tmp_path))
    assert denied.value.exit_code == ExitCode.NOT_EXECUTABLE
