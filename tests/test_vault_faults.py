"""Faults a real OpenBao cannot produce on demand, injected by a FAKE HTTP server on 127.0.0.1.

Everything a real server can serve is tested against the real one (test_vault.py); this
fake exists only to answer 504, or to accept a request and never answer, so that the retry
classification can be proved.
"""

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    QuietHandler,
    base_env,
    log_events,
    needs_root,
    random_secret,
    run_cli,
    serve_http,
    stop_http,
    write_config,
)

pytestmark = needs_root


class FakeVault:
    def __init__(self, status: int | None, location: str | None = None) -> None:
        self.requests: list[str] = []
        fake = self

        class Handler(QuietHandler):
            def _answer(self) -> None:
                fake.requests.append(f"{self.command} {self.path}")
                if status is None:  # accept, then never answer
                    time.sleep(30)
                    return
                self.send_response(status)
                if location is not None:
                    self.send_header("Location", location + self.path)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(b"<html>gateway timeout from a proxy</html>")

            do_GET = do_POST = do_PUT = _answer

        self.server, self.addr = serve_http(Handler)

    def close(self) -> None:
        stop_http(self.server)


@pytest.fixture
def fake_504() -> Iterator[FakeVault]:
    fake = FakeVault(504)
    yield fake
    fake.close()


@pytest.fixture
def fake_silent() -> Iterator[FakeVault]:
    fake = FakeVault(None)
    yield fake
    fake.close()


def config(workdir: Path, out: Path, addr: str, auth: str) -> Path:
    (workdir / "role_id").write_text(random_secret("role"))
    (workdir / "secret_id").write_text(random_secret("sid"))
    auth_toml = (
        f'auth = "approle"\nrole_id_file = "{workdir}/role_id"\nsecret_id_file = "{workdir}/secret_id"\n'
        if auth == "approle"
        else ""
    )
    return write_config(
        workdir,
        f'[output]\ndir = "{out}"\nuser = "65534:65534"\n'
        f'[vault]\naddr = "{addr}"\n{auth_toml}startup_timeout = "2s"\nrequest_timeout = "500ms"\n'
        '[[secret]]\nname = "k"\nsource = "vault:secret/data/app/x#k"\n',
    )


@pytest.mark.hostile("faults")
def test_unmapped_5xx_is_retried_then_69(fake_504: FakeVault, tmpfs: Path, workdir: Path) -> None:
    """A 504 from a proxy in front of Vault is transient: retried until startup_timeout."""
    token = random_secret("tok")
    result = run_cli("render", "--config", str(config(workdir, tmpfs / "out", fake_504.addr, "token")),
                     env=base_env(VAULT_TOKEN=token))  # fmt: skip
    assert result.returncode == 69, result.stderr
    assert len(fake_504.requests) >= 3
    error = next(e for e in log_events(result.stderr) if e["level"] == "error")["event"]
    assert "HTTP 504" in error and "\n" not in error  # hvac maps no class to 504: the status is kept
    assert token not in result.stderr


@pytest.mark.hostile("faults")
def test_login_is_not_repeated_after_a_read_timeout(fake_silent: FakeVault, tmpfs: Path, workdir: Path) -> None:
    """The server took the login and never answered: a single-use secret_id may be spent, so no retry."""
    result = run_cli("render", "--config", str(config(workdir, tmpfs / "out", fake_silent.addr, "approle")))
    assert result.returncode == 69, result.stderr
    assert fake_silent.requests == ["POST /v1/auth/approle/login"]
    assert "timed out" in result.stderr


@pytest.mark.hostile("faults")
def test_a_read_is_repeated_after_a_read_timeout(fake_silent: FakeVault, tmpfs: Path, workdir: Path) -> None:
    result = run_cli("render", "--config", str(config(workdir, tmpfs / "out", fake_silent.addr, "token")),
                     env=base_env(VAULT_TOKEN=random_secret("tok")))  # fmt: skip
    assert result.returncode == 69, result.stderr
    assert len(fake_silent.requests) >= 2
    assert all(r == "GET /v1/secret/data/app/x" for r in fake_silent.requests)
