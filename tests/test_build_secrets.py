"""The image build's one credential, a private package index's URL with its token, as a BuildKit secret.

The repository's Dockerfile is built on a real engine (tests/engine.py) with
`--secret id=pip_index_url,src=FILE` and no ./wheels in the context, so pip inside the build
can only install through that index. The index is real: a PEP 503 "simple" index served by
this test on 127.0.0.1 (http.server) with the wheels `pip wheel` made from a copy of the
checkout, answering 401 to any request without the token (HTTP basic auth). The build runs
with `--network host` to reach it.

Then the token must be nowhere in the image: `docker save` of the final image and of the
build stage, every file of every layer tar (gzip members unpacked) plus the image configs and
the manifest, searched for the token and the whole URL in their common encodings; and
`docker history --no-trunc`, `docker image inspect` and the build's own output.

The negative controls build tiny images that leak a token on purpose (a file, a gzip file, a
build arg, an ENV) and require the same searches to find each one: the search can fail.
"""

import base64
import gzip
import hmac
import http.client
import io
import json
import re
import secrets
import string
import subprocess
import sys
import tarfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO, QuietHandler, random_secret, record_output, register_secret, serve_http, stop_http
from tests.engine import (
    Engine,
    build_context,
    buildkit,
    import_base,
    pip_wheel,
    running_engine,
)
from tests.figures import encodings

IMAGE = "secret-init:private-index"
INDEX_USER = "ci"


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with running_engine() as engine:
        import_base(engine)
        yield engine


# -- a private package index ------------------------------------------------------------


@dataclass
class IndexLog:
    requests: list[tuple[str, bool]] = field(default_factory=list)  # (path, authorized)

    def downloads(self) -> set[str]:
        return {path.rsplit("/", 1)[1] for path, ok in self.requests if ok and path.startswith("/files/")}


def normalize(project: str) -> str:
    return re.sub(r"[-_.]+", "-", project).lower()


def private_index(root: Path, user: str, token: str) -> tuple[type[QuietHandler], IndexLog]:
    """A PEP 503 simple index of the wheels in `root`, behind HTTP basic auth with `user:token`."""
    log = IndexLog()
    expected = "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()
    wheels = {p.name: p for p in root.glob("*.whl")}
    projects: dict[str, list[str]] = {}
    for name in sorted(wheels):
        projects.setdefault(normalize(name.split("-", 1)[0]), []).append(name)

    class Index(QuietHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            authorized = hmac.compare_digest(self.headers.get("Authorization", ""), expected)
            log.requests.append((self.path, authorized))
            if not authorized:
                self.answer(401, b"token required\n", "text/plain", {"WWW-Authenticate": 'Basic realm="private"'})
                return
            path = self.path.split("?", 1)[0]
            if path == "/simple/":
                links = "".join(f'<a href="/simple/{p}/">{p}</a>\n' for p in projects)
                self.answer(200, f"<!DOCTYPE html><html><body>\n{links}</body></html>\n".encode())
            elif path.startswith("/simple/") and normalize(path[8:].strip("/")) in projects:
                files = projects[normalize(path[8:].strip("/"))]
                links = "".join(f'<a href="/files/{f}">{f}</a>\n' for f in files)
                self.answer(200, f"<!DOCTYPE html><html><body>\n{links}</body></html>\n".encode())
            elif path.startswith("/files/") and path[7:] in wheels:
                self.answer(200, wheels[path[7:]].read_bytes(), "application/octet-stream")
            else:
                self.answer(404, b"not found\n", "text/plain")

        def answer(
            self, status: int, body: bytes, kind: str = "text/html", headers: dict[str, str] | None = None
        ) -> None:
            self.send_response(status)
            for key, value in {"Content-Type": kind, "Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

    return Index, log


# -- searching an image -----------------------------------------------------------------


def needles(**values: str) -> dict[str, bytes]:
    """Each value in every encoding the session's leak hunt knows (raw, base64 at any alignment, hex, ...)."""
    return {
        f"{what} ({how})": needle.encode() for what, value in values.items() for how, needle in encodings(value).items()
    }


def found(data: bytes, wanted: dict[str, bytes]) -> list[str]:
    return [label for label, needle in wanted.items() if needle in data]


@dataclass
class Scan:
    findings: list[str] = field(default_factory=list)
    layers: int = 0
    files: int = 0
    bytes: int = 0
    paths: set[str] = field(default_factory=set)


def scan_saved_image(engine: Engine, image: str, wanted: dict[str, bytes], workdir: Path) -> Scan:
    """`docker save`, then every member of the archive (manifest, configs, layer tars, raw) and every file
    in every layer (contents, names, link targets, PAX headers; gzip files also unpacked)."""
    archive = workdir / f"{secrets.token_hex(4)}.tar"
    engine.docker("save", "-o", str(archive), image, timeout=600)
    scan = Scan()
    try:
        with tarfile.open(archive) as saved:
            for member in saved:
                data = _read(saved, member)
                if data is None:
                    continue
                scan.bytes += len(data)
                scan.findings += [f"{label} in {member.name}" for label in found(data, wanted)]
                if tarfile.is_tarfile(io.BytesIO(data)):  # a layer (configs and manifests are JSON)
                    scan.layers += 1
                    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as layer:
                        _scan_layer(layer, member.name, wanted, scan)
    finally:
        archive.unlink(missing_ok=True)
    return scan


def _scan_layer(layer: tarfile.TarFile, name: str, wanted: dict[str, bytes], scan: Scan) -> None:
    for entry in layer:
        scan.paths.add(entry.name)
        header = "\0".join([entry.name, entry.linkname, *entry.pax_headers.values()]).encode()
        scan.findings += [f"{label} in the name or headers of {entry.name} ({name})" for label in found(header, wanted)]
        data = _read(layer, entry)
        if data is None:
            continue
        scan.files += 1
        scan.findings += [f"{label} in {entry.name} ({name})" for label in found(data, wanted)]
        if data[:2] == b"\x1f\x8b":
            try:
                unpacked = gzip.decompress(data)
            except (OSError, EOFError):
                continue
            scan.findings += [f"{label} in gunzipped {entry.name} ({name})" for label in found(unpacked, wanted)]


def _read(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes | None:
    if not member.isfile():
        return None
    handle = archive.extractfile(member)
    return handle.read() if handle else None


def metadata_findings(engine: Engine, image: str, wanted: dict[str, bytes]) -> dict[str, list[str]]:
    """`docker history --no-trunc` and `docker image inspect`: what anyone who pulls the image sees."""
    history = engine.docker("history", "--no-trunc", image)
    inspected = engine.docker("image", "inspect", image)
    return {
        "history": found((history.stdout + history.stderr).encode(), wanted),
        "inspect": found(inspected.stdout.encode(), wanted),
    }


def index_url(address: str, token: str) -> str:
    """`http://ci:{token}@127.0.0.1:{port}/simple/`, registered for the session's leak hunt."""
    return register_secret(
        address.replace("http://", f"http://{INDEX_USER}:{token}@") + "/simple/", "private index URL"
    )


def index_status(address: str, path: str, auth: tuple[str, str] | None = None) -> int:
    connection = http.client.HTTPConnection(address.removeprefix("http://"), timeout=10)
    headers = {"Authorization": "Basic " + base64.b64encode(":".join(auth).encode()).decode()} if auth else {}
    try:
        connection.request("GET", path, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


# -- the tests --------------------------------------------------------------------------


def test_index_token_is_a_build_secret_in_no_layer(engine: Engine, tmp_path: Path) -> None:
    """pip installs through the private index with the mounted URL; the token is nowhere in the image."""
    context = build_context(tmp_path, wheels=False)
    assert not (context / "wheels").exists(), "no wheels: pip must go to the index"
    build_requires = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    wheels = tmp_path / "index"
    pip_wheel(wheels, str(context), *build_requires)
    token = random_secret("idx")
    handler, log = private_index(wheels, INDEX_USER, token)
    server, address = serve_http(handler)
    try:
        assert index_status(address, "/simple/hvac/") == 401, "the index refuses a request without the token"
        assert index_status(address, "/simple/hvac/", (INDEX_USER, secrets.token_urlsafe(18))) == 401
        url = index_url(address, token)
        secret_file = tmp_path / "pip_index_url"  # outside the context
        secret_file.write_text(url + "\n")
        secret_file.chmod(0o600)

        build = buildkit(
            engine, context, "--no-cache", "--secret", f"id=pip_index_url,src={secret_file}", "-t", IMAGE,
            network="host",
        )  # fmt: skip
        output = build.stdout + build.stderr
        record_output(output, "docker build --secret id=pip_index_url")
        assert build.returncode == 0, output[-4000:]
        stage = buildkit(
            engine, context, "--secret", f"id=pip_index_url,src={secret_file}", "--target", "build",
            "-t", f"{IMAGE}-build-stage", network="host",
        )  # fmt: skip
        record_output(stage.stdout + stage.stderr, "docker build --target build")
        assert stage.returncode == 0, (stage.stdout + stage.stderr)[-4000:]
    finally:
        stop_http(server)

    # pip used the index, with the token, for everything it installed
    assert f"Looking in indexes: http://{INDEX_USER}:****@127.0.0.1:" in output, "pip read the mounted URL"
    expected = {p.name for p in wheels.glob("*.whl") if not p.name.startswith("secret_init-")}
    assert {"hvac", "setuptools", "structlog"} <= {normalize(name.split("-", 1)[0]) for name in expected}
    assert log.downloads() == expected, "every dependency and the build backend came from the private index"
    assert not [path for path, ok in log.requests if path.startswith("/files/") and not ok]
    print(f"[build-secrets] index: {len(log.requests)} requests, {sum(ok for _, ok in log.requests)} authorized")

    version = engine.docker("run", "--rm", "--network", "none", "--entrypoint", "secret-init", IMAGE, "--version")
    assert re.fullmatch(r"secret-init \d+\.\d+\.\d+\S*\n", version.stdout), version.stdout

    wanted = needles(token=token, url=url)
    assert found(output.encode(), wanted) == [], "pip printed the URL redacted, BuildKit not at all"
    for image in (IMAGE, f"{IMAGE}-build-stage"):
        assert metadata_findings(engine, image, wanted) == {"history": [], "inspect": []}, image
        scan = scan_saved_image(engine, image, wanted, tmp_path)
        print(f"[build-secrets] {image}: {scan.layers} layers, {scan.files} files, {scan.bytes} bytes searched")
        assert scan.findings == [], f"{image}: {scan.findings}"
        assert "opt/secret-init/bin/secret-init" in scan.paths, "the layer pip installed into was searched"
        assert scan.files > 1000 and scan.layers >= 3
    record_output(engine.docker("history", "--no-trunc", f"{IMAGE}-build-stage").stdout, "build stage history")
    engine.docker("rmi", f"{IMAGE}-build-stage")


LEAKS = {
    # name: (Dockerfile lines after FROM, passed as a build arg rather than a secret, where it must be found)
    "file": (
        "RUN --mount=type=secret,id=pip_index_url cp /run/secrets/pip_index_url /etc/index-url",
        False,
        {"saved"},
    ),
    "gzip-file": (
        "RUN --mount=type=secret,id=pip_index_url gzip -c /run/secrets/pip_index_url > /etc/index-url.gz",
        False,
        {"saved"},
    ),
    "build-arg": ('ARG PIP_INDEX_URL\nRUN test -n "$PIP_INDEX_URL"', True, {"saved", "history"}),
    "env": ("ARG PIP_INDEX_URL\nENV PIP_INDEX_URL=${PIP_INDEX_URL}", True, {"saved", "history", "inspect"}),
}


@pytest.mark.parametrize("case", sorted(LEAKS))
def test_each_search_finds_a_planted_leak(engine: Engine, tmp_path: Path, case: str) -> None:
    """Negative controls: a token written to a file (plain or gzip), passed as ARG or ENV, is found where it lands.

    A secret mount that is copied out leaks into a layer but not into the history or the config.
    """
    lines, as_arg, where = LEAKS[case]
    token = random_secret("idx")
    url = index_url("http://127.0.0.1:9", token)
    secret_file = tmp_path / "pip_index_url"
    secret_file.write_text(url)
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(f"ARG BASE\nFROM ${{BASE}}\n{lines}\n")
    source = ["--build-arg", f"PIP_INDEX_URL={url}"] if as_arg else ["--secret", f"id=pip_index_url,src={secret_file}"]
    tag = f"leak-control:{case}"
    build = buildkit(engine, context, *source, "-t", tag)
    assert build.returncode == 0, (build.stdout + build.stderr)[-3000:]
    try:
        wanted = needles(token=token)
        meta = metadata_findings(engine, tag, wanted)
        scan = scan_saved_image(engine, tag, wanted, tmp_path)
    finally:
        engine.docker("rmi", tag)  # it leaks on purpose: gone before the session's leak hunt reads the engine
    hits = {"saved": scan.findings, **meta}
    assert {channel for channel, found_there in hits.items() if found_there} == where, hits
    if case == "gzip-file":
        assert all("gunzipped etc/index-url.gz" in finding for finding in scan.findings), scan.findings


def test_compose_build_secrets_example_is_valid(engine: Engine, tmp_path: Path) -> None:
    """The Compose file in docs/build-secrets.md parses and hands the secret to the build.

    Only `config`: Compose builds with secrets only through the buildx plugin, which this machine lacks.
    """
    doc = (REPO / "docs" / "build-secrets.md").read_text()
    example = re.search(r"### Compose\n\n```yaml\n(.*?)```", doc, re.S)
    assert example, "docs/build-secrets.md has a Compose example"
    (tmp_path / "compose.yaml").write_text(example.group(1))
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    result = engine.compose("-f", str(tmp_path / "compose.yaml"), "config", check=False)
    assert result.returncode == 0, result.stderr
    assert re.search(r"build:\n(?:\s+.*\n)*?\s+secrets:\n\s+- source: pip_index_url\n", result.stdout), result.stdout
    assert "environment: PIP_INDEX_URL" in result.stdout


# -- the repository -----------------------------------------------------------------------

KEY_FILE_SUFFIXES = (".pem", ".key", ".crt", ".cer", ".der", ".p12", ".pfx", ".jks", ".keystore")
PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.S)


def key_material(path: Path) -> list[str]:
    """PEM blocks with a real body (64+ base64 characters: placeholders in tests are short words), and key files."""
    found_here = []
    if path.suffix.lower() in KEY_FILE_SUFFIXES or path.name.startswith(("id_rsa", "id_ecdsa", "id_ed25519")):
        found_here.append(f"{path.name}: a key or certificate file name")
    for match in PEM_BLOCK.finditer(path.read_bytes()):
        body = re.sub(rb"\s+", b"", match.group(2))
        if len(body) >= 64 and re.fullmatch(rb"[A-Za-z0-9+/=]+", body):
            found_here.append(f"{path.name}: a PEM {match.group(1).decode()} of {len(body)} base64 characters")
    return found_here


def tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [REPO / name for name in listed.decode().split("\0") if name and (REPO / name).is_file()]


def test_no_private_key_or_certificate_is_tracked(tmp_path: Path) -> None:
    """Tests make their keys and certificates in temp dirs; none is in the repository."""
    files = tracked_files()
    assert len(files) > 50 and REPO / "Dockerfile" in files
    assert [finding for path in files for finding in key_material(path)] == []
    # the check itself finds a real key and certificate, made here
    key, cert = tmp_path / "control.txt", tmp_path / "cert.txt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=t",
         "-keyout", str(key), "-out", str(cert), "-days", "1"],
        check=True, capture_output=True,
    )  # fmt: skip
    register_secret(key.read_text().strip(), "negative-control key")
    assert [f.split(": ")[1].split(" of ")[0] for f in key_material(key)] == ["a PEM PRIVATE KEY"]
    assert [f.split(": ")[1].split(" of ")[0] for f in key_material(cert)] == ["a PEM CERTIFICATE"]


def test_secrets_baseline_is_audited_and_scans_for_real(tmp_path: Path) -> None:
    """Each finding in .secrets.baseline is audited as no secret; the baseline's plugins catch a planted key."""
    baseline = json.loads((REPO / ".secrets.baseline").read_text())
    assert baseline["version"] == "1.5.0"
    unaudited = [
        f"{name}:{item['line_number']} {item['type']}"
        for name, items in baseline["results"].items()
        for item in items
        if item.get("is_secret") is not False
    ]
    assert unaudited == [], "audit them: .venv/bin/detect-secrets audit .secrets.baseline"
    assert len(baseline["plugins_used"]) >= 20, "the scan keeps detect-secrets' default plugins"

    copy = tmp_path / "baseline.json"
    copy.write_text((REPO / ".secrets.baseline").read_text())

    def hook(file: Path) -> subprocess.CompletedProcess[str]:
        command = [str(Path(sys.executable).parent / "detect-secrets-hook"), "--baseline", str(copy), str(file)]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    clean, planted = tmp_path / "clean.py", tmp_path / "planted.py"
    clean.write_text('NAME = "app_secret"\n')
    access_key = register_secret("AKIA" + "".join(secrets.choice(string.ascii_uppercase + "234567") for _ in range(16)))
    planted.write_text(f'NAME = "app_secret"\nAWS_ACCESS_KEY_ID = "{access_key}"\n')
    ok = hook(clean)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = hook(planted)
    record_output(bad.stdout + bad.stderr, "detect-secrets-hook on a planted key")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "AWS Access Key" in bad.stdout and f"{planted}:2" in bad.stdout, bad.stdout
    assert access_key not in bad.stdout + bad.stderr
