"""auth = "kubernetes" against the session's real OpenBao, with a STAND-IN for one Kubernetes endpoint.

OpenBao's `kubernetes` method checks a service-account token by POSTing a TokenReview to
`<kubernetes_host>/apis/authentication.k8s.io/v1/tokenreviews`. No Kubernetes runs here, so
`TokenReviewStandIn` answers that one endpoint, as the API server would (an `authentication.k8s.io/v1`
TokenReview with `status.authenticated`, `status.user.username` = `system:serviceaccount:NS:NAME`,
`status.user.uid`, `status.audiences`), for the tokens a test tells it to accept. OpenBao itself,
its role checks (bound names, namespaces, audience) and the login are real: the method is enabled at
a mount of its own (`k8s-test-XXXX`, disabled at the end).

Without `pem_keys` OpenBao does not verify the JWT's signature (the API server does, through the
review), but it parses the claims, so the tokens are minted with PyJWT with the claims a projected
service-account token carries. Every token and the signing key are registered for the leak hunt.
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
    assert_no_leak,
    base_env,
    log_events,
    needs_root,
    random_secret,
    record_output,
    register_secret,
    run_cli,
    serve_http,
    stop_http,
    write_config,
)

pytestmark = needs_root

NAMESPACE, ACCOUNT, AUDIENCE = "shop", "web", "openbao"
ISSUER = "https://kubernetes.default.svc.cluster.local"  # a projected token's; never contacted
DEFAULT_JWT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@dataclass
class TokenReviewStandIn:
    """A stand-in for the Kubernetes API server's TokenReview endpoint, and nothing else (see the module doc)."""

    accepted: dict[str, str] = field(default_factory=dict)  # token -> service-account uid
    reviewed: list[str] = field(default_factory=list)  # every token OpenBao asked about, in order
    server: ThreadingHTTPServer | None = None
    url: str = ""

    def start(self) -> None:
        stand_in = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                if self.path != "/apis/authentication.k8s.io/v1/tokenreviews":  # OpenBao sends no kind
                    self.send_error(404)
                    return
                token = body["spec"]["token"]
                stand_in.reviewed.append(token)
                status: dict[str, Any] = {"authenticated": False, "error": "[invalid bearer token]"}
                if token in stand_in.accepted:
                    status = {
                        "authenticated": True,
                        "user": {
                            "username": f"system:serviceaccount:{NAMESPACE}:{ACCOUNT}",
                            "uid": stand_in.accepted[token],
                            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{NAMESPACE}"],
                        },
                        "audiences": body["spec"].get("audiences") or [AUDIENCE],
                    }
                answer = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                     "spec": body["spec"], "status": status}).encode()  # fmt: skip
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server, self.url = serve_http(Handler)


@dataclass
class Cluster:
    bao: Bao
    mount: str
    review: TokenReviewStandIn
    key: Any  # the signing key of the tokens (OpenBao does not check it; the review does)

    def token(self, accepted: bool = True, name: str = ACCOUNT) -> str:
        """A projected service-account token for NAMESPACE/name, accepted by the stand-in or not."""
        import jwt

        uid, now = str(uuid.uuid4()), int(time.time())
        claims = {
            "iss": ISSUER, "aud": [AUDIENCE], "iat": now, "nbf": now,
            "exp": now + 600, "sub": f"system:serviceaccount:{NAMESPACE}:{name}",
            "kubernetes.io": {"namespace": NAMESPACE, "serviceaccount": {"name": name, "uid": uid},
                              "pod": {"name": "web-0", "uid": str(uuid.uuid4())}},
        }  # fmt: skip
        token = register_secret(jwt.encode(claims, self.key, algorithm="RS256"), "service-account token")
        register_secret(token.rpartition(".")[2], "service-account token signature")
        if accepted:
            self.review.accepted[token] = uid
        return token


@pytest.fixture(scope="module")
def cluster(bao: Bao) -> Iterator[Cluster]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    register_secret(pem.decode().strip(), "service-account signing key")
    review = TokenReviewStandIn()
    review.start()
    mount = f"k8s-test-{secrets.token_hex(3)}"
    bao.client.sys.enable_auth_method("kubernetes", path=mount)
    try:
        # disable_local_ca_jwt: not in a pod, so no local CA or reviewer JWT; the stand-in is plain http,
        # so the CA OpenBao then requires is a placeholder it never uses.
        bao.client.write(
            f"auth/{mount}/config", kubernetes_host=review.url, disable_local_ca_jwt=True,
            kubernetes_ca_cert=placeholder_ca(key), issuer=ISSUER,
        )  # fmt: skip
        bao.client.write(
            f"auth/{mount}/role/web", bound_service_account_names=[ACCOUNT],
            bound_service_account_namespaces=[NAMESPACE], audience=AUDIENCE, token_policies=["app-read"],
            token_ttl="60s",
        )  # fmt: skip
        yield Cluster(bao, mount, review, key)
    finally:
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


def kv_value(bao: Bao, name: str) -> str:
    value = register_secret(random_secret(), "kv value")
    bao.client.secrets.kv.v2.create_or_update_secret(path=f"app/{name}", secret={"value": value})
    return value


def config(cluster: Cluster, workdir: Path, out: Path, jwt_file: Path | None, name: str = "k8s") -> Path:
    line = f'jwt_file = "{jwt_file}"' if jwt_file else ""  # none: the kubelet's default path
    return write_config(
        workdir,
        f"""
[output]
dir = "{out}"

[vault]
addr = "{cluster.bao.addr}"
auth = "kubernetes"
auth_mount = "{cluster.mount}"
role = "web"
{line}
startup_timeout = "3s"

[[secret]]
name = "value"
source = "vault:secret/data/app/{name}#value"
""",
    )


def test_login_read_and_render_with_the_pods_token(cluster: Cluster, workdir: Path, tmpfs: Path) -> None:
    value = kv_value(cluster.bao, "k8s")
    token = cluster.token()
    jwt_file = workdir / "token"
    jwt_file.write_text(token)
    seen = len(cluster.review.reviewed)
    result = run_cli("render", "--config", str(config(cluster, workdir, tmpfs, jwt_file)))
    assert result.returncode == 0, result.stderr
    assert (tmpfs / "value").read_text() == value
    logins = [e for e in log_events(result.stderr) if e["event"] == "vault login"]
    assert [(e["auth"], e["mount"]) for e in logins] == [("kubernetes", cluster.mount)]
    assert cluster.review.reviewed[seen:] == [token], "OpenBao asked the (stand-in) API server about this token"
    assert_no_leak(result.stdout + result.stderr, token, value)


@pytest.mark.parametrize("case", ["review-refuses", "another-service-account"])
def test_a_refused_token_is_77_and_the_token_stays_out_of_the_message(
    cluster: Cluster, workdir: Path, tmpfs: Path, case: str
) -> None:
    """The review says no (a deleted pod's token), or the role is not bound to the account: 77, one line."""
    kv_value(cluster.bao, "k8s-refused")
    token = cluster.token(accepted=False) if case == "review-refuses" else cluster.token(name="intruder")
    jwt_file = workdir / "token"
    jwt_file.write_text(token)
    seen = len(cluster.review.reviewed)
    result = run_cli("render", "--config", str(config(cluster, workdir, tmpfs, jwt_file, "k8s-refused")))
    # The stand-in is asked only when OpenBao's own role checks pass: it refuses the first, the role the second.
    assert cluster.review.reviewed[seen:] == ([token] if case == "review-refuses" else [])
    assert result.returncode == 77, result.stderr
    error = log_events(result.stderr)[-1]
    assert f"Kubernetes login at auth/{cluster.mount} denied: HTTP 403" in error["event"], error
    assert "\n" not in error["event"] and not (tmpfs / "value").exists()
    assert_no_leak(result.stdout + result.stderr, token)


def test_a_missing_jwt_file_is_66(cluster: Cluster, workdir: Path, tmpfs: Path) -> None:
    seen = len(cluster.review.reviewed)
    missing = workdir / "no-token"
    result = run_cli("render", "--config", str(config(cluster, workdir, tmpfs, missing)))
    assert result.returncode == 66, result.stderr
    assert f"vault jwt_file: {missing} does not exist" in log_events(result.stderr)[-1]["event"]
    assert cluster.review.reviewed[seen:] == [], "no login was tried"


def test_without_jwt_file_the_kubelets_token_path_is_read(cluster: Cluster, workdir: Path, tmpfs: Path) -> None:
    """No jwt_file: the token at /var/run/secrets/kubernetes.io/serviceaccount/token, as a pod has it.

    secret-init runs in a private mount namespace (unshare -m) with a tmpfs over /run holding the token
    there, so the host's /run is never touched.
    """
    value = kv_value(cluster.bao, "k8s-default")
    token = cluster.token()
    staged = workdir / "staged-token"
    staged.write_text(token)
    cfg = config(cluster, workdir, tmpfs, None, "k8s-default")
    script = (
        f"mount -t tmpfs -o mode=0755 tmpfs /run && mkdir -p {DEFAULT_JWT_DIR} && "
        f"cp {staged} {DEFAULT_JWT_DIR}/token && exec {sys.executable} -m secret_init render --config {cfg}"
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    record_output(result.stdout + result.stderr, "secret-init in a private mount namespace")
    assert result.returncode == 0, result.stderr
    assert (tmpfs / "value").read_text() == value
    assert not Path(f"{DEFAULT_JWT_DIR}/token").exists(), "the host's /run was not touched"
    assert_no_leak(result.stdout + result.stderr, token, value)
