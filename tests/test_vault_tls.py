"""TLS to a real OpenBao (-dev-tls): ca_cert verifies; without it verification fails, never skipped."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    base_env,
    log_events,
    needs_root,
    random_secret,
    run_cli,
    start_bao,
    stop_bao,
    wait_ready,
    write_config,
)

pytestmark = needs_root


@pytest.fixture(scope="module")
def tls_bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path, str]]:
    import hvac

    state = tmp_path_factory.mktemp("bao-tls")
    server, addr, token = start_bao(state, tls=True)
    ca = state / "vault-ca.pem"
    try:
        client = hvac.Client(url=addr, token=token, verify=str(ca))
        wait_ready(client, server, state / "server.log")
        value = random_secret("tls")
        client.secrets.kv.v2.create_or_update_secret(path="app/tls", secret={"k": value})
        yield addr, token, ca, value
    finally:
        stop_bao(server)


def config(workdir: Path, out: Path, addr: str, ca: Path | None) -> Path:
    ca_line = f'ca_cert = "{ca}"' if ca else ""
    return write_config(
        workdir,
        f'[output]\ndir = "{out}"\nuser = "65534:65534"\n'
        f'[vault]\naddr = "{addr}"\n{ca_line}\nstartup_timeout = "3s"\n'
        '[[secret]]\nname = "k"\nsource = "vault:secret/data/app/tls#k"\n',
    )


def test_ca_cert_verifies_the_server(tls_bao: tuple[str, str, Path, str], tmpfs: Path, workdir: Path) -> None:
    addr, token, ca, value = tls_bao
    result = run_cli(
        "render", "--config", str(config(workdir, tmpfs / "out", addr, ca)), env=base_env(VAULT_TOKEN=token)
    )
    assert result.returncode == 0, result.stderr
    assert (tmpfs / "out" / "k").read_text() == value


@pytest.mark.hostile("vault-answers")
def test_unknown_ca_fails_at_once_with_69(tls_bao: tuple[str, str, Path, str], tmpfs: Path, workdir: Path) -> None:
    """Without ca_cert the dev CA is untrusted: a clear TLS error, no retry, nothing written."""
    addr, token, _, value = tls_bao
    result = run_cli(
        "render", "--config", str(config(workdir, tmpfs / "out", addr, None)), env=base_env(VAULT_TOKEN=token)
    )
    assert result.returncode == 69, result.stderr
    error = next(e for e in log_events(result.stderr) if e["level"] == "error")["event"]
    assert "TLS verification failed" in error
    assert not [e for e in log_events(result.stderr) if e["event"] == "vault request failed, retrying"]
    assert not (tmpfs / "out" / "k").exists()
    assert value not in result.stderr and token not in result.stderr
