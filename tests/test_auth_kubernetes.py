"""auth = "kubernetes" against the session's real OpenBao, with a STAND-IN for one Kubernetes endpoint.

OpenBao's `kubernetes` method checks a service-account token by POSTing a TokenReview to
`<kubernetes_host>/apis/authentication.k8s.io/v1/tokenreviews` (openbao
internal/builtin/credential/kubernetes/token_review.go). No Kubernetes runs here, so
`TokenReviewStandIn` answers that one endpoint the way the API server does, for the tokens a test
tells it to accept:

- the caller is authenticated first, by its `Authorization: Bearer` token: the role's
  `token_reviewer_jwt` if the mount has one, else the very token under review (OpenBao's
  "client JWT as reviewer"). An unknown bearer is answered 401 with a `v1` `Status`
  ("Unauthorized"), as the API server does;
- then the token is reviewed: 201 and an `authentication.k8s.io/v1` TokenReview whose `status` is
  `authenticated: true` with `user.username` = `system:serviceaccount:NS:NAME`, `user.uid`,
  `user.groups` and the `audiences` the token is valid for among those asked; or
  `authenticated: false` with an `error`, for a token it does not know (a deleted pod's) or whose
  audiences do not match.

OpenBao itself is real: its parsing of the claims (without `pem_keys` it does not check the
signature, the review does), issuer, audience and bound name/namespace checks, the comparison of the
review's name/namespace/uid with the claims, and the login. The method is enabled twice at mounts of
this module's own (`k8s-test-XXXX-client`: the pod's token is the reviewer; `k8s-test-XXXX-reviewer`:
a reviewer JWT configured on the mount), both disabled at the end.

The tokens are minted with PyJWT (RS256, a key made here) with the claims a projected
service-account token carries. Every token, its signature, the reviewer JWT and the key are
registered for the session's leak hunt, and checked explicitly against stdout, stderr, status.json
and the app's environment.
"""

import json
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    REPO,
    Bao,
    QuietHandler,
    UnixUser,
    assert_no_leak,
    base_env,
    log_events,
    needs_root,
    random_secret,
    record_output,
    register_secret,
    run_cli,
    secret_files,
    serve_http,
    stop_http,
    write_config,
)

pytestmark = needs_root

NAMESPACE, ACCOUNT, AUDIENCE, ROLE = "shop", "web", "openbao", "web"
ISSUER = "https://kubernetes.default.svc.cluster.local"  # a projected token's; never contacted
DEFAULT_JWT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # /var/run is a link to /run here
TOKENREVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
MODES = ("client-jwt", "reviewer-jwt")  # who authenticates to the API server: the pod's token, or OpenBao's own


@dataclass(frozen=True)
class Account:
    """What the (stand-in) API server knows of a token: whose it is, and for which audiences."""

    namespace: str
    name: str
    uid: str
    audiences: tuple[str, ...]

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.name}"


@dataclass(frozen=True)
class Review:
    """One TokenReview request as the stand-in received it."""

    bearer: str
    token: str
    audiences: list[str]
    body: dict[str, Any]
    status: int  # what the stand-in answered


def kube_status(code: int, reason: str, message: str) -> dict[str, Any]:
    """The `v1` Status object the API server answers a failed request with."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}  # fmt: skip


@dataclass
class TokenReviewStandIn:
    """A STAND-IN for the Kubernetes API server's TokenReview endpoint, and nothing else.

    No Kubernetes runs on this machine, and OpenBao's `kubernetes` method needs an API server to
    review each token; this answers that one request as the API server would (see the module doc).
    `accepted` holds the tokens it knows (a live pod's), `reviewers` the bearer tokens allowed to
    call it besides those; every request is kept in `reviews`.
    """

    accepted: dict[str, Account] = field(default_factory=dict)
    reviewers: set[str] = field(default_factory=set)
    reviews: list[Review] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None
    url: str = ""

    def answer(self, bearer: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """The API server's answer to a TokenReview POSTed with this bearer token."""
        token, wanted = body["spec"]["token"], list(body["spec"].get("audiences") or [])
        if bearer not in self.reviewers and bearer not in self.accepted:
            self.reviews.append(Review(bearer, token, wanted, body, 401))
            return 401, kube_status(401, "Unauthorized", "Unauthorized")
        self.reviews.append(Review(bearer, token, wanted, body, 201))
        status: dict[str, Any] = {"authenticated": False, "user": {}, "error": "[invalid bearer token]"}
        account = self.accepted.get(token)
        if account is not None:
            valid = [a for a in wanted if a in account.audiences] if wanted else list(account.audiences)
            if not valid:
                status["error"] = (
                    f"[invalid bearer token, token audiences {list(account.audiences)} is invalid for the target "
                    f"audiences {wanted}]"
                )
            else:
                groups = ["system:serviceaccounts", f"system:serviceaccounts:{account.namespace}"]
                groups.append("system:authenticated")
                user = {"username": account.username, "uid": account.uid, "groups": groups}
                status = {"authenticated": True, "user": user, "audiences": valid}
        review = {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1"}
        return 201, {**review, "metadata": {"creationTimestamp": None}, "spec": body["spec"], "status": status}

    def start(self) -> None:
        stand_in = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != TOKENREVIEWS:
                    code, document = 404, kube_status(404, "NotFound", "the server could not find the resource")
                else:
                    bearer = self.headers.get("Authorization", "").removeprefix("Bearer ")
                    code, document = stand_in.answer(bearer, json.loads(raw))
                data = json.dumps(document).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server, self.url = serve_http(Handler)


@dataclass
class Cluster:
    bao: Bao
    mounts: dict[str, str]  # mode -> mount path
    review: TokenReviewStandIn
    key: Any  # the signing key of the tokens (OpenBao does not check it; the review does)
    reviewer_jwt: str

    def token(self, accepted: bool = True, name: str = ACCOUNT, audience: str = AUDIENCE) -> str:
        """A projected service-account token for NAMESPACE/name, known to the stand-in or not."""
        account = Account(NAMESPACE, name, str(uuid.uuid4()), (audience,))
        token = mint(self.key, account)
        if accepted:
            self.review.accepted[token] = account
        return token

    def uid(self, token: str) -> str:
        return self.review.accepted[token].uid

    def secrets(self, *tokens: str) -> tuple[str, ...]:
        """Every credential a test's output must not contain."""
        return (*tokens, *(t.rpartition(".")[2] for t in tokens), self.reviewer_jwt, self.bao.root_token)

    def reviews_since(self, seen: int) -> list[Review]:
        return self.review.reviews[seen:]

    def login_audits(self, mount: str, before: int) -> list[dict[str, Any]]:
        """The audit log's responses to logins at auth/<mount>/login since entry `before`."""
        return [e for e in self.bao.audit_entries()[before:]
                if e.get("type") == "response" and e["request"]["path"] == f"auth/{mount}/login"]  # fmt: skip


def mint(key: Any, account: Account) -> str:
    """A token with a projected service-account token's claims, signed RS256 with `key`."""
    import jwt

    now = int(time.time())
    claims = {
        "iss": ISSUER, "aud": list(account.audiences), "iat": now, "nbf": now, "exp": now + 3600,
        "sub": account.username,
        "kubernetes.io": {"namespace": account.namespace,
                          "serviceaccount": {"name": account.name, "uid": account.uid},
                          "pod": {"name": f"{account.name}-0", "uid": str(uuid.uuid4())}},
    }  # fmt: skip
    token = register_secret(jwt.encode(claims, key, algorithm="RS256"), "service-account token")
    register_secret(token.rpartition(".")[2], "service-account token signature")
    return token


@pytest.fixture(scope="module")
def cluster(bao: Bao) -> Iterator[Cluster]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    register_secret(pem.decode().strip(), "service-account signing key")
    review = TokenReviewStandIn()
    reviewer_jwt = mint(key, Account("openbao", "openbao-auth", str(uuid.uuid4()), ("https://kubernetes.default.svc",)))
    review.reviewers.add(reviewer_jwt)
    review.start()
    base = f"k8s-test-{secrets.token_hex(3)}"
    mounts = {"client-jwt": f"{base}-client", "reviewer-jwt": f"{base}-reviewer"}
    enabled: list[str] = []
    try:
        for mode, mount in mounts.items():
            bao.client.sys.enable_auth_method("kubernetes", path=mount)
            enabled.append(mount)
            # disable_local_ca_jwt: OpenBao is not in a pod, so it has no local CA or reviewer JWT; and once
            # that is off it insists on a CA, which it never uses: the stand-in is plain http (accepted as is).
            # disable_iss_validation=false: the issuer claim is checked too (the default skips it).
            reviewer = {"token_reviewer_jwt": reviewer_jwt} if mode == "reviewer-jwt" else {}
            bao.client.write(
                f"auth/{mount}/config", kubernetes_host=review.url, disable_local_ca_jwt=True,
                kubernetes_ca_cert=placeholder_ca(key), issuer=ISSUER, disable_iss_validation=False, **reviewer,
            )  # fmt: skip
            bao.client.write(
                f"auth/{mount}/role/{ROLE}", bound_service_account_names=[ACCOUNT],
                bound_service_account_namespaces=[NAMESPACE], audience=AUDIENCE, token_policies=["app-read"],
                token_ttl="60s", token_max_ttl="120s",
            )  # fmt: skip
        yield Cluster(bao, mounts, review, key, reviewer_jwt)
    finally:
        for mount in enabled:
            bao.client.sys.disable_auth_method(mount)
        assert review.server is not None
        stop_http(review.server)


def placeholder_ca(key: Any) -> str:
    """A self-signed certificate, only because OpenBao's config asks for a CA once local files are off."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stand-in API server CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
    )  # fmt: skip
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def kv_value(bao: Bao) -> tuple[str, str]:
    """A fresh KV v2 secret under the app-read policy's path: (its name, its value)."""
    name, value = f"k8s-{secrets.token_hex(4)}", random_secret("k8s")
    bao.client.secrets.kv.v2.create_or_update_secret(path=f"app/{name}", secret={"value": value})
    return name, value


def config(
    cluster: Cluster, workdir: Path, out: Path, jwt_file: Path | None, kv: str, mode: str = "client-jwt",
    user: str = "65534:65534",
) -> Path:  # fmt: skip
    line = f'jwt_file = "{jwt_file}"' if jwt_file else ""  # none: the kubelet's default path
    return write_config(
        workdir,
        f"""
[output]
dir = "{out}"
user = "{user}"

[vault]
addr = "{cluster.bao.addr}"
auth = "kubernetes"
auth_mount = "{cluster.mounts[mode]}"
role = "{ROLE}"
{line}
startup_timeout = "3s"

[[secret]]
name = "value"
source = "vault:secret/data/app/{kv}#value"
env = "VALUE_FILE"
""",
    )


def status_json(out: Path) -> str:
    path = out / ".secret-init" / "status.json"
    return path.read_text() if path.exists() else ""


def errors(stderr: str) -> list[str]:
    return [e["event"] for e in log_events(stderr) if e.get("level") == "error"]


def logins(stderr: str) -> list[dict[str, Any]]:
    return [e for e in log_events(stderr) if e["event"] == "vault login"]


def server_reason(cluster: Cluster, mount: str, token: str) -> str:
    """What OpenBao itself answers this login: the reason secret-init must pass on."""
    import hvac

    try:
        hvac.Client(url=cluster.bao.addr, token="").write(  # "": not ~/.vault-token or $VAULT_TOKEN
            f"auth/{mount}/login", role=ROLE, jwt=token
        )
    except hvac.exceptions.VaultError as e:
        return "; ".join(str(x) for x in (e.errors or []))
    raise AssertionError("OpenBao accepted a token the test expects refused")


# -- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_login_read_and_render_with_the_pods_token(
    cluster: Cluster, workdir: Path, tmpfs: Path, app_user: UnixUser, probe: list[str], mode: str
) -> None:
    """The pod's token logs in at the mount; OpenBao asked the stand-in about exactly that token.

    Then the same login, and exec of the probe app as the unprivileged user: its environment holds
    no token, no VAULT_/BAO_ variable, not even the token's path.
    """
    mount = cluster.mounts[mode]
    kv, value = kv_value(cluster.bao)
    token = cluster.token()
    jwt_file = workdir / "token"
    jwt_file.write_text(token)
    jwt_file.chmod(0o400)
    seen, before = len(cluster.review.reviews), len(cluster.bao.audit_entries())
    result = run_cli("render", "--config", str(config(cluster, workdir, tmpfs, jwt_file, kv, mode)), env=base_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert secret_files(tmpfs) == ["value"]
    assert (tmpfs / "value").read_text() == value
    assert [(e["auth"], e["mount"], e["token_ttl"], e["renewable"]) for e in logins(result.stderr)] == [
        ("kubernetes", mount, 60, True)
    ], result.stderr[-3000:]
    reviews = cluster.reviews_since(seen)
    assert [(r.token, r.audiences, r.status) for r in reviews] == [(token, [AUDIENCE], 201)], (
        "OpenBao asked the (stand-in) API server about this token, for the role's audience"
    )
    assert reviews[0].bearer == (token if mode == "client-jwt" else cluster.reviewer_jwt)
    # OpenBao's own record of the login: a token for this service account, with the role's policy.
    audited = cluster.login_audits(mount, before)
    assert len(audited) == 1 and not audited[0].get("error"), audited
    auth = audited[0]["auth"]
    assert auth["policies"] == ["app-read", "default"], auth
    assert {k: auth["metadata"][k] for k in ("role", "service_account_name", "service_account_namespace",
                                             "service_account_uid")} == {
        "role": ROLE, "service_account_name": ACCOUNT, "service_account_namespace": NAMESPACE,
        "service_account_uid": cluster.uid(token),
    }  # fmt: skip
    for label, text in {"stdout": result.stdout, "stderr": result.stderr, "status.json": status_json(tmpfs)}.items():
        assert text is not None, label
        assert_no_leak(text, *cluster.secrets(token))

    (tmpfs / "value").unlink()
    cfg = config(cluster, workdir, tmpfs, jwt_file, kv, mode, user=app_user.name)
    ran = run_cli("run", "--config", str(cfg), "--", *probe, str(tmpfs), env=base_env())
    assert ran.returncode == 0, ran.stderr[-3000:]
    report = json.loads(ran.stdout.splitlines()[-1])
    assert report["resuid"] == [app_user.uid] * 3
    assert report["files"]["VALUE_FILE"] == {"path": str(tmpfs / "value"), "readable": True, "bytes": len(value)}
    assert [e["auth"] for e in logins(ran.stderr)] == ["kubernetes"]
    assert [r.token for r in cluster.reviews_since(seen)] == [token, token]
    env = json.dumps(report["env"])
    assert not [k for k in report["env"] if k.startswith(("VAULT_", "BAO_"))], report["env"]
    assert str(jwt_file) not in env and DEFAULT_JWT_DIR not in env, "the app is not told where the token is"
    for label, text in {"run stdout": ran.stdout, "run stderr": ran.stderr, "app env": env,
                        "status.json": status_json(tmpfs)}.items():  # fmt: skip
        assert text is not None, label
        assert_no_leak(text, *cluster.secrets(token))


REFUSALS = {
    # case: (mode, what the stand-in answered OpenBao's review, or None when OpenBao refused before asking)
    "pod-token-unknown-to-the-api-server": ("client-jwt", 401),  # the bearer is the bad token: Unauthorized
    "review-says-not-authenticated": ("reviewer-jwt", 201),  # authenticated: false, with an error
    "another-service-account": ("client-jwt", None),  # bound_service_account_names
    "another-audience": ("reviewer-jwt", None),  # the role's audience is not in the token's aud
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_refused_token_is_77_with_the_servers_reason_and_never_the_token(
    cluster: Cluster, workdir: Path, tmpfs: Path, case: str
) -> None:
    """The review says no (a deleted pod's token), or OpenBao's role refuses the claims: 77, one line."""
    mode, answered = REFUSALS[case]
    mount = cluster.mounts[mode]
    kv, _ = kv_value(cluster.bao)
    token = {
        "pod-token-unknown-to-the-api-server": lambda: cluster.token(accepted=False),
        "review-says-not-authenticated": lambda: cluster.token(accepted=False),
        "another-service-account": lambda: cluster.token(name="intruder"),
        "another-audience": lambda: cluster.token(audience="https://kubernetes.default.svc"),
    }[case]()
    jwt_file = workdir / "token"
    jwt_file.write_text(token)
    seen = len(cluster.review.reviews)
    result = run_cli("render", "--config", str(config(cluster, workdir, tmpfs, jwt_file, kv, mode)), env=base_env())
    assert result.returncode == 77, result.stderr[-3000:]
    reviews = cluster.reviews_since(seen)
    if answered is None:
        assert reviews == [], "OpenBao refused on the claims, without asking the API server"
    else:
        assert [(r.token, r.status) for r in reviews] == [(token, answered)], reviews
    found = errors(result.stderr)
    assert len(found) == 1, result.stderr[-3000:]
    reason = server_reason(cluster, mount, token)
    assert reason, "OpenBao gives a reason"
    assert f"Kubernetes login at auth/{mount} denied: HTTP 403: {reason}" in found[0], (found[0], reason)
    assert "\n" not in found[0]
    assert logins(result.stderr) == [] and secret_files(tmpfs) == []
    for label, text in {"stdout": result.stdout, "stderr": result.stderr, "status.json": status_json(tmpfs)}.items():
        assert text is not None, label
        assert_no_leak(text, *cluster.secrets(token))


@pytest.mark.parametrize("content", ["missing", "empty"])
def test_a_missing_or_empty_jwt_file_is_66_with_the_path(
    cluster: Cluster, workdir: Path, tmpfs: Path, content: str
) -> None:
    kv, _ = kv_value(cluster.bao)
    jwt_file = workdir / "no-token"
    if content == "empty":
        jwt_file.write_text("\n")
    seen, before = len(cluster.review.reviews), len(cluster.bao.audit_entries())
    result = run_cli("render", "--config", str(config(cluster, workdir, tmpfs, jwt_file, kv)), env=base_env())
    assert result.returncode == 66, result.stderr[-3000:]
    found = errors(result.stderr)
    assert len(found) == 1, result.stderr[-3000:]
    expected = "does not exist" if content == "missing" else "is empty"
    assert f"vault jwt_file: {jwt_file} {expected}" in found[0], found[0]
    assert cluster.reviews_since(seen) == [] and cluster.login_audits(cluster.mounts["client-jwt"], before) == [], (
        "no login was tried"
    )
    assert secret_files(tmpfs) == []


@pytest.mark.parametrize("present", [True, False], ids=["token-there", "no-token"])
def test_without_jwt_file_the_kubelets_token_path_is_read(
    cluster: Cluster, workdir: Path, tmpfs: Path, present: bool
) -> None:
    """No jwt_file: /var/run/secrets/kubernetes.io/serviceaccount/token, where the kubelet puts it.

    secret-init runs in a private mount namespace (`unshare --mount`) with a tmpfs over /run
    (/var/run links to it here), holding the token at that path, so the host's /run is never
    touched. Without the token there, 66 names the default path.
    """
    assert Path("/var/run").resolve() == Path("/run") or not Path("/var/run").is_symlink()
    kv, value = kv_value(cluster.bao)
    token = cluster.token()
    staged = workdir / "staged-token"
    staged.write_text(token)
    staged.chmod(0o400)
    cfg = config(cluster, workdir, tmpfs, None, kv)
    assert "jwt_file" not in cfg.read_text()
    place = f"mkdir -p {DEFAULT_JWT_DIR} && cp {staged} {DEFAULT_JWT_DIR}/token && " if present else ""
    script = (
        f"mount -t tmpfs -o mode=0755 tmpfs /run && {place}exec {sys.executable} -m secret_init render --config {cfg}"
    )
    seen = len(cluster.review.reviews)
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    record_output(result.stdout, "secret-init in a private mount namespace: stdout")
    record_output(result.stderr, "secret-init in a private mount namespace: stderr")
    assert not Path(f"{DEFAULT_JWT_DIR}/token").exists(), "the host's /run was not touched"
    if present:
        assert result.returncode == 0, result.stderr[-3000:]
        assert (tmpfs / "value").read_text() == value
        assert [(e["auth"], e["mount"]) for e in logins(result.stderr)] == [
            ("kubernetes", cluster.mounts["client-jwt"])
        ]
        assert [r.token for r in cluster.reviews_since(seen)] == [token], "the token at the kubelet's path was used"
    else:
        assert result.returncode == 66, result.stderr[-3000:]
        found = errors(result.stderr)
        assert len(found) == 1 and f"vault jwt_file: {DEFAULT_JWT_DIR}/token does not exist" in found[0], found
        assert cluster.reviews_since(seen) == [] and secret_files(tmpfs) == []
    for label, text in {"stdout": result.stdout, "stderr": result.stderr, "status.json": status_json(tmpfs)}.items():
        assert text is not None, label
        assert_no_leak(text, *cluster.secrets(token))
