"""A real Docker engine for the container tests: Debian's dockerd on a private socket.

No bridge, no iptables, no published ports: containers use host networking or none.
The base image is made locally (mmdebstrap, then `docker import`), since no registry is
reachable; its tar is cached in /var/cache/secret-init between runs. Images are built with
BuildKit (Debian's client, the engine's built-in Dockerfile frontend), which the Dockerfile's
`RUN --mount=type=secret` needs.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO, base_env

DOCKER = "/usr/bin/docker"  # Debian's client; the one on PATH may have no engine support
CACHE = Path("/var/cache/secret-init")
BASE_PACKAGES = ("python3", "python3-venv", "postgresql-client")
BASE_TAG = "localbase:secret-init-test"
IMAGE_TAG = "secret-init:test"


def engine_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run dockerd"
    for tool in ("dockerd", "mmdebstrap", DOCKER):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/bootstrap installs docker.io and mmdebstrap)"
    return None


@dataclass
class Engine:
    root: Path
    process: subprocess.Popen[bytes]

    @property
    def host(self) -> str:
        return f"unix://{self.root}/docker.sock"

    def env(self) -> dict[str, str]:
        return base_env(DOCKER_HOST=self.host, DOCKER_CONFIG=str(self.root / "config"), HOME=str(self.root))

    def docker(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [DOCKER, *args], env=self.env(), input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed: {result.stderr[-2000:]}")
        return result

    def compose(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        binary = str(Path(sys.executable).parent / "docker-compose")
        result = subprocess.run(
            [binary, *args], env=self.env(), capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} failed: {result.stderr[-3000:]}")
        return result


def start_engine() -> Engine:
    root = Path(tempfile.mkdtemp(prefix="sid-", dir="/tmp"))  # short: socket paths are limited
    log = (root / "dockerd.log").open("wb")
    process = subprocess.Popen(
        ["dockerd", "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
         "--pidfile", str(root / "dockerd.pid"), "-H", f"unix://{root}/docker.sock", "--storage-driver", "overlay2",
         "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false"],
        stdout=log, stderr=subprocess.STDOUT, env=base_env(),
    )  # fmt: skip
    engine = Engine(root, process)
    deadline = time.monotonic() + 60
    while engine.docker("version", check=False, timeout=10).returncode != 0:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"dockerd did not start: {(root / 'dockerd.log').read_text()[-2000:]}")
        time.sleep(0.2)
    return engine


@contextmanager
def running_engine() -> Iterator[Engine]:
    """A module's engine: skipped with the reason where none can run; stopped however the module ends,
    after the image histories are recorded for the session's leak hunt (the daemon must still run)."""
    import pytest

    from tests.figures import record_image_histories

    reason = engine_missing()
    if reason:
        pytest.skip(reason)
    engine = start_engine()
    try:
        yield engine
    finally:
        record_image_histories(engine)
        stop_engine(engine)


def stop_engine(engine: Engine) -> None:
    """Swarm, its gateway bridge, the daemon by its pid, leftover mounts, the state dir."""
    engine.docker("swarm", "leave", "--force", check=False, timeout=60)
    engine.docker("network", "rm", "docker_gwbridge", check=False, timeout=30)
    engine.process.terminate()
    try:
        engine.process.wait(30)
    except subprocess.TimeoutExpired:
        engine.process.kill()
        engine.process.wait()
    for mountpoint in reversed(_mounts_under(engine.root)):
        subprocess.run(["umount", "-l", mountpoint], check=False, capture_output=True)
    shutil.rmtree(engine.root, ignore_errors=True)


def _mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(root))]


def base_tar() -> Path:
    """A minimal Debian with python3 (and psql for the probing app), made once and cached."""
    tar = CACHE / f"base-bookworm-{'-'.join(BASE_PACKAGES)}.tar"
    if not tar.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = tar.with_suffix(".partial.tar")
        subprocess.run(
            ["mmdebstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "bookworm", str(partial)],
            check=True, capture_output=True, timeout=900,
        )  # fmt: skip
        partial.rename(tar)
    return tar


def build_context(workdir: Path, wheels: bool = True) -> Path:
    """A copy of the checkout's build context; with `wheels`, `pip wheel . -w wheels` as the Dockerfile documents."""
    context = workdir / "context"
    context.mkdir()
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, context / name)
    for tree in ("secret_init", "scripts", "compose"):
        shutil.copytree(REPO / tree, context / tree, ignore=shutil.ignore_patterns("__pycache__"))
    if wheels:
        pip_wheel(context / "wheels", str(context))
    return context


def pip_wheel(dest: Path, *requirements: str) -> None:
    """Wheels for `requirements` and all their dependencies, made with the test interpreter's pip."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", *requirements, "-w", str(dest)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip


def import_base(engine: Engine) -> str:
    engine.docker("import", str(base_tar()), BASE_TAG, timeout=600)
    return BASE_TAG


def buildkit(engine: Engine, context: Path, *args: str, network: str = "none") -> subprocess.CompletedProcess[str]:
    """`docker build` with BuildKit (Debian's client and the engine's built-in frontend: RUN --mount works).

    No `# syntax=` line is needed, nor possible: pulling a frontend image needs a registry.
    """
    return subprocess.run(
        [DOCKER, "build", "--progress", "plain", "--network", network, "--build-arg", f"BASE={BASE_TAG}",
         *args, str(context)],
        env={**engine.env(), "DOCKER_BUILDKIT": "1"}, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip


def build_image(engine: Engine, workdir: Path) -> str:
    """`pip wheel . -w wheels && docker build .` offline (`--network none`), from a copy of the checkout."""
    context = build_context(workdir)
    import_base(engine)
    result = buildkit(engine, context, "-t", IMAGE_TAG)
    if result.returncode != 0:
        raise AssertionError(f"docker build failed: {result.stdout[-3000:]}{result.stderr[-2000:]}")
    return IMAGE_TAG
