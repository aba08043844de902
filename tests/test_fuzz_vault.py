"""Fuzz: a FAKE Vault on 127.0.0.1 answering with hypothesis-generated statuses, headers and bodies.

The fake is labelled as such: a real OpenBao cannot be made to answer 1xx, lie in Content-Length,
redirect anywhere or send a lease_duration of "NaN". Invariant, whatever the answers: a documented
exit code (never 70), a one-line error, no planted token or value in any output, and nothing
half-written in the output dir.
"""

import contextlib
import io
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    QuietHandler,
    assert_no_leak,
    base_env,
    log_events,
    needs_root,
    random_secret,
    record_cases,
    record_output,
    run_cli,
    write_config,
)

pytestmark = [needs_root, pytest.mark.hostile("vault-answers")]

DOCUMENTED = {0, 65, 66, 69, 77, 78}  # README's exit code table; 70 is a bug
TOKEN = random_secret("fuzz-token")  # the client_token a login answer carries
VALUE = random_secret("fuzz-value")  # the secret a read answer carries


class Reply(NamedTuple):
    status: int
    body: bytes
    content_type: str | None
    length: str  # "true", "absent", "short", "long", "bogus"
    chunked: bool
    location: str | None
    delay: float


def json_value(right: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The right kind of value most of the time, else any JSON shape (NaN and infinities too)."""
    wrong = st.one_of(
        st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=8), st.lists(st.integers(), max_size=2),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    )  # fmt: skip
    return st.one_of(right, right, wrong)


def optional_fields(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields)


secret_data = st.one_of(
    st.just({"k": VALUE}),
    st.just({"data": {"k": VALUE}, "metadata": {"version": 3}}),
    st.dictionaries(st.sampled_from(["k", "x", "data", "metadata"]), json_value(st.just(VALUE)), max_size=3),
)
read_doc = optional_fields(
    data=json_value(secret_data),
    lease_id=json_value(st.sampled_from(["", "database/creds/app/abc"])),
    lease_duration=json_value(st.integers(0, 10**6)),
    renewable=json_value(st.booleans()),
    warnings=json_value(st.lists(st.text(max_size=10), max_size=2)),
)
auth = optional_fields(
    client_token=json_value(st.just(TOKEN)),
    lease_duration=json_value(st.integers(0, 10**6)),
    renewable=json_value(st.booleans()),
)
login_doc = st.one_of(st.fixed_dictionaries({"auth": auth}), optional_fields(auth=json_value(auth)))
error_doc = optional_fields(errors=json_value(st.lists(st.text(max_size=20), max_size=2)))


def body(doc: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    as_json = doc.map(lambda d: json.dumps(d).encode())  # NaN and Infinity as Python writes them
    return st.one_of(as_json, as_json, as_json, st.binary(max_size=40), as_json.map(lambda b: b[: len(b) // 2]))


STATUSES = [100, 101, 200, 201, 204, 206, 301, 302, 303, 304, 307, 308, 400, 401, 403, 404, 412, 429, 500, 502, 503]
LOCATIONS = ["/v1/again", "http://127.0.0.1:1/v1/x", "https://127.0.0.1/v1/x", "http://u:p@127.0.0.1:1/", "::nonsense"]


def reply(doc: st.SearchStrategy[Any], valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Reply]:
    """A well-formed answer a third of the time (so that runs also succeed); else any status, header, framing."""
    good = st.builds(
        Reply, status=st.just(200), body=valid.map(lambda d: json.dumps(d).encode()),
        content_type=st.just("application/json"), length=st.just("true"), chunked=st.booleans(),
        location=st.none(), delay=st.just(0.0),
    )  # fmt: skip
    hostile = st.builds(
        Reply,
        status=st.one_of(st.just(200), st.just(200), st.sampled_from(STATUSES)),
        body=st.one_of(body(doc), body(error_doc)),
        content_type=st.sampled_from([None, "application/json", "text/html", "application/json; charset=utf-16"]),
        length=st.sampled_from(["true", "true", "true", "absent", "short", "long", "bogus"]),
        chunked=st.booleans(),
        location=st.one_of(st.none(), st.none(), st.sampled_from(LOCATIONS)),
        delay=st.sampled_from([0.0, 0.0, 0.0, 0.01, 0.05]),
    )
    return st.one_of(good, hostile, hostile)


VALID_LOGIN = st.just({"auth": {"client_token": TOKEN, "lease_duration": 60, "renewable": True}})
VALID_READ = st.sampled_from(
    [
        {"data": {"k": VALUE}, "lease_id": "", "lease_duration": 0, "renewable": False},
        {"data": {"data": {"k": VALUE}, "metadata": {"version": 2}}, "lease_id": "", "lease_duration": 0},
        {"data": {"k": VALUE}, "lease_id": "database/creds/app/x1", "lease_duration": 300, "renewable": True},
        {"data": {"x": VALUE}, "lease_id": "", "lease_duration": 0, "renewable": False},
    ]
)
LOGIN, READ = reply(login_doc, VALID_LOGIN), reply(read_doc, VALID_READ)


def write_reply(h: QuietHandler, r: Reply) -> None:
    time.sleep(r.delay)
    head = [f"HTTP/1.1 {r.status} X", "Connection: close"]
    if r.content_type:
        head.append(f"Content-Type: {r.content_type}")
    if r.location:
        head.append(f"Location: {r.location}")
    lengths = {"true": len(r.body), "short": max(0, len(r.body) - 3), "long": len(r.body) + 5}
    if r.chunked:
        head.append("Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (r.body[:7], r.body[7:]) if c) + b"0\r\n\r\n"
    else:
        payload = r.body
        if r.length in lengths:
            head.append(f"Content-Length: {lengths[r.length]}")
        elif r.length == "bogus":
            head.append("Content-Length: 12abc")
    h.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)


class Script:
    """What the FAKE Vault answers in the current example: the login, the read; revokes get 204."""

    login: Reply
    read: Reply


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[Script, str]]:
    """One FAKE Vault for every example (labelled: see the module docstring)."""
    script = Script()

    class Handler(QuietHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            self.close_connection = True
            with contextlib.suppress(OSError):
                if "revoke" in self.path:
                    self.wfile.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                else:
                    write_reply(self, script.login if self.path.endswith("/login") else script.read)

        do_GET = do_POST = do_PUT = _any

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield script, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


CONFIG = """
[output]
dir = "{out}"
user = "65534:65534"
[vault]
addr = "{addr}"
auth = "approle"
role_id_file = "{workdir}/role_id"
secret_id_file = "{workdir}/secret_id"
startup_timeout = "200ms"
request_timeout = "300ms"
[[secret]]
name = "k"
source = "vault:secret/data/app/x#k"
"""


@contextlib.contextmanager
def captured_logs() -> Iterator[io.StringIO]:
    """secret-init's own log pipeline (redaction included) into a buffer, for in-process runs."""
    import structlog

    from secret_init.logs import redact_event

    buffer = io.StringIO()
    structlog.configure(
        processors=[structlog.processors.add_log_level, redact_event, structlog.processors.JSONRenderer()],
        logger_factory=structlog.WriteLoggerFactory(buffer),
        cache_logger_on_first_use=False,
    )
    try:
        yield buffer
    finally:
        structlog.reset_defaults()


def close_descriptors_under(directory: Path) -> None:
    """In-process only: the owner lock a failed start keeps open (a real run exits and drops it)."""
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"{directory}/"):
                os.close(int(fd))


def expected_file(read: dict[str, Any]) -> bytes | None:
    """What a successful run writes for field k: KV v2 unwrapped, strings as is, the rest as JSON."""
    data = read.get("data")
    if not isinstance(data, dict):
        return None
    meta = data.get("metadata")
    if set(data) == {"data", "metadata"} and isinstance(meta, dict) and "version" in meta:
        data = data["data"] if isinstance(data["data"], dict) else {}
    if "k" not in data:
        return None
    value = data["k"]
    return (value if isinstance(value, str) else json.dumps(value, sort_keys=True)).encode()


class Tally:
    def __init__(self) -> None:
        self.codes: Counter[int] = Counter()


@pytest.fixture(scope="module")
def tally() -> Iterator[Tally]:
    counts = Tally()
    yield counts
    print(
        f"\nfuzz (in-process): {sum(counts.codes.values())} examples, exit codes {dict(sorted(counts.codes.items()))}"
    )


def test_fuzzed_answers_in_process(fake: tuple[Script, str], tmpfs: Path, workdir: Path, tally: Tally) -> None:
    """secret-init's materialize() in this process against hypothesis's answers: fast enough for hundreds."""
    from secret_init.config import load_text
    from secret_init.errors import SecretInitError
    from secret_init.materialize import materialize

    script, addr = fake
    (workdir / "role_id").write_text(random_secret("role"))
    (workdir / "secret_id").write_text(random_secret("sid"))
    started = time.monotonic()

    @settings(max_examples=700, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
    @given(login=LOGIN, read=READ)
    def example(login: Reply, read: Reply) -> None:
        script.login, script.read = login, read
        out = tmpfs / f"o{sum(tally.codes.values())}"
        cfg = load_text(CONFIG.format(out=out, addr=addr, workdir=workdir), str(workdir / "c.toml"), {})
        code, message = 0, ""
        with captured_logs() as logs:
            try:
                done = materialize(cfg, {}, for_app=False)
                os.close(done.owner_lock)
            except SecretInitError as e:
                code, message = int(e.exit_code), str(e)
                close_descriptors_under(out)
        tally.codes[code] += 1
        output = logs.getvalue() + message
        record_output(output, "fuzz in-process log")
        assert code in DOCUMENTED, output
        assert "\n" not in message
        assert_no_leak(output, TOKEN, VALUE)
        names = sorted(os.listdir(out)) if out.exists() else []
        if code:
            assert [n for n in names if n != ".secret-init"] == [], f"half-written after exit {code}: {names}"
        else:
            assert names == [".secret-init", "k"]
            with contextlib.suppress(ValueError):
                assert (out / "k").read_bytes() == expected_file(json.loads(read.body))

    example()
    seconds = time.monotonic() - started
    record_cases("vault-answers", sum(tally.codes.values()), [c for c, n in tally.codes.items() if c for _ in range(n)])
    assert seconds < 90, f"the fuzz took {seconds:.0f} s"


def test_fuzzed_answers_through_the_cli(fake: tuple[Script, str], tmpfs: Path, workdir: Path) -> None:
    """A few examples through the real CLI: the one error line, no traceback, no leak, nothing written."""
    script, addr = fake
    (workdir / "role_id").write_text(random_secret("role"))
    (workdir / "secret_id").write_text(random_secret("sid"))
    codes: Counter[int] = Counter()

    @settings(max_examples=15, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
    @given(login=LOGIN, read=READ)
    def example(login: Reply, read: Reply) -> None:
        script.login, script.read = login, read
        out = tmpfs / f"c{sum(codes.values())}"
        cfg = write_config(workdir, CONFIG.format(out=out, addr=addr, workdir=workdir))
        result = run_cli("render", "--config", str(cfg), env=base_env())
        codes[result.returncode] += 1
        assert result.returncode in DOCUMENTED, result.stderr
        assert "Traceback" not in result.stderr
        assert_no_leak(result.stdout + result.stderr, TOKEN, VALUE)
        if result.returncode:
            errors = [e for e in log_events(result.stderr) if e["level"] == "error"]
            assert len(errors) == 1 and "\n" not in errors[0]["event"], result.stderr
            assert not out.exists() or [n for n in os.listdir(out) if n != ".secret-init"] == []

    example()
    print(f"\nfuzz (CLI): {sum(codes.values())} examples, exit codes {dict(sorted(codes.items()))}")
    record_cases("vault-answers", sum(codes.values()), [c for c, n in codes.items() if c for _ in range(n)])
