"""The pure parts of issue 12: `params` and `[metrics]` config, certificate answers, operation names, PEM lists.

No service: these decide what a PKI answer becomes and what a scrape may be labelled with.
The real OpenBao PKI and nginx are in test_pki.py, real scrapes in test_metrics.py.
"""

import contextlib
import errno
import json
import math
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from secret_init.config import Listen, load_text, params_key
from secret_init.errors import ConfigError
from secret_init.model import Lease
from secret_init.sources.vault import field_text
from secret_init.vault import MalformedAnswer, operation, parse_response
from tests.conftest import free_port, run_cli, write_config

ENV = {"VAULT_ADDR": "https://vault:8200"}
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"


def secrets_toml(*params: str, sources: tuple[str, ...] = ("vault:pki/issue/web#certificate",) * 2) -> str:
    tables = []
    for i, (source, param) in enumerate(zip(sources, params, strict=True)):
        line = f"params = {param}\n" if param else ""
        tables.append(f'[[secret]]\nname = "f{i}"\nsource = "{source}"\n{line}')
    return "\n".join(tables)


def test_params_of_one_path_must_be_equal_and_are_kept_sorted() -> None:
    cfg = load_text(secrets_toml('{ ttl = "30s", common_name = "a" }', '{ common_name = "a", ttl = "30s" }'), "c", ENV)
    assert cfg.secrets[0].params == (("common_name", "a"), ("ttl", "30s"))
    assert cfg.secrets[0].written and cfg.written_paths == {"pki/issue/web"}


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ('{ ttl = "30s" }', '{ ttl = "31s" }'),
        ('{ ttl = "30s" }', ""),  # the same path read and written
        ("{ exclude_cn_from_sans = true }", "{ exclude_cn_from_sans = 1 }"),  # True == 1 in Python, not here
    ],
)
def test_different_params_on_one_path_are_a_config_error_naming_params(first: str, second: str) -> None:
    with pytest.raises(ConfigError, match=r"\[\[secret\]\] 'f1': params differ from those of secret 'f0'") as raised:
        load_text(secrets_toml(first, second), "c", ENV)
    assert raised.value.exit_code == 78
    assert "pki/issue/web" in str(raised.value)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            "{ a = { b = 1 } }",
            "'a' must be a string, a number, a boolean or a list of strings or integers, not a table",
        ),
        ("{ a = [1, true] }", "not a list of mixed values"),
        ("{ a = [[1]] }", "not a list of mixed values"),
        ("{ a = nan }", "not a number that is not finite"),
        ('"common_name=x"', "params must be a table"),
        ('{ "" = 1 }', "must be a printable, non-empty name"),
        ('{ "a\\u202eb" = 1 }', "must be a printable, non-empty name"),
    ],
)
def test_bad_params_are_one_line_config_errors(params: str, message: str) -> None:
    with pytest.raises(ConfigError, match="params") as raised:
        load_text(secrets_toml(params, sources=("vault:pki/issue/web",)), "c", ENV)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_params_on_a_file_source_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"params needs a vault: source"):
        load_text(secrets_toml('{ a = "b" }', sources=("file:/etc/hostname",)), "c", ENV)


def test_more_than_64_params_are_refused() -> None:
    many = "{ " + ", ".join(f"k{i} = {i}" for i in range(65)) + " }"
    with pytest.raises(ConfigError, match="more than 64 keys"):
        load_text(secrets_toml(many, sources=("vault:pki/issue/web",)), "c", ENV)


def test_params_key_tells_booleans_from_numbers() -> None:
    assert params_key((("a", True),)) != params_key((("a", 1),))
    assert params_key(None) != params_key(())


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9102", Listen("127.0.0.1", 9102)),
        ("[::1]:9102", Listen("::1", 9102)),
        ("localhost:80", Listen("127.0.0.1", 80)),
        ("127.9.9.9:65535", Listen("127.9.9.9", 65535)),
    ],
)
def test_loopback_listen_addresses_are_accepted(listen: str, expected: Listen) -> None:
    assert load_text(f'[metrics]\nlisten = "{listen}"\n', "c", {}).metrics.listen == expected


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("0.0.0.0:9102", "is not a loopback address; set allow_remote = true"),
        ("[::]:9102", "is not a loopback address"),
        ("10.1.2.3:9102", "is not a loopback address"),
        ("127.0.0.1", 'must be "HOST:PORT"'),
        ("127.0.0.1:0", "port 0 must be from 1 to 65535"),
        ("127.0.0.1:65536", "port 65536 must be from 1 to 65535"),
        ("metrics.internal:9102", "must be an IP address (or localhost)"),
        ("http://127.0.0.1:9102", 'must be "HOST:PORT"'),
        ("127.0.0.1:9102/metrics", 'must be "HOST:PORT"'),
    ],
)
def test_bad_or_remote_listen_addresses_are_78(listen: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"\[metrics\]: listen") as raised:
        load_text(f'[metrics]\nlisten = "{listen}"\n', "c", {})
    assert message in str(raised.value)
    assert raised.value.exit_code == 78


def test_a_remote_listen_address_needs_allow_remote() -> None:
    cfg = load_text('[metrics]\nlisten = "10.1.2.3:9102"\nallow_remote = true\n', "c", {})
    assert cfg.metrics.listen == Listen("10.1.2.3", 9102) and not cfg.metrics.listen.is_loopback
    assert str(Listen("::1", 9)) == "[::1]:9"
    assert load_text("", "c", {}).metrics.listen is None  # off by default


# -- certificate answers --------------------------------------------------------------------

NOW, WALL = 500.0, 1_800_000_000.0


def issue_answer(**data: Any) -> dict[str, Any]:
    fields = {
        "certificate": PEM,
        "issuing_ca": PEM,
        "ca_chain": [PEM],
        "private_key": "-----BEGIN RSA PRIVATE KEY-----\nsecretkeymaterial\n-----END RSA PRIVATE KEY-----",
        "private_key_type": "ec",
        "serial_number": "1a:2b:3c",
        "expiration": int(WALL + 30),
    }
    fields.update(data)
    return {"lease_id": "", "lease_duration": 0, "renewable": False, "data": fields}


def test_an_issued_certificate_without_a_lease_is_tracked_by_serial_and_not_revocable() -> None:
    secret = parse_response("pki/issue/web", issue_answer(), NOW, WALL)
    assert secret.lease == Lease("certificate 1a:2b:3c", 30.0, False, NOW, revocable=False, serial="1a:2b:3c")


def test_an_issued_certificate_with_a_lease_keeps_it_revocable_and_ends_at_not_after() -> None:
    answer = issue_answer() | {"lease_id": "pki/issue/web/abc", "lease_duration": 3600, "renewable": True}
    lease = parse_response("pki/issue/web", answer, NOW, WALL).lease
    assert lease == Lease("pki/issue/web/abc", 30.0, False, NOW, revocable=True, serial="1a:2b:3c")


def test_a_read_with_certificate_fields_is_not_a_certificate() -> None:
    """Only a write's answer is: a KV secret holding a PEM and a date must not start rotations."""
    assert parse_response("secret/web", issue_answer(), NOW).lease is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"expiration": int(WALL - 1)}, "has passed already"),
        ({"expiration": "tomorrow"}, "expiration is a string"),
        ({"expiration": True}, "expiration is a boolean"),
        ({"expiration": math.nan}, "not a time from 1970 to 9999"),
        ({"expiration": math.inf}, "not a time from 1970 to 9999"),
        ({"expiration": 10**400}, "not a time from 1970 to 9999"),  # too big for a float: no OverflowError
        ({"expiration": 1e300}, "not a time from 1970 to 9999"),
        ({"ca_chain": [PEM, {"a": 1}]}, "ca_chain is not a list of strings"),
        ({"issuing_ca": ["x"]}, "issuing_ca is a list, not a string"),
        ({"serial_number": "1a:2b\n[redacted]"}, "serial_number is not a hexadecimal serial"),
        ({"serial_number": "ab" * 100}, "serial_number is not a hexadecimal serial"),
        ({"serial_number": None}, "serial_number is not a hexadecimal serial"),
    ],
)
def test_a_malformed_certificate_answer_is_refused(data: dict[str, Any], message: str) -> None:
    with pytest.raises(MalformedAnswer, match=message):
        parse_response("pki/issue/web", issue_answer(**data), NOW, WALL)


def test_a_far_expiration_is_capped_not_an_overflow() -> None:
    lease = parse_response("pki/issue/web", issue_answer(expiration=253402300799), NOW, WALL).lease
    assert lease is not None and lease.duration == 10**9


def test_public_fields_are_held_to_the_nesting_limit_too() -> None:
    deep: Any = "x"
    for _ in range(40):
        deep = [deep]
    with pytest.raises(MalformedAnswer, match="nested deeper"):
        parse_response("pki/issue/web", issue_answer(issuing_ca=deep), NOW, WALL)


def test_the_private_key_is_redacted_and_the_public_parts_are_not() -> None:
    from secret_init.redaction import REDACTOR

    key = "-----BEGIN EC PRIVATE KEY-----\nuniquekeymaterial0123456789\n-----END EC PRIVATE KEY-----"
    answer = issue_answer(private_key=key, serial_number="fe:dc:ba:98", private_key_type="qz")
    parse_response("pki/issue/web", answer, NOW, WALL)
    assert REDACTOR.redact(f"k={key}") == "k=-----BEGIN EC PRIVATE KEY-----\n[redacted]"  # the armor is public
    assert REDACTOR.redact("uniquekeymaterial0123456789") == "[redacted]"  # one line of it, on its own
    shown = "serial fe:dc:ba:98 type qz"
    assert REDACTOR.redact(shown) == shown  # a 2-letter key type ("ec") would be cut out of every log line


def test_a_ca_chain_renders_as_a_pem_bundle_and_other_lists_as_json() -> None:
    assert field_text([PEM, PEM + "\n"]) == f"{PEM}\n{PEM}\n"
    assert field_text(["a", "b"]) == json.dumps(["a", "b"])
    assert field_text([PEM, 3]) == json.dumps([PEM, 3])
    assert field_text([]) == "[]"


# -- operation names for the request histogram ------------------------------------------------


@pytest.mark.parametrize(
    ("method", "url", "name"),
    [
        ("POST", "https://v:8200/v1/auth/approle/login", "login"),
        ("POST", "https://v:8200/v1/auth/team/jwt/login", "login"),
        ("PUT", "https://v:8200/v1/sys/leases/renew", "renew_lease"),
        ("PUT", "https://v:8200/v1/sys/leases/revoke", "revoke_lease"),
        ("PUT", "https://v:8200/v1/sys/leases/lookup", "lookup_lease"),
        ("GET", "https://v:8200/v1/auth/token/lookup-self", "lookup_token"),
        ("POST", "https://v:8200/v1/auth/token/renew-self", "renew_token"),
        ("POST", "https://v:8200/v1/auth/token/revoke-self", "revoke_token"),
        ("POST", "https://v:8200/v1/sys/wrapping/unwrap", "unwrap"),
        ("POST", "https://v:8200/v1/sys/capabilities-self", "capabilities"),
        ("GET", "https://v:8200/v1/database/creds/app?x=1", "read"),
        ("POST", "https://v:8200/v1/pki/issue/web", "write"),
        ("DELETE", "https://v:8200/v1/secret/x", "other"),
        ("GET", "https://v:8200/v1/sys/leases/renewal-of-something", "read"),  # a prefix match is by segment
    ],
)
def test_each_request_is_named_by_operation_never_by_path(method: str, url: str, name: str) -> None:
    assert operation(method, url) == name


def test_check_says_whether_the_metrics_port_can_be_bound(tmp_path: Path) -> None:
    """`check` binds and closes the port as `run` would bind it: free is ok, taken is 73 with the reason."""
    port = free_port()
    (tmp_path / "s").write_text("x")
    cfg = write_config(
        tmp_path,
        f'[output]\ndir = "{tmp_path / "out"}"\nallow_non_tmpfs = true\n[process]\nallow_root = true\n'
        f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
        f'[[secret]]\nname = "s"\nsource = "file:{tmp_path / "s"}"\n',
    )
    free = run_cli("check", "--config", str(cfg))
    assert free.returncode == 0, free.stdout + free.stderr
    assert re.search(rf"\(metrics\)\s+127\.0\.0\.1:{port}\s.*\sok$", free.stdout, re.MULTILINE), free.stdout
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        busy = run_cli("check", "--config", str(cfg))
    assert busy.returncode == 73, busy.stdout + busy.stderr
    assert re.search(r"\(metrics\).*listen 127\.0\.0\.1:\d+: address already in use", busy.stdout), busy.stdout


# -- the exporter, in process: what a local client can do to it ----------------------------------


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, int]]:
    from secret_init import exporter as module

    # So that only close() can end a held connection soon: the cut-off timer and the per-read timeout.
    monkeypatch.setattr(module, "CLIENT_TIMEOUT", 60.0)
    monkeypatch.setattr(module._Handler, "timeout", 60.0)
    port = free_port()
    metrics = module.Metrics(Listen("127.0.0.1", port))
    yield metrics, port
    metrics.close()


def test_a_request_prometheus_client_cannot_answer_is_a_500_without_a_traceback(
    exporter: tuple[Any, int], capfd: pytest.CaptureFixture[str]
) -> None:
    """`Accept: text/plain; version=x` makes prometheus-client raise; wsgiref would print the traceback to stderr."""
    _, port = exporter
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(b"GET /metrics HTTP/1.0\r\nAccept: text/plain; version=x\r\n\r\n")
        answer = b"".join(iter(lambda: client.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.0 500"), answer[:100]
    good = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    assert b"secret_init_rotations_total" in good
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "TypeError" not in out + err, err


def test_close_cuts_a_held_connection_instead_of_waiting_for_it(exporter: tuple[Any, int]) -> None:
    """A silent client must not hold the exit (or the exec) for the client timeout (60 s here)."""
    metrics, port = exporter
    with socket.create_connection(("127.0.0.1", port)) as silent:
        silent.sendall(b"GET /metr")  # and then nothing
        deadline = time.monotonic() + 10
        while metrics._server.serving is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert metrics._server.serving is not None, "the held connection is being served"
        closer = threading.Thread(target=metrics.close)
        closer.start()
        closer.join(timeout=20)
        assert not closer.is_alive(), "close() waited for the silent client"
        silent.settimeout(10)
        with contextlib.suppress(ConnectionResetError):  # closed with a reset: cut too
            assert silent.recv(100) == b"", "the held connection was closed"


def test_bind_errors_map_to_documented_exit_codes() -> None:
    from secret_init.metrics import bind_error

    listen = Listen("127.0.0.1", 80)
    assert bind_error(listen, OSError(errno.EADDRINUSE, "x")).exit_code == 73
    assert bind_error(listen, OSError(errno.EACCES, "Permission denied")).exit_code == 77
    assert bind_error(listen, OSError(errno.EADDRNOTAVAIL, "Cannot assign")).exit_code == 78
    assert bind_error(listen, OSError(errno.EAFNOSUPPORT, "no IPv6")).exit_code == 78


@pytest.mark.parametrize(
    ("granted", "code"), [(["create"], 77), (["read"], 77), (["update"], 0), (["root"], 0), ([], 77)]
)
def test_check_needs_update_on_a_written_path(granted: list[str], code: int) -> None:
    """A POST to pki/issue/ROLE is an update for OpenBao: a token with create alone is refused the write."""
    from secret_init.check import _vault_capability

    cfg = load_text(secrets_toml('{ common_name = "a" }', sources=("vault:pki/issue/web",)), "c", ENV)
    problem = _vault_capability(cfg.secrets[0], {"pki/issue/web": granted})
    assert problem is not None
    text, exit_code = problem
    assert int(exit_code) == code, text
    assert ("may not write pki/issue/web" in text) if code else text.startswith("ok: will be written (POST")
