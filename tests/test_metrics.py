"""[metrics] end to end: real scrapes of a real secret-init, real OpenBao, real PostgreSQL, promtool.

Each test runs secret-init (a sidecar or a supervising `run`) with `[metrics] listen` on a free
loopback port and scrapes it with urllib, as Prometheus would. Every scrape is parsed with
prometheus-client's own parser and recorded for the session's leak hunt.

The OpenBao here is this module's own dev server with a second, raw audit device
(`log_raw = "true"`): the test learns from it every token, password and lease id Vault handed
out, and looks for each of them in every scrape. Its database engine uses the session's
PostgreSQL. The alert rules in docs/operation.md are read from the doc itself, checked with
`promtool check rules` and evaluated with `promtool test rules`.
"""

import json
import os
import re
import secrets
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests import figures
from tests.conftest import (
    REPO,
    Bao,
    Database,
    Postgres,
    UnixUser,
    app_command,
    configure_bao,
    connect_database,
    free_port,
    live_leases,
    log_events,
    needs_root,
    random_secret,
    record_output,
    register_secret,
    run_cli,
    start_bao,
    stop_bao,
    wait_ready,
    write_config,
)
from tests.test_leases import DB_APP, Run, lease_config, starts

pytestmark = needs_root

PROMTOOL = "/usr/bin/promtool"
OPERATION_DOC = REPO / "docs" / "operation.md"

ISSUED = "secret_init_lease_issued_timestamp_seconds"
EXPIRY = "secret_init_lease_expiry_timestamp_seconds"
RENEWED = "secret_init_lease_renewed_timestamp_seconds"
DEADLINE = "secret_init_lease_deadline_timestamp_seconds"
DUE = "secret_init_rotation_due_timestamp_seconds"
TOKEN_EXPIRY = "secret_init_token_expiry_timestamp_seconds"
RENEWALS = "secret_init_renewals_total"
ROTATIONS = "secret_init_rotations_total"
RESTARTS = "secret_init_app_restarts_total"
REQUESTS = "secret_init_vault_request_duration_seconds"
OPERATIONS = {
    "login", "read", "write", "renew_lease", "revoke_lease", "lookup_lease", "lookup_token", "renew_token",
    "revoke_token", "unwrap", "lookup_wrapping", "capabilities", "other",
}  # fmt: skip
LABELS = {"path", "result", "operation", "le"}  # the only label names a secret_init_* series may carry


# -- this module's OpenBao: the session's setup plus a raw audit log ---------------------------


@dataclass
class RawBao:
    """A dev server whose second audit device logs requests and answers in the clear."""

    database: Database
    raw_log: Path

    @property
    def bao(self) -> Bao:
        return self.database.bao

    def handed_out(self) -> list[tuple[str, str]]:
        """(kind, value) of every token, accessor, password, secret_id and lease id Vault answered with."""
        found: list[tuple[str, str]] = []
        wanted = {"client_token", "accessor", "password", "secret_id", "secret_id_accessor", "lease_id"}

        def walk(node: object) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    if key in wanted and isinstance(value, str) and len(value) >= 8:
                        found.append((key, value))
                    else:
                        walk(value)
            elif isinstance(node, list):
                for item in node:
                    walk(item)

        for line in self.raw_log.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("type") == "response":
                walk(entry.get("response"))
        return found


@pytest.fixture(scope="module")
def raw_bao(tmp_path_factory: pytest.TempPathFactory, postgres: Postgres) -> Iterator[RawBao]:
    import hvac

    state = tmp_path_factory.mktemp("bao-raw-audit")
    raw_log = state / "raw-audit.log"
    raw_audit = f'audit "file" "raw" {{\n  options {{\n    file_path = "{raw_log}"\n    log_raw = "true"\n  }}\n}}\n'
    server, addr, token = start_bao(state, extra_config=raw_audit)
    client = hvac.Client(url=addr, token=token)
    try:
        wait_ready(client, server, state / "server.log")
        configure_bao(client)
        database = connect_database(Bao(addr, token, state / "audit.log", client, server.pid), postgres)
        raw = RawBao(database, raw_log)
        yield raw
        for kind, value in raw.handed_out():  # every test's: the session's leak hunt searches for them too
            if kind in ("client_token", "password"):
                register_secret(value, f"vault {kind} (raw audit)")
        figures.record_leftovers(
            "live leases under database/creds (test_metrics)", live_leases(database.bao, "database/creds")
        )
    finally:
        stop_bao(server)


@pytest.fixture
def db_app(workdir: Path) -> list[str]:
    if not os.path.exists("/usr/bin/psql"):
        pytest.skip("needs psql for the probing app")
    return app_command(workdir, "db_app", DB_APP)


# -- scraping ----------------------------------------------------------------------------------


class Scrape(NamedTuple):
    at: float  # time.time() just before the request was sent
    text: str
    samples: list[Sample]

    def get(self, name: str, **labels: str) -> float | None:
        for s in self.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
        return None

    def need(self, name: str, **labels: str) -> float:
        value = self.get(name, **labels)
        assert value is not None, f"no {name}{labels} in the scrape:\n{self.text}"
        return value

    def label_values(self, name: str, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples if s.name == name and label in s.labels}

    def types(self) -> dict[str, str]:
        """Each metric's name (as Prometheus stores it: counters with _total) and type, from the # TYPE lines."""
        return dict(re.findall(r"^# TYPE (\S+) (\S+)$", self.text, re.MULTILINE))


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy from the environment


def scrape(listen: str, timeout: float = 20) -> Scrape:
    at = time.time()
    with _OPENER.open(f"http://{listen}/metrics", timeout=timeout) as answer:
        assert answer.status == 200
        content_type = answer.headers.get("Content-Type", "")
        text = answer.read().decode()
    record_output(text, "metrics scrape")
    assert content_type.startswith("text/plain"), content_type
    return Scrape(at, text, [s for family in text_string_to_metric_families(text) for s in family.samples])


def until_scraped(run: Run, listen: str, want: Callable[[Scrape], bool], timeout: float) -> Scrape:
    """Scrape each time secret-init or the app says something, until a scrape satisfies `want`."""
    last: list[Scrape] = []

    def done(_: Run) -> bool:
        last[:] = [scrape(listen)]
        return want(last[0])

    run.until(done, timeout)
    return last[0]


class Scraper:
    """Scrapes every 0.2 s in the background, keeping every scrape (or the first error)."""

    def __init__(self, listen: str) -> None:
        self.listen = listen
        self.scrapes: list[Scrape] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.scrapes.append(scrape(self.listen))
            except Exception as e:  # kept for the test to report
                self.errors.append(f"{type(e).__name__}: {e}")
                return
            self._stop.wait(0.2)

    def stop(self) -> list[Scrape]:
        self._stop.set()
        self._thread.join(30)
        return self.scrapes


def with_metrics(cfg: Path, listen: str, extra: str = "") -> Path:
    cfg.write_text(cfg.read_text() + f'\n[metrics]\nlisten = "{listen}"\n{extra}')
    return cfg


def secrets_in(texts: list[str], values: list[tuple[str, str]]) -> list[str]:
    """The kinds of the values found in any text (never the values, so a failure does not print them)."""
    needles: list[tuple[str, str]] = []
    for kind, value in values:
        assert value, f"an empty {kind} proves nothing"
        needles.append((kind, value))
        tail = value.rsplit("/", 1)[-1]  # a lease id's own part, without the path (which may appear)
        if tail != value and len(tail) >= 12:
            needles.append((f"{kind} (its last part)", tail))
    return sorted({kind for kind, needle in needles for text in texts if needle in text})


def lease_ids(run: Run) -> list[tuple[str, str]]:
    ids = [("lease id (log)", e["lease_id"]) for e in run.logs if e.get("lease_id")]
    ids += [("lease id (log)", e[k]) for e in run.logged("lease rotated") for k in ("old_lease", "new_lease") if e[k]]
    return ids


def promtool() -> str:
    if not os.path.exists(PROMTOOL):
        pytest.skip("needs promtool (Debian's prometheus package; scripts/bootstrap installs it)")
    return PROMTOOL


# -- 1. a real rotation, scraped all along ---------------------------------------------------------------


def test_a_sidecar_scraped_through_a_real_rotation(
    raw_bao: RawBao, tmpfs: Path, workdir: Path, app_user: UnixUser
) -> None:
    """default_ttl 3 s, max_ttl 9 s: the lease gauges are in the future and consistent in every scrape,
    the counters move across the rotation, the histogram names operations, no secret is in any scrape,
    and `promtool check metrics` accepts the exposition."""
    database = raw_bao.database
    creds = database.role("3s", "9s")
    listen = f"127.0.0.1:{free_port()}"
    out = tmpfs / "out"
    cfg = with_metrics(lease_config(workdir, out, database.bao, creds, f"{app_user.uid}:{app_user.gid}"), listen)
    secret_id = (workdir / "secret_id").read_text()
    role_id = (workdir / "role_id").read_text()
    sidecar = Run(cfg, None)
    scraper: Scraper | None = None
    passwords: list[str] = []
    try:
        sidecar.until(lambda r: bool(r.logged("lease tracked")), 20)
        assert sidecar.logged("metrics served")[0]["listen"] == listen
        scraper = Scraper(listen)
        passwords.append(register_secret((out / "db_password").read_text(), "database password"))
        first = until_scraped(sidecar, listen, lambda s: s.get(DUE, path=creds) is not None, 20)
        sidecar.until(lambda r: bool(r.logged("lease rotated")), 30)
        passwords.append(register_secret((out / "db_password").read_text(), "database password"))
        first_issued = first.need(ISSUED, path=creds)
        first_renewals = first.need(RENEWALS, result="ok")
        after = until_scraped(
            sidecar, listen,
            lambda s: (s.get(ROTATIONS, result="ok") or 0) >= 1
            and (s.get(ISSUED, path=creds) or 0) > first_issued
            and (s.get(RENEWALS, result="ok") or 0) > first_renewals
            and s.get(DUE, path=creds) is not None,  # the new lease's max TTL is known: its first renewal
            20,
        )  # fmt: skip
        final = scrape(listen)
    finally:
        scrapes = scraper.stop() if scraper is not None else []
        code = sidecar.finish()
    assert code == 0, sidecar.stderr[-3000:]
    assert scraper is not None and scraper.errors == [], scraper.errors if scraper else None
    assert len(scrapes) >= 10, f"only {len(scrapes)} background scrapes"
    assert passwords[0] != passwords[1], "the rotation issued a new password"

    # No secret in any scrape: what Vault handed out (raw audit), the lease ids in the logs, the passwords.
    handed_out = raw_bao.handed_out()
    for kind, given in handed_out:
        if kind in ("client_token", "password"):
            register_secret(given, f"vault {kind} (raw audit)")
    assert {k for k, _ in handed_out} >= {"client_token", "password", "lease_id"}
    values = [*handed_out, *lease_ids(sidecar), ("password", passwords[0]), ("password", passwords[1]),
              ("secret_id", secret_id), ("role_id", role_id), ("root token", raw_bao.bao.root_token)]  # fmt: skip
    assert secrets_in([s.text for s in [first, *scrapes, after, final]], values) == []

    # Before the rotation: one lease, its times in the future and in order.
    assert first.label_values(EXPIRY, "path") == {creds}
    issued, expiry = first.need(ISSUED, path=creds), first.need(EXPIRY, path=creds)
    deadline, due = first.need(DEADLINE, path=creds), first.need(DUE, path=creds)
    assert first.at < expiry <= deadline and first.at < due < deadline, (first.at, issued, expiry, due, deadline)
    assert issued < due
    assert 6.0 <= deadline - issued <= 9.5, f"a 9 s max TTL, lifetime {deadline - issued:.2f} s"
    token_expiry = first.need(TOKEN_EXPIRY)
    assert first.at < token_expiry <= first.at + 121, "the app role's token: ttl 60 s, max 120 s"
    assert first.need(RENEWALS, result="ok") >= 1, "the max-TTL probe is a renewal"
    assert first.need(ROTATIONS, result="ok") == 0 and first.need(ROTATIONS, result="error") == 0
    assert first.need(RESTARTS) == 0, "a sidecar restarts nothing"

    # After it: the counters moved, and the same series carry the new lease.
    assert after.need(RENEWALS, result="ok") > first.need(RENEWALS, result="ok")
    assert after.need(ROTATIONS, result="ok") >= 1 and after.need(ROTATIONS, result="error") == 0
    assert after.label_values(EXPIRY, "path") == {creds}
    assert after.need(DEADLINE, path=creds) > deadline and after.need(ISSUED, path=creds) > issued

    # Every scrape: in the future and consistent; counters never go back.
    previous: dict[str, float] = {}
    for s in sorted([first, *scrapes, after, final], key=lambda s: s.at):
        if s.get(EXPIRY, path=creds) is not None:
            exp, iss, ren = s.need(EXPIRY, path=creds), s.need(ISSUED, path=creds), s.need(RENEWED, path=creds)
            assert iss <= ren < exp and s.at < exp, (s.at, iss, ren, exp)
            dl, d = s.get(DEADLINE, path=creds), s.get(DUE, path=creds)
            assert (dl is None) == (d is None), "deadline and due are both known only after the first renewal"
            if dl is not None and d is not None:
                assert exp <= dl and iss < d < dl, (iss, exp, d, dl)
        for series in ((RENEWALS, "ok"), (ROTATIONS, "ok")):
            value = s.need(series[0], result=series[1])
            assert value >= previous.get(series[0], 0), f"{series} went back"
            previous[series[0]] = value
        assert not [x.name for x in s.samples if x.name.endswith("_created")], "no _created samples"
    ordered = [s for s in scrapes if s.get(ROTATIONS, result="ok") is not None]
    assert ordered[0].need(ROTATIONS, result="ok") < ordered[-1].need(ROTATIONS, result="ok"), "seen moving"

    # Labels: paths and fixed names only.
    own = [x for x in final.samples if x.name.startswith("secret_init_")]
    assert {k for x in own for k in x.labels} <= LABELS
    assert {x.labels["path"] for x in own if "path" in x.labels} == {creds}
    operations = final.label_values(f"{REQUESTS}_count", "operation")
    assert operations <= OPERATIONS, operations - OPERATIONS
    for op in ("login", "read", "renew_lease", "lookup_token"):
        assert final.need(f"{REQUESTS}_count", operation=op) >= 1, op
    assert final.need(f"{REQUESTS}_count", operation="read") >= 2, "the first read and the rotation's"
    for op in operations:
        inf = final.need(f"{REQUESTS}_bucket", operation=op, le="+Inf")
        assert inf == final.need(f"{REQUESTS}_count", operation=op)

    # The metric list in docs/operation.md is the one served.
    types = {name: kind for name, kind in final.types().items() if name.startswith("secret_init_")}
    documented = set(re.findall(r"`(secret_init_\w+)`", metrics_section()))
    assert set(types) == documented, (
        f"served, not documented: {set(types) - documented}; documented, not served: {documented - set(types)}"
    )

    check = subprocess.run([promtool(), "check", "metrics"], input=final.text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    with socket.socket() as again:  # the sidecar closed its port at exit (TIME_WAIT of served scrapes aside)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", int(listen.rsplit(":", 1)[1])))
        again.listen()
    assert database.leases(creds) == []


# -- 2. app restarts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("on_rotate", ["restart", "signal:SIGHUP"])
def test_app_restarts_total_counts_the_restarts_of_a_supervised_app(
    raw_bao: RawBao, tmpfs: Path, workdir: Path, app_user: UnixUser, db_app: list[str], on_rotate: str
) -> None:
    """`run` supervising the probing app: with on_rotate = "restart" the counter follows the restarts;
    with a reload signal the rotations count and the restarts stay at 0."""
    database = raw_bao.database
    creds = database.role("3s", "9s")
    listen = f"127.0.0.1:{free_port()}"
    cfg = lease_config(workdir, tmpfs / "out", database.bao, creds, app_user.name, f'on_rotate = "{on_rotate}"')
    run = Run(with_metrics(cfg, listen), db_app, database.pg.port)
    try:
        run.until(starts(1), 20)
        before = scrape(listen)
        if on_rotate == "restart":
            run.until(starts(2), 30)
            after = until_scraped(run, listen, lambda s: s.need(RESTARTS) >= 1, 20)
            counted = int(after.need(RESTARTS))
            run.until(lambda r: len(r.logged("app restarted")) >= counted, 20)  # none counted that did not happen
        else:
            run.until(lambda r: bool(r.events("reload")), 30)
            after = until_scraped(run, listen, lambda s: s.need(ROTATIONS, result="ok") >= 1, 20)
    finally:
        code = run.finish()
    assert code == 0, run.stderr[-3000:]
    assert before.need(RESTARTS) == 0 and before.need(ROTATIONS, result="ok") == 0
    assert after.need(ROTATIONS, result="ok") >= 1
    if on_rotate == "restart":
        assert 1 <= after.need(RESTARTS) <= len(run.logged("app restarted")) <= len(run.events("start")) - 1
    else:
        assert after.need(RESTARTS) == 0
        assert len(run.events("start")) == 1 and not run.logged("app restarted")
    assert [p for p in run.events("probe") if not p["ok"]] == []
    assert database.leases(creds) == []


# -- 3. a rotation that fails for real -----------------------------------------------------------------


@pytest.mark.hostile("vault-answers")
def test_rotations_total_counts_a_rotation_the_policy_refuses(
    raw_bao: RawBao, tmpfs: Path, workdir: Path, app_user: UnixUser
) -> None:
    """The token's policy loses read on the creds path mid-run: the rotation's read gets a real 403
    (error counted, renewals go on); read is given back: the retry succeeds (ok counted)."""
    database = raw_bao.database
    client = database.bao.client
    creds = database.role("3s", "9s")
    name = f"m{secrets.token_hex(3)}"
    revoke = 'path "sys/leases/revoke" { capabilities = ["update"] }\n'
    client.sys.create_or_update_policy(name, f'path "{creds}" {{ capabilities = ["read"] }}\n{revoke}')
    client.auth.approle.create_or_update_approle(name, token_policies=[name], token_ttl="60s", token_max_ttl="120s")
    listen = f"127.0.0.1:{free_port()}"
    owner = f"{app_user.uid}:{app_user.gid}"
    cfg = lease_config(workdir, tmpfs / "out", database.bao, creds, owner, 'on_expiry = "keep"', role=name)
    sidecar = Run(with_metrics(cfg, listen), None)
    try:
        sidecar.until(lambda r: bool(r.logged("lease tracked")), 20)
        client.sys.create_or_update_policy(name, revoke)  # no read on the creds path any more
        start = scrape(listen)
        failed = until_scraped(sidecar, listen, lambda s: s.need(ROTATIONS, result="error") >= 1, 30)
        client.sys.create_or_update_policy(name, f'path "{creds}" {{ capabilities = ["read"] }}\n{revoke}')
        mended = until_scraped(sidecar, listen, lambda s: s.need(ROTATIONS, result="ok") >= 1, 40)
    finally:
        code = sidecar.finish()
    assert code == 0, sidecar.stderr[-3000:]
    assert start.need(ROTATIONS, result="error") == 0 and start.need(ROTATIONS, result="ok") == 0
    assert failed.need(ROTATIONS, result="ok") == 0
    assert failed.need(RENEWALS, result="ok") > start.need(RENEWALS, result="ok"), "renewals went on meanwhile"
    assert mended.need(ROTATIONS, result="error") >= failed.need(ROTATIONS, result="error")
    refusals = [e for e in sidecar.logged("vault read failed") if e["purpose"] == "rotation"]
    assert refusals and "permission denied" in refusals[0]["error"].lower(), refusals
    assert sidecar.logged("lease rotated"), "the retry rotated"
    assert database.leases(creds) == []


# -- 4. start-up errors, before Vault is touched --------------------------------------------------------

NOT_LOOPBACK = "not a loopback address; set allow_remote = true"
# Addresses that are not loopback are ones no interface here has (TEST-NET-2, the IPv6 documentation
# prefix): if the check broke, the bind would fail rather than listen beyond loopback. The wildcards
# are checked by loading the config, never by a start that could bind them.
BAD_LISTEN = [
    # (listen, extra [metrics] lines, expected exit code, expected words in the error)
    ("198.51.100.7:{port}", "", 78, NOT_LOOPBACK),
    ("198.51.100.7:{port}", "allow_remote = false\n", 78, NOT_LOOPBACK),
    ("[2001:db8::7]:{port}", "", 78, NOT_LOOPBACK),
    ("127.0.0.1", "", 78, 'must be "HOST:PORT"'),
    ("127.0.0.1:0", "", 78, "port 0 must be from 1 to 65535"),
    ("127.0.0.1:65536", "", 78, "port 65536 must be from 1 to 65535"),
    ("[::1]:99999", "", 78, "port 99999 must be from 1 to 65535"),
    ("::1:{port}", "", 78, 'must be "HOST:PORT"'),
    ("garbage", "", 78, 'must be "HOST:PORT"'),
    ("metrics.example:{port}", "", 78, "must be an IP address (or localhost)"),
    # Accepted by the config (allow_remote), then the bind fails: TEST-NET-2 is on no interface here.
    ("198.51.100.7:{port}", "allow_remote = true\n", 78, "Cannot assign requested address"),
]


def start_errors_config(raw_bao: RawBao, workdir: Path, out: Path, app_user: UnixUser) -> tuple[Path, str]:
    creds = raw_bao.database.role("30s", "60s")
    return lease_config(workdir, out, raw_bao.bao, creds, app_user.name), creds


def assert_vault_untouched(raw_bao: RawBao, audited: int, creds: str, stderr: str) -> None:
    assert len(raw_bao.bao.audit_entries()) == audited, "secret-init sent a request to Vault"
    events = [e["event"] for e in log_events(stderr)]
    assert "vault login" not in events and "vault read" not in events, events
    assert raw_bao.database.leases(creds) == []


@pytest.mark.hostile("config")
@pytest.mark.parametrize(
    ("listen", "extra", "code", "words"), BAD_LISTEN, ids=[f"{c[0]} {c[1].strip()}" for c in BAD_LISTEN]
)
def test_a_bad_listen_address_stops_the_start_before_vault(
    raw_bao: RawBao, tmpfs: Path, workdir: Path, app_user: UnixUser, listen: str, extra: str, code: int, words: str
) -> None:
    listen = listen.format(port=free_port())
    cfg, creds = start_errors_config(raw_bao, workdir, tmpfs / "out", app_user)
    with_metrics(cfg, listen, extra)
    audited = len(raw_bao.bao.audit_entries())
    result = run_cli("run", "--config", str(cfg), "--", "/bin/true")
    assert result.returncode == code, result.stderr
    errors = [e for e in log_events(result.stderr) if e["level"] == "error"]
    assert len(errors) == 1 and errors[0]["exit_code"] == code, result.stderr
    assert "[metrics]" in errors[0]["event"] and "listen" in errors[0]["event"], errors[0]
    assert words in errors[0]["event"], errors[0]
    assert_vault_untouched(raw_bao, audited, creds, result.stderr)


@pytest.mark.hostile("config")
@pytest.mark.parametrize("command", ["run", "sidecar"])
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_a_metrics_port_in_use_is_73_before_vault(
    raw_bao: RawBao, tmpfs: Path, workdir: Path, app_user: UnixUser, command: str, family: socket.AddressFamily
) -> None:
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    cfg, creds = start_errors_config(raw_bao, workdir, tmpfs / "out", app_user)
    audited = len(raw_bao.bao.audit_entries())
    with socket.socket(family) as taken:
        taken.bind((host, 0))
        taken.listen()
        port = taken.getsockname()[1]
        listen = f"{host}:{port}" if family == socket.AF_INET else f"[{host}]:{port}"
        with_metrics(cfg, listen)
        args = (
            ["run", "--config", str(cfg), "--", "/bin/true"] if command == "run" else ["sidecar", "--config", str(cfg)]
        )
        result = run_cli(*args)
    assert result.returncode == 73, result.stderr
    errors = [e for e in log_events(result.stderr) if e["level"] == "error"]
    assert len(errors) == 1 and errors[0]["event"] == f"[metrics] listen {listen}: address already in use", errors
    assert_vault_untouched(raw_bao, audited, creds, result.stderr)


@pytest.mark.parametrize("listen", ["0.0.0.0:9102", "[::]:9102", "10.1.2.3:9102", "[fd00::2]:9102"])
def test_a_wildcard_or_remote_listen_needs_allow_remote(tmp_path: Path, listen: str) -> None:
    """Loaded, not started: nothing is bound. Refused with the reason, accepted with allow_remote."""
    from secret_init.config import load
    from secret_init.errors import ConfigError

    cfg = write_config(tmp_path, f'[metrics]\nlisten = "{listen}"\n')
    with pytest.raises(ConfigError, match=re.escape(f"[metrics]: listen {listen} is {NOT_LOOPBACK}")) as refused:
        load(str(cfg), {})
    assert refused.value.exit_code == 78
    cfg.write_text(cfg.read_text() + "allow_remote = true\n")
    metrics = load(str(cfg), {}).metrics
    assert metrics.listen is not None and str(metrics.listen) == listen
    assert metrics.allow_remote and not metrics.listen.is_loopback


def test_allow_remote_lets_the_config_take_an_address_that_is_not_loopback(workdir: Path) -> None:
    """Checked with `check` on an address no interface here has (TEST-NET-2), so nothing listens
    beyond loopback: without allow_remote the config is refused; with it the config is accepted
    and only the bind fails, in the (metrics) row."""
    (workdir / "s").write_text(random_secret())
    listen = f"198.51.100.7:{free_port()}"
    base = (
        f'[output]\ndir = "{workdir / "out"}"\nallow_non_tmpfs = true\n[process]\nallow_root = true\n'
        f'[[secret]]\nname = "s"\nsource = "file:{workdir / "s"}"\n[metrics]\nlisten = "{listen}"\n'
    )
    refused = run_cli("check", "--config", str(write_config(workdir, base)))
    assert refused.returncode == 78, refused.stdout + refused.stderr
    assert f"[metrics]: listen {listen} is not a loopback address; set allow_remote = true" in refused.stderr
    assert "(metrics)" not in refused.stdout, "a refused config gets no table"

    accepted = run_cli("check", "--config", str(write_config(workdir, base + "allow_remote = true\n")))
    assert "not a loopback address" not in accepted.stdout + accepted.stderr
    row = re.search(rf"^\(metrics\)\s+{re.escape(listen)}\s.*$", accepted.stdout, re.MULTILINE)
    assert row and ": Cannot assign requested address" in row[0], accepted.stdout
    assert re.search(r"^s\s.*\sok$", accepted.stdout, re.MULTILINE), accepted.stdout
    assert accepted.returncode == 78, accepted.stdout + accepted.stderr


# -- 5. silent clients ------------------------------------------------------------------------------------


def test_silent_clients_hold_the_scrape_thread_not_the_rotation(
    raw_bao: RawBao, tmpfs: Path, workdir: Path, app_user: UnixUser
) -> None:
    """Three connections that send nothing, replaced as soon as secret-init drops one, keep the one
    scrape thread busy the whole time, on [::1]. Meanwhile the lease is renewed and rotated; each
    silent client is dropped; once they are gone a scrape is answered."""
    database = raw_bao.database
    creds = database.role("3s", "9s")
    port = free_port_v6()
    listen = f"[::1]:{port}"
    owner = f"{app_user.uid}:{app_user.gid}"
    sidecar = Run(with_metrics(lease_config(workdir, tmpfs / "out", database.bao, creds, owner), listen), None)
    silent: list[socket.socket] = []
    dropped = 0

    def connect() -> socket.socket:
        conn = socket.create_connection(("::1", port), timeout=10)
        conn.setblocking(False)
        return conn

    def tend(run: Run) -> bool:
        nonlocal dropped
        for conn in list(silent):
            try:
                data = conn.recv(1024)
            except BlockingIOError:
                continue  # still held (served, or waiting its turn)
            except ConnectionError:
                data = b""
            assert data == b"", f"a client that sent nothing was answered: {data!r}"
            silent.remove(conn)
            conn.close()
            dropped += 1
            silent.append(connect())
        return bool(run.logged("lease rotated")) and dropped >= 2

    try:
        sidecar.until(lambda r: bool(r.logged("lease tracked")), 20)
        before = scrape(listen)
        renewed = len(sidecar.logged("lease renewed"))
        silent.extend(connect() for _ in range(3))
        sidecar.until(tend, 40)
        renewed_while_held = len(sidecar.logged("lease renewed")) - renewed
        for conn in silent:
            conn.close()
        silent.clear()
        later = scrape(listen)
    finally:
        for conn in silent:
            conn.close()
        code = sidecar.finish()
    assert code == 0, sidecar.stderr[-3000:]
    assert renewed_while_held >= 1 and sidecar.logged("lease rotated"), "the loop went on while the clients held"
    assert not [e for e in sidecar.logs if "expired" in e["event"]], "the rotation came in time"
    assert before.need(ROTATIONS, result="ok") == 0
    assert later.need(ROTATIONS, result="ok") >= 1, "the rotation made while the scrape thread was held is counted"
    assert later.label_values(EXPIRY, "path") == {creds}
    assert database.leases(creds) == []


def free_port_v6() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return int(s.getsockname()[1])


# -- 6. run that execs: no metrics, the port is the app's -----------------------------------------------

BIND_APP = r"""
import json, os, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do; a listening socket still blocks the bind
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
    s.listen()
    print(json.dumps({"pid": os.getpid(), "bound": True}))
except OSError as e:
    print(json.dumps({"pid": os.getpid(), "bound": False, "error": e.strerror}))
"""


def test_run_that_execs_closes_the_metrics_port_for_the_app(
    raw_bao: RawBao, tmpfs: Path, workdir: Path, app_user: UnixUser
) -> None:
    """A KV secret only, nothing to renew: the port bound at start is closed before the exec, with
    "metrics not served", and the app (which replaced secret-init) binds the same port."""
    bao = raw_bao.bao
    key = secrets.token_hex(6)
    bao.client.secrets.kv.v2.create_or_update_secret(path=f"app/{key}", secret={"k": random_secret()})
    role_file, secret_file, _ = bao.approle_credentials("app", workdir)
    port = free_port()
    cfg = write_config(
        workdir,
        f'[output]\ndir = "{tmpfs}/out"\nuser = "{app_user.name}"\n'
        f'[vault]\naddr = "{bao.addr}"\nauth = "approle"\nrole_id_file = "{role_file}"\n'
        f'secret_id_file = "{secret_file}"\n'
        f'[[secret]]\nname = "api_key"\nsource = "vault:secret/data/app/{key}#k"\n'
        f'[metrics]\nlisten = "127.0.0.1:{port}"\n',
    )
    app = app_command(workdir, "bind_app", BIND_APP)
    result = run_cli("run", "--config", str(cfg), "--", *app, str(port))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["bound"], f"the app could not bind the metrics port: {report}"
    events = [e["event"] for e in log_events(result.stderr)]
    assert "metrics served" in events and "metrics not served" in events and "exec" in events, events
    assert events.index("metrics served") < events.index("vault login") < events.index("metrics not served")
    assert events.index("metrics not served") < events.index("exec")
    not_served = next(e for e in log_events(result.stderr) if e["event"] == "metrics not served")
    assert not_served["level"] == "info" and "exec" in not_served["reason"], not_served


# -- the alert rules in docs/operation.md ------------------------------------------------------------------


def metrics_section() -> str:
    doc = OPERATION_DOC.read_text()
    match = re.search(r"^## Metrics\n(.*?)(?=^## )", doc, re.MULTILINE | re.DOTALL)
    assert match, "docs/operation.md has no '## Metrics' section"
    return match[1]


def doc_rules() -> str:
    blocks = re.findall(r"^```yaml\n(.*?)^```", metrics_section(), re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, "the Metrics section holds one yaml block: the alert rules"
    return str(blocks[0])


def render(template: str, labels: dict[str, str]) -> str:
    """The `{{ $labels.NAME }}` subset of Go templates that the doc's annotations use."""
    assert "{{" not in re.sub(r"\{\{\s*\$labels\.\w+\s*\}\}", "", template), f"unsupported template: {template}"
    return re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), template)


def test_the_alert_rules_in_the_doc_pass_promtool_and_fire_when_they_should(workdir: Path) -> None:
    """`promtool check rules` on the doc's YAML, then `promtool test rules` on made-up series:

    - a certificate (expiry = deadline = NotAfter, 100 min life) fires with 9 min left, not with 11;
    - a lease whose renewals fail, or whose gauges froze (a stuck secret-init), fires once under 10% of
      what its issue gave it (240 s of 2400 s) is left;
    - a healthy lease whose TTL is a third of its life does not fire, and neither does one with a TTL
      of 1 h and a max TTL of 24 h, renewed when a third of the TTL is left;
    - a rotation error fires the second rule for 15 minutes, successful rotations never do.
    """
    import yaml

    tool = promtool()
    rules_text = doc_rules()
    rules_file = workdir / "rules.yml"
    rules_file.write_text(rules_text)
    check = subprocess.run([tool, "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 2 rules found" in check.stdout, check.stdout

    rules = {r["alert"]: r for group in yaml.safe_load(rules_text)["groups"] for r in group["rules"]}
    assert set(rules) == {"SecretInitLeaseNearExpiry", "SecretInitRotationsFailing"}, set(rules)

    def alert(name: str, **labels: str) -> dict[str, Any]:
        rule = rules.get(name, {"labels": {}, "annotations": {}})
        all_labels = {**labels, **rule.get("labels", {})}
        annotations = {k: render(v, all_labels) for k, v in rule.get("annotations", {}).items()}
        return {"exp_labels": all_labels, "exp_annotations": annotations}

    def gauges(path: str, issued: str, renewed: str, expiry: str, deadline: str) -> list[dict[str, str]]:
        job = 'job="app", instance="app:9102"'
        return [
            {"series": f'{ISSUED}{{{job}, path="{path}"}}', "values": issued},
            {"series": f'{RENEWED}{{{job}, path="{path}"}}', "values": renewed},
            {"series": f'{EXPIRY}{{{job}, path="{path}"}}', "values": expiry},
            {"series": f'{DEADLINE}{{{job}, path="{path}"}}', "values": deadline},
        ]

    def lease(path: str) -> dict[str, str]:
        return {"job": "app", "instance": "app:9102", "path": path}

    # Minutes from 0, values in seconds: the cert lives 0 to 6000 s; 10% of its life is 600 s.
    cert = gauges("pki/issue/web", "0x100", "0x100", "6000x100", "6000x100")
    # Renewals fail from 0 (or the gauges froze): expiry stays 2400 s, what the issue gave it, so it fires
    # below 240 s left (after 36 min).
    failing = gauges("database/creds/failing", "0x60", "0x60", "2400x60", "6000x60")
    # A healthy lease, TTL 2000 s of a 6000 s life, renewed every 20 min when a third is left: never near.
    healthy = gauges("database/creds/healthy", "0x60", "0x20 1200x20 2400x20", "2000x20 3200x20 4400x20", "6000x60")
    # TTL 1 h, max TTL 24 h, renewed when 20 min are left: never under 10% of the hour.
    short_ttl = gauges("database/creds/short", "0x120", "0x39 2400x39 4800x39", "3600x39 6000x39 8400x39", "86400x120")
    counters = [
        {"series": f'{ROTATIONS}{{job="app", instance="app:9102", result="error"}}', "values": "0x10 1x50"},
        {"series": f'{ROTATIONS}{{job="app", instance="app:9102", result="ok"}}', "values": "0+1x60"},
    ]
    near = "SecretInitLeaseNearExpiry"
    failing_rotations = "SecretInitRotationsFailing"
    tests = [
        {
            "interval": "1m",
            "input_series": cert,
            "alert_rule_test": [
                {"eval_time": "89m", "alertname": near, "exp_alerts": []},
                {"eval_time": "91m", "alertname": near, "exp_alerts": [alert(near, **lease("pki/issue/web"))]},
            ],
        },
        {
            "interval": "1m",
            "input_series": failing,
            "alert_rule_test": [
                {"eval_time": "35m", "alertname": near, "exp_alerts": []},
                {"eval_time": "37m", "alertname": near, "exp_alerts": [alert(near, **lease("database/creds/failing"))]},
            ],
        },
        {
            "interval": "1m",
            "input_series": healthy,
            "alert_rule_test": [{"eval_time": f"{m}m", "alertname": near, "exp_alerts": []} for m in range(1, 60, 3)],
        },
        {
            "interval": "1m",
            "input_series": short_ttl,
            "alert_rule_test": [{"eval_time": f"{m}m", "alertname": near, "exp_alerts": []} for m in range(1, 117, 5)],
        },
        {
            "interval": "1m",
            "input_series": counters,
            "alert_rule_test": [
                {"eval_time": "9m", "alertname": failing_rotations, "exp_alerts": []},
                {
                    "eval_time": "12m",
                    "alertname": failing_rotations,
                    "exp_alerts": [alert(failing_rotations, job="app", instance="app:9102", result="error")],
                },
                {"eval_time": "40m", "alertname": failing_rotations, "exp_alerts": []},
            ],
        },
    ]
    unit = workdir / "rules.test.yml"
    unit.write_text(json.dumps({"rule_files": [str(rules_file)], "evaluation_interval": "1m", "tests": tests}))
    ran = subprocess.run([tool, "test", "rules", str(unit)], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stdout + ran.stderr
